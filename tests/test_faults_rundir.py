"""Fault injection for the run dir's record: a refused resume changes nothing, an allowed one (a cadence, a longer
run) continues it without a gap or a repeat, a kill while a checkpoint replaces one of the same step leaves a
resumable run, planted symbolic links are refused before anything is written through them, a full disk during a
checkpoint is one line, an escaped `\\${...}` stays literal, `run_dir=` is refused, killed writes' temp files go."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prefopt.cli import main
from prefopt.observe.tracking import read_jsonl
from tests.helpers import command_fails, run_train, wandb_history_all_segments
from tests.test_faults import REPO, TINY, record, train_rows

QUIET = ["logger.wandb.mode=disabled"]


def train_fails(capsys, run_dir: Path, *overrides: str) -> tuple[int, str]:
    """`prefopt train OVERRIDES hydra.run.dir=RUN_DIR` in this process, expected to fail: (exit code, stderr)."""
    return command_fails(capsys, "train", run_dir, *overrides)


def record_files(run_dir: Path) -> dict[str, bytes]:
    """The run's record: what a refused launch must leave byte-identical."""
    names = [
        "config.yaml",
        "overrides.yaml",
        "git_revision",
        *(f".hydra/{path.name}" for path in (run_dir / ".hydra").iterdir()),
    ]
    return {name: (run_dir / name).read_bytes() for name in names}


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("prefopt: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_a_refused_resume_leaves_the_record_and_an_allowed_change_resumes(tmp_path, capsys):
    args = [*TINY, *QUIET, "trainer.max_steps=4", "trainer.save_every=2"]
    run_dir = run_train(tmp_path / "run", *args, "trainer.stop_after=2")
    before = record_files(run_dir)
    code, stderr = train_fails(capsys, run_dir, *args, "loss.beta=0.5", "trainer.resume=true")
    line = one_error_line(stderr)
    assert (
        code == 2 and "another config" in line and "loss.beta: 0.1 there vs 0.5 now" in line and "loss.beta=0.1" in line
    )
    assert record_files(run_dir) == before and not list(run_dir.glob("error*.txt"))
    # a step count below the checkpoint's: refused the same way
    code, stderr = train_fails(capsys, run_dir, *[*args[:-2], "trainer.max_steps=1", "trainer.resume=true"])
    assert code == 2 and "trainer.max_steps: 4 there vs 1 now" in one_error_line(stderr)
    assert record_files(run_dir) == before and not list(run_dir.glob("error*.txt"))
    record(
        "resume with another loss.beta / max_steps below the checkpoint",
        "exit 2 naming each key, both values and the fix; "
        "config.yaml, overrides.yaml, .hydra/ byte-identical, no error.txt",
    )
    # what does not change training may change: cadences of evals, probes, logging, saving; killed writes' temps go
    from prefopt.core.fileutil import HOST

    stale = run_dir / f".config.yaml.{HOST}-4242.k1ll3d00.tmp"  # atomic_write's name for a killed write's temp
    stale.write_bytes(b"x" * 1000)
    foreign = run_dir / ".notes.txt.tmp"  # not atomic_write's: never removed
    foreign.write_bytes(b"mine")
    run_train(
        run_dir,
        *args,
        "trainer.eval_every=1",
        "dynamics.every_n_steps=1",
        "trainer.save_every=1",
        "trainer.resume=true",
    )
    assert [row["step"] for row in train_rows(run_dir)] == [1, 2, 3, 4]
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") if "eval/loss" in row] == [0, 3, 4]
    assert not stale.exists() and foreign.exists()
    hydra_record = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra  # written by prepare_run once accepted
    assert hydra_record.runtime.choices.loss == "dpo" and hydra_record.output_subdir == ".hydra"
    assert "trainer.eval_every=1" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    record(
        "resume with eval_every / every_n_steps / save_every changed",
        "resumes; steps 1-4 once; a killed write's temp file removed",
    )


def test_fewer_epochs_than_the_checkpoint_trained_are_refused_before_anything_is_written(tmp_path, capsys):
    """trainer.num_epochs becomes steps only on the data: the parent builds it (once, no model) and refuses a length the
    checkpoint is past before it writes config.yaml, overrides.yaml, .hydra/ or git_revision."""
    args = [
        *TINY,
        *QUIET,
        "dataset.arith.num_train=8",
        "trainer.max_steps=null",
        "trainer.grad_accum=1",
        "trainer.save_every=2",
    ]
    run_dir = run_train(tmp_path / "run", *args, "trainer.num_epochs=1")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4  # 8 pairs / 2 per step
    before = record_files(run_dir)
    code, stderr = train_fails(
        capsys, run_dir, *args, "trainer.num_epochs=0.25", "trainer.resume=true"
    )  # 1 step: both checkpoints past it
    line = one_error_line(stderr)
    assert code == 2 and "trainer.num_epochs: 1.0 there vs 0.25 now" in line and "trainer.num_epochs=1.0" in line, line
    assert record_files(run_dir) == before and not list(run_dir.glob("error*.txt"))
    record(
        "resume with fewer trainer.num_epochs than the checkpoint trained",
        "exit 2 in the parent naming num_epochs; config.yaml, overrides.yaml, .hydra/, git_revision byte-identical",
    )


def test_a_retired_checkpoint_is_restored_only_once_the_resume_is_accepted(tmp_path, capsys):
    """A save of step N killed between its two renames leaves only .step-N.retired: a resume sees it as step N; a
    refused one leaves it where it is (nothing moved), an accepted one puts it back and continues from it."""
    args = [*TINY, *QUIET, "trainer.max_steps=2", "trainer.save_every=2"]
    run_dir = run_train(tmp_path / "run", *args)
    checkpoints = run_dir / "checkpoints"
    retired = checkpoints / ".step-000002.retired"
    os.replace(checkpoints / "step-000002", retired)
    before = record_files(run_dir)
    code, stderr = train_fails(capsys, run_dir, *args, "loss.beta=0.5", "trainer.resume=true")
    assert code == 2 and f"checkpoint {retired} belongs to another config" in one_error_line(stderr)
    assert retired.is_dir() and not (checkpoints / "step-000002").exists() and record_files(run_dir) == before
    run_train(run_dir, *args[:-2], "trainer.max_steps=3", "trainer.resume=true")
    assert [row["step"] for row in train_rows(run_dir)] == [1, 2, 3] and not retired.exists()
    record(
        "refused resume of a run whose checkpoint was mid-replace",
        "refused; the retired copy is not moved; an accepted resume restores it and continues",
    )


def test_a_finished_run_extended_continues_without_a_gap_or_a_repeat(tmp_path, capsys):
    args = [*TINY, "logger.wandb.mode=offline"]
    run_dir = run_train(tmp_path / "run", *args, "trainer.max_steps=4")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    run_train(run_dir, *args, "trainer.max_steps=8", "trainer.resume=true")
    rows = train_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 9))
    # HF Trainer's continuation: step 5 keeps the LR the 4-step cosine set after step 4 (0); from step 6 on, the cosine
    # rebuilt for 8 steps at the continued step count: lr x (1 + cos(pi t / 8)) / 2 for t = 5, 6, 7
    assert rows[4]["train/learning_rate"] == pytest.approx(0.0, abs=1e-12)
    assert [row["train/learning_rate"] for row in rows[5:]] == pytest.approx(
        [1e-3 * (1 + math.cos(math.pi * t / 8)) / 2 for t in (5, 6, 7)]
    )
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    history = [row["step"] for row in wandb_history_all_segments(run_dir) if "train/loss" in row]
    assert sorted(history) == list(range(1, 9)), history
    assert (
        "trainer.max_steps: 4 -> 8" in capsys.readouterr().out
        and "max_steps: 8" in (run_dir / "config.yaml").read_text()
    )
    assert "trainer.max_steps: 4 -> 8" in (run_dir / "cli.log").read_text()
    record(
        "finished 4-step run resumed with max_steps=8",
        "steps 1-8 once in metrics.jsonl and W&B; summary replaced; "
        "one warning line (HF Trainer's schedule continuation), recorded in config.yaml and cli.log",
    )


