"""`prefopt examples`: the list names every shipped script with its header's purpose; `copy` writes the scripts and
their sample data byte for byte (scripts executable) and never overwrites a changed file unless --force, writing
nothing when it refuses; `run` runs the shipped script in the caller's directory with the arguments passed on and its
exit code returned. The scripts call a stand-in prefopt (tests/test_examples.py) where a real one is not needed.
"""

from __future__ import annotations

import os
import re
import sys

from prefopt.cli import main
from prefopt.run.examples import EXAMPLES_DIR, this_prefopt
from tests.test_examples import RECORDER, example_scripts, recorded_calls, stand_in


def test_prefopt_examples_lists_copies_and_never_overwrites_a_changed_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["examples"]) == 0
    listed = capsys.readouterr().out
    for script in example_scripts():
        purpose = script.read_text().splitlines()[1].lstrip("# ")
        assert re.search(rf"^  {script.stem} +{re.escape(purpose)}$", listed, re.M), script.name

    assert main(["examples", "copy"]) == 0
    copy = tmp_path / "prefopt-examples"
    shipped = sorted(path.relative_to(EXAMPLES_DIR) for path in EXAMPLES_DIR.rglob("*") if path.is_file())
    assert sorted(path.relative_to(copy) for path in copy.rglob("*") if path.is_file()) == shipped
    for name in shipped:
        assert (copy / name).read_bytes() == (EXAMPLES_DIR / name).read_bytes()
        assert os.access(copy / name, os.X_OK) == (name.suffix == ".sh")
    capsys.readouterr()

    (copy / "lpo_vs_dpo.sh").write_text("# mine\n")
    (copy / "gate_dpo_local.sh").unlink()
    assert main(["examples", "copy"]) == 2  # refused whole: the deleted file is not written back either
    assert "lpo_vs_dpo.sh" in capsys.readouterr().err and not (copy / "gate_dpo_local.sh").exists()
    assert main(["examples", "copy", "gate_dpo_local", "-o", str(copy)]) == 0  # only the named one (and the data)
    assert re.findall(r"^(\w+) +\S+/(\S+)$", capsys.readouterr().out, re.M) == [
        ("wrote", "gate_dpo_local.sh"),
        ("unchanged", "ultrafeedback_sample.jsonl"),
    ]
    assert main(["examples", "copy", "--force", "lpo_vs_dpo", "-o", str(copy)]) == 0
    assert (copy / "lpo_vs_dpo.sh").read_bytes() == (EXAMPLES_DIR / "lpo_vs_dpo.sh").read_bytes()
    assert main(["examples", "run", "gate_dpo"]) == 2
    assert "did you mean gate_dpo_local?" in capsys.readouterr().err


def test_prefopt_examples_run_passes_arguments_and_exit_code_on(tmp_path, monkeypatch, capsys):
    """`prefopt examples run NAME ARGS`: the shipped script in the caller's directory, with the caller's PREFOPT if
    set (else this install's: this interpreter), the arguments passed on and the script's exit code returned."""
    failing = RECORDER + "exit 3\n"  # records the call, then fails
    record = tmp_path / "record"
    monkeypatch.setenv("PREFOPT", str(stand_in(tmp_path / "bin", text=failing) / "prefopt"))
    monkeypatch.setenv("RECORD", str(record))
    monkeypatch.chdir(tmp_path)
    assert main(["examples", "run", "gate_dpo_local.sh", "trainer.max_steps=1"]) == 3
    (call,) = recorded_calls(record)
    assert call["cwd"] == str(tmp_path) and call["args"][0] == "train" and call["args"][-1] == "trainer.max_steps=1"
    assert f"running {EXAMPLES_DIR / 'gate_dpo_local.sh'}" in capsys.readouterr().out
    assert this_prefopt().split() == [sys.executable, "-m", "prefopt.cli"]