KILL_IN_REPLACE = """
import os, signal, sys
real_replace = os.replace
def replace(source, target):
    # the new checkpoint is complete, the old one of the same step moved aside or gone
    if str(source).endswith(".partial"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(source, target)
os.replace = replace
from prefopt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_while_a_checkpoint_replaces_one_of_the_same_step_leaves_a_resumable_run(tmp_path):
    args = [*TINY, *QUIET, "trainer.max_steps=2"]
    run_dir = run_train(tmp_path / "run", *args)
    # resuming a finished run saves its last step again: killed between taking the old one away and putting the new in
    killed = subprocess.run(
        [sys.executable, "-c", KILL_IN_REPLACE, "train", *args, "trainer.resume=true", f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_train(run_dir, *args, "trainer.resume=true")
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert (
        checkpoints == ["latest", "step-000002"]
        and (run_dir / "checkpoints" / "step-000002" / "manifest.json").is_file()
    )
    assert [row["step"] for row in train_rows(run_dir)] == [1, 2]
    record(
        "kill -9 inside a checkpoint's replacement (same step)",
        "the complete old checkpoint is put back; the run resumes",
    )


@pytest.mark.parametrize("name", [".prefopt.lock", "cli.log", "metrics.jsonl", "checkpoints"])
def test_a_planted_link_out_of_the_run_dir_is_refused_and_nothing_outside_changes(tmp_path, capsys, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = (
        outside if name == "checkpoints" else outside / ("missing" if name == "metrics.jsonl" else "precious")
    )  # dangling
    (run_dir / name).symlink_to(target)
    code, stderr = train_fails(capsys, run_dir, *TINY, *QUIET, "trainer.max_steps=2")
    line = one_error_line(stderr)
    assert code == 2 and f"{run_dir / name} is a symbolic link to {target}" in line
    assert (
        sorted(path.name for path in outside.iterdir()) == ["precious"]
        and (outside / "precious").read_text() == "keep me\n"
    )
    record(f"planted link {name} -> outside the run dir", "exit 2 naming the link; nothing outside written")


def test_a_full_disk_during_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    run_dir = tmp_path / "run"
    code, stderr = train_fails(capsys, run_dir, *TINY, *QUIET, "trainer.max_steps=1")
    line = one_error_line(stderr)
    assert code == 2 and "No space left on device" in line and "the disk is full" in line
    assert not list((run_dir / "checkpoints").glob(".*")), "the partial checkpoint is removed (its space freed)"
    record(
        "disk full while a checkpoint is written (safetensors)", "exit 2, one line: cannot write ...: the disk is full"
    )


def test_only_a_failed_write_is_taken_for_a_full_disk(tmp_path, monkeypatch):
    """A checkpoint save that fails for another reason (CUDA out of memory, NCCL, a bug) keeps its own error even on a
    nearly full disk; a free-space probe that fails itself never hides the original error."""
    import shutil

    from prefopt.train.checkpoint import disk_full

    nearly_full = shutil._ntuple_diskusage(100 << 30, (100 << 30) - (1 << 20), 1 << 20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: nearly_full)
    assert not disk_full(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), tmp_path)
    assert not disk_full(OSError(errno.EIO, "Input/output error"), tmp_path)  # its errno already says what it is
    assert disk_full(RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"), tmp_path)
    assert disk_full(
        RuntimeError('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'), tmp_path
    )

    def unreadable(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "disk_usage", unreadable)
    assert not disk_full(RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"), tmp_path)


def test_an_escaped_interpolation_stays_literal_in_the_worker(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("PREFOPT_TEST_SECRET", "s3cret-token")
    names = []
    real_init = wandb.init

    def init(*args, **kwargs):
        names.append(kwargs["name"])
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    run_dir = run_train(
        tmp_path / "run",
        *TINY,
        "logger.wandb.mode=offline",
        "trainer.max_steps=1",
        r"logger.wandb.name=\${oc.env:PREFOPT_TEST_SECRET}",
    )
    assert names == ["${oc.env:PREFOPT_TEST_SECRET}"]
    from prefopt.run.worker import load_frozen_config

    assert load_frozen_config(run_dir / "config.yaml").logger.wandb.name == "${oc.env:PREFOPT_TEST_SECRET}"
    texts = [path.read_text() for path in [run_dir / "config.yaml", *run_dir.glob("checkpoints/step-*/config.yaml")]]
    assert len(texts) == 2 and not any("s3cret" in text for text in texts)
    run_train(
        run_dir,
        *TINY,
        "logger.wandb.mode=offline",
        "trainer.max_steps=1",
        "trainer.resume=true",
        r"logger.wandb.name=\${oc.env:PREFOPT_TEST_SECRET}",
    )  # the checkpoint's config compares equal
    record(
        "escaped \\${oc.env:SECRET} as the W&B run name",
        "literal in the frozen config, the checkpoint and W&B; resolved once",
    )


def test_run_dir_is_refused_with_where_to_set_it(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    code, stderr = train_fails(capsys, tmp_path / "run", *TINY, *QUIET, f"run_dir={elsewhere}")
    assert code == 2 and f"hydra.run.dir={elsewhere}" in one_error_line(stderr) and not elsewhere.exists()
    record("run_dir=PATH on the command line", "exit 2: run_dir is recorded, not a setting; use hydra.run.dir=PATH")


def test_a_killed_writes_temp_file_is_removed_by_the_next_write_of_that_file(tmp_path):
    """The tokenized cache (and every atomic write) writes NAME through .NAME.HOST-PID.XXXXXXXX.tmp, flocked while
    written: a kill leaves that temp (full size) unlocked; the next write of NAME removes it, never a temp whose lock
    is held (a live writer, whatever its host or pid namespace: the name's host and pid are not trusted), nor a
    file that is not atomic_write's."""
    from prefopt.core.fileutil import HOST, atomic_write_bytes

    killed = tmp_path / f".pairs-abc.pt.{HOST}-{os.getpid()}.k1ll3d00.tmp"  # a pid that lives: only the lock counts
    killed.write_bytes(b"\0" * 4096)
    live = tmp_path / ".pairs-abc.pt.otherhost-1.l1v3wr1t.tmp"  # a live writer in another container
    live.write_bytes(b"\0")
    other = tmp_path / ".pairs-abc.pt.not-a-temp.tmp"  # not atomic_write's name
    other.write_bytes(b"\0")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
            str(live),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "locked"
        atomic_write_bytes(tmp_path / "pairs-abc.pt", b"whole")
    finally:
        writer.communicate("")
    assert (
        not killed.exists()
        and live.exists()
        and other.exists()
        and (tmp_path / "pairs-abc.pt").read_bytes() == b"whole"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live.name, other.name, "pairs-abc.pt"])
    record(
        "kill during a cache write (full-size temp left)",
        "the next write of that entry removes it; a locked (live) "
        "writer's is kept on any host; a file not named like atomic_write's temps is kept",
    )


def test_an_atomic_writes_temp_is_locked_while_it_is_written(tmp_path, monkeypatch):
    """A second process's cleaner must not take a temp being written for a killed write's."""
    import fcntl

    from prefopt.core import fileutil

    seen = []

    def replace(tmp, target):  # the moment before the rename: the temp is complete and still locked
        fd = os.open(tmp, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        seen.append(Path(tmp).name)
        real_replace(tmp, target)

    real_replace = os.replace
    monkeypatch.setattr(fileutil.os, "replace", replace)
    fileutil.atomic_write_bytes(tmp_path / "entry.pt", b"x")
    assert len(seen) == 1 and fileutil.TEMP_PATTERN.match(seen[0]) and (tmp_path / "entry.pt").read_bytes() == b"x"


def test_a_refused_resume_of_a_finished_sweep_job_leaves_it_finished(tmp_path, capsys):
    from tests.helpers import run_sweep

    sweep_dir = tmp_path / "sweep"
    args = [*TINY, *QUIET, "trainer.max_steps=2", "sweep.continue_on_failure=true"]
    [job] = run_sweep(sweep_dir, *args, "loss.beta=0.1")
    before = record_files(job)
    argv = sys.argv
    try:
        with pytest.raises(SystemExit):  # the job failed (Hydra's report of a sweep with a failed job)
            main(["train", "-m", *args, "loss.beta=0.3", "trainer.resume=true", f"hydra.sweep.dir={sweep_dir}"])
    finally:
        sys.argv = argv
    assert "loss.beta: 0.1 there vs 0.3 now" in capsys.readouterr().err
    assert record_files(job) == before and not list(job.glob("error*.txt")) and (job / "summary.json").is_file()
    argv = sys.argv
    try:  # the same sweep dir again without trainer.resume: refused as a reuse, its record kept too
        with pytest.raises(SystemExit):
            main(["train", "-m", *args, "loss.beta=0.3", f"hydra.sweep.dir={sweep_dir}"])
    finally:
        sys.argv = argv
    assert "already holds a run" in capsys.readouterr().err
    assert record_files(job) == before and not list(job.glob("error*.txt"))
    record(
        "a sweep re-run with trainer.resume=true and another loss.beta",
        "job refused; its record (config, .hydra/) unchanged, no error.txt: it still reads as finished",
    )


def test_a_link_planted_at_the_reference_cache_entry_is_not_written_through(tmp_path):
    """The cache is written by atomic_write_bytes: a temp file of a random name (created O_EXCL, so never a planted
    link) renamed over the entry, which replaces a link there instead of writing through it."""
    from prefopt.core.fileutil import HOST

    args = [
        *TINY,
        *QUIET,
        "trainer.max_steps=1",
        "reference.precompute=true",
        f"reference.cache_dir={tmp_path / 'cache'}",
        "trainer.save_final=false",
    ]
    run_train(tmp_path / "first", *args)
    [entry] = list((tmp_path / "cache").glob("*.pt"))
    entry.unlink()  # the next run misses and writes it again
    outside = tmp_path / "outside"
    outside.write_text("keep me\n")
    entry.symlink_to(outside)
    temp_link = entry.parent / f".{entry.name}.{HOST}-1.l1nk0000.tmp"  # named like a killed write's temp: not followed
    temp_link.symlink_to(outside)
    run_train(tmp_path / "second", *args)
    assert outside.read_text() == "keep me\n" and entry.is_file() and not entry.is_symlink()
    record("link planted at the reference cache's entry", "replaced, not written through; the outside file unchanged")


def test_a_report_probing_the_lock_never_makes_a_launch_fail(tmp_path):
    """`prefopt report` probes a job's run dir lock while a launch may be taking it: the probe's instant of holding
    the lock makes acquire try again, never fail with 'holder unknown'; probes do not read each other as owners."""
    import fcntl
    import threading

    from prefopt.core import rundir
    from prefopt.core.runfiles import LOCK_FILE

    run_dir = tmp_path / "job"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).touch()
    probe = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)  # a probe caught mid-way (held longer than any real one)
    try:
        assert not rundir.lock_is_held(run_dir)  # another probe: not an owner
        threading.Timer(0.3, fcntl.flock, [probe, fcntl.LOCK_UN]).start()  # the probe lets go
        rundir.acquire(run_dir, wait_for_ranks=False)
        try:
            assert rundir.lock_is_held(run_dir)
        finally:
            rundir.release(run_dir)
    finally:
        os.close(probe)
    assert not rundir.lock_is_held(run_dir) and not rundir.lock_is_held(tmp_path / "never-ran")
    assert not (tmp_path / "never-ran").exists()


def test_a_link_loop_above_a_written_file_is_one_line(tmp_path):
    """ELOOP also comes from a looping link among the parent dirs, where readlink of the path itself fails: still the
    one-line LinkRefused, never that OSError."""
    from prefopt.core.fileutil import LinkRefused, open_no_follow

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(LinkRefused, match="link loop in its parent dirs"):
        open_no_follow(tmp_path / "loop" / "config.yaml", os.O_RDWR | os.O_CREAT)
    (tmp_path / "outside").write_text("x")
    (tmp_path / "lock").symlink_to(tmp_path / "outside")
    with pytest.raises(LinkRefused, match=f"lock is a symbolic link to {tmp_path / 'outside'}"):
        open_no_follow(tmp_path / "lock", os.O_RDWR | os.O_CREAT)


def test_python_m_prefopt_cli_defers_the_hydra_record_like_the_installed_script(tmp_path):
    """`python -m prefopt.cli` runs the prefopt.cli module Hydra's callback is looked up in: a refused resume leaves
    .hydra/ as the run wrote it (a __main__ copy of the module never deferred it, so Hydra rewrote the record)."""
    args = [*TINY, *QUIET, "trainer.max_steps=2", "trainer.save_every=2"]
    run_dir = run_train(tmp_path / "run", *args)
    before = record_files(run_dir)
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt.cli",
            "train",
            *args,
            "loss.beta=0.5",
            "trainer.resume=true",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and "loss.beta: 0.1 there vs 0.5 now" in one_error_line(refused.stderr)
    assert record_files(run_dir) == before
    record("`python -m prefopt.cli` resume refused", "exit 2; .hydra/ and the record byte-identical (deferred)")
