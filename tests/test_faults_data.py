"""Data read other than the user meant, with exit 0: each case now reads what was meant, or refuses in one line.

Unit-level through build_preference_data / load_raw_splits with the byte tokenizer (fast); one `prefopt train`.
Each case is recorded in the fault table (tests/test_faults.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

from prefopt.core.errors import ConfigError
from prefopt.data import DataError, build_preference_data
from prefopt.data.sources import load_raw_splits
from tests.helpers import dataset_node, preset
from tests.test_faults import record

ROWS = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}"} for i in range(10)]


def local_cfg(path, **overrides):
    overrides.setdefault("cache_dir", None)
    overrides.setdefault("eval_split", None)  # as conf/dataset/local.yaml
    return dataset_node(name="local", path=str(path), **overrides)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def texts(pairs) -> list[str]:
    return sorted(pair.chosen for pair in pairs)


# ---------------------------------------------------------------- dataset.path with the arith preset


def test_dataset_path_with_the_default_arith_preset_is_refused_naming_dataset_local(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    with pytest.raises(ConfigError, match="dataset=local dataset.path="):
        load_raw_splits(dataset_node(path=str(data)), seed=0)
    from prefopt.cli import main

    argv = sys.argv
    try:
        code = main(
            ["train", "model=tiny_llama", "hardware=cpu", f"dataset.path={data}", f"hydra.run.dir={tmp_path / 'run'}"]
        )
    except SystemExit as exit:
        code = exit.code
    finally:
        sys.argv = argv
    assert code == 2
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    record(
        "dataset.path=FILE with the arith preset",
        "refused before training: 'choose local data: dataset=local dataset.path=FILE'",
    )


# ---------------------------------------------------------------- globs


def test_a_glob_through_a_symlink_cycle_reads_each_file_once(tmp_path, byte_tokenizer):
    write_jsonl(tmp_path / "d" / "a.jsonl", ROWS[:5])
    write_jsonl(tmp_path / "d" / "sub" / "b.jsonl", ROWS[5:])
    os.symlink("..", tmp_path / "d" / "sub" / "up")  # a cycle: d/sub/up/sub/up/... (glob.glob: each file ~40 times)
    data = build_preference_data(local_cfg(f"{tmp_path}/d/**/*.jsonl", eval_fraction=0.2), byte_tokenizer, seed=0)
    assert texts(data.train + data.eval) == texts_of(ROWS)
    source = load_raw_splits(local_cfg(f"{tmp_path}/d/**/*.jsonl"), seed=0)
    assert source.files == [tmp_path / "d" / "a.jsonl", tmp_path / "d" / "sub" / "b.jsonl"]  # real names, each once
    # a second name for a directory (no cycle): its files once, by their real names
    write_jsonl(tmp_path / "e" / "sub" / "b.jsonl", ROWS[5:])
    os.symlink("sub", tmp_path / "e" / "again")
    assert load_raw_splits(local_cfg(f"{tmp_path}/e/**/*.jsonl"), seed=0).files == [tmp_path / "e" / "sub" / "b.jsonl"]
    record("** glob through a symlink cycle", "each file read once, by its real path (10 rows, not 10 x 41)")


def texts_of(rows) -> list[str]:
    return sorted(row["chosen"] for row in rows)


# ---------------------------------------------------------------- directories


def test_a_directory_with_train_and_test_files_uses_the_test_file_as_eval(tmp_path, byte_tokenizer, caplog):
    write_jsonl(tmp_path / "d" / "train.jsonl", ROWS[:8])
    write_jsonl(tmp_path / "d" / "test.jsonl", ROWS[8:])
    with caplog.at_level(logging.INFO, logger="prefopt.data"):
        data = build_preference_data(local_cfg(tmp_path / "d"), byte_tokenizer, seed=0)
    assert texts(data.train) == texts_of(ROWS[:8]) and texts(data.eval) == texts_of(ROWS[8:])
    data_line = next(
        record.getMessage() for record in caplog.records if record.getMessage().startswith("dataset local")
    )
    assert "split test (its own held-out split" in data_line
    record("directory with train and test files", "test file is the eval split (said in the data line), train not cut")


def test_a_directory_of_several_formats_is_refused_naming_the_files_left_out(tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", ROWS[:5])
    (tmp_path / "d" / "b.csv").write_text("prompt,chosen,rejected\n" + "".join(f"q{i},c{i},r{i}\n" for i in range(5)))
    with pytest.raises(DataError, match=r"b\.csv would not be read: it holds files of several formats"):
        load_raw_splits(local_cfg(tmp_path / "d"), seed=0)
    (tmp_path / "d" / "b.csv").unlink()
    (tmp_path / "d" / "dataset_info.json").write_text("{}")  # metadata (LLaMA-Factory's, the hub's) is not data
    assert len(load_raw_splits(local_cfg(tmp_path / "d"), seed=0).train) > 0
    record("directory with a .jsonl and a .csv", "refused naming b.csv (only one format would be read)")


# ---------------------------------------------------------------- deep JSON


def deep_row(depth: int = 100_000) -> str:
    return '{"prompt": ' + "[" * depth + "]" * depth + ', "chosen": "c", "rejected": "r"}'


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json_is_a_bad_row(tmp_path, byte_tokenizer, suffix):
    lines = [json.dumps(row) for row in ROWS[:3]] + [deep_row()] + [json.dumps(row) for row in ROWS[3:]]
    path = tmp_path / f"pairs{suffix}"
    path.write_text("\n".join(lines) + "\n")
    data = build_preference_data(local_cfg(path, on_bad_row="skip", eval_fraction=0.2), byte_tokenizer, seed=0)
    assert texts(data.train + data.eval) == texts_of(ROWS)
    assert data.stats["train/skipped_bad_rows"] + data.stats["eval/skipped_bad_rows"] == 1
    with pytest.raises(DataError, match="line 4: nested too deeply"):
        build_preference_data(local_cfg(path, eval_fraction=0.2), byte_tokenizer, seed=0)
    record(
        f"deeply nested JSON row ({suffix})", "skipped with on_bad_row=skip; one-line error naming line 4 with error"
    )


# ---------------------------------------------------------------- train/eval overlap


def test_duplicate_pairs_in_train_and_eval_are_counted_and_warned(tmp_path, byte_tokenizer, caplog):
    rows = ROWS[:6] + ROWS[:6]  # every pair twice: holding out 4 of 12 puts copies on both sides
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        data = build_preference_data(
            local_cfg(write_jsonl(tmp_path / "pairs.jsonl", rows), eval_fraction=0.34), byte_tokenizer, seed=0
        )
    train = {(pair.prompt, pair.chosen, pair.rejected) for pair in data.train}
    expected = sum((pair.prompt, pair.chosen, pair.rejected) in train for pair in data.eval)
    assert expected > 0
    assert data.stats["eval/overlap_with_train"] == expected
    assert any(
        f"{expected} of {len(data.eval)} eval pairs are also train pairs" in record.getMessage()
        for record in caplog.records
    )
    clean = build_preference_data(
        local_cfg(write_jsonl(tmp_path / "clean.jsonl", ROWS), eval_fraction=0.3), byte_tokenizer, seed=0
    )
    assert clean.stats["eval/overlap_with_train"] == 0
    record("exact-duplicate pairs in train and eval", f"counted (eval/overlap_with_train={expected}) and warned")


# ---------------------------------------------------------------- the tokenized cache


def test_an_edit_with_size_and_mtime_restored_is_not_a_cache_hit(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    cfg = local_cfg(path, cache_dir=str(tmp_path / "cache"), eval_fraction=0.2)
    first = build_preference_data(cfg, byte_tokenizer, seed=0)
    assert first.cache == "miss"
    assert build_preference_data(cfg, byte_tokenizer, seed=0).cache == "hit"
    before = path.stat()
    edited = path.read_text().replace("Good answer 3.", "Good answer 9.")  # same size
    path.write_text(edited)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as cp -p / rsync -a / touch -r restore it
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = build_preference_data(cfg, byte_tokenizer, seed=0)
    assert second.cache == "miss"
    assert "Good answer 3." not in texts(second.train + second.eval)
    record("data edited, size and mtime restored (cp -p)", "cache miss: the new content is tokenized")


def test_an_unwritable_cache_dir_names_dataset_cache_dir(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")  # a file where the cache directory should be: unwritable even for root
    with pytest.raises(
        DataError, match=f"dataset.cache_dir={blocker}/tokenized: cannot write the tokenized-pairs cache"
    ):
        build_preference_data(local_cfg(path, cache_dir=str(blocker / "tokenized")), byte_tokenizer, seed=0)
    record("unwritable dataset.cache_dir", "one-line error naming dataset.cache_dir (not hydra.run.dir)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_a_read_only_cache_dir_names_dataset_cache_dir(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        with pytest.raises(DataError, match="dataset.cache_dir="):
            build_preference_data(local_cfg(path, cache_dir=str(cache)), byte_tokenizer, seed=0)
    finally:
        cache.chmod(0o755)


# ---------------------------------------------------------------- LLaMA-Factory rows and unread prompt columns

ALPACA_ROWS = [
    {"instruction": f"Translate word {i}", "input": f"hello {i}", "chosen": f"Bonjour {i}", "rejected": f"Hola {i}"}
    for i in range(4)
] + [{"instruction": "Say hi", "input": "", "chosen": "Hi there", "rejected": "Go away"}]


def prompts_by_chosen(data) -> dict[str, str]:
    return {pair.chosen: pair.prompt for pair in data.train + data.eval}


def test_llama_factory_alpaca_rows_use_instruction_and_input_as_the_prompt(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    data = build_preference_data(local_cfg(path, eval_fraction=0.2), byte_tokenizer, seed=0)
    assert data.row_format == "alpaca"
    prompts = prompts_by_chosen(data)
    assert prompts["Bonjour 2"] == byte_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Translate word 2\nhello 2"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nSay hi<|im_end|>" in prompts["Hi there"]  # an empty input adds nothing
    raw = build_preference_data(local_cfg(path, eval_fraction=0.2, chat_template="never"), byte_tokenizer, seed=0)
    assert prompts_by_chosen(raw)["Bonjour 2"] == "Translate word 2\nhello 2"
    record(
        "LLaMA-Factory alpaca ranking rows",
        "alpaca layout: instruction + '\\n' + input is the prompt (was: the chosen/rejected common prefix)",
    )


def test_alpaca_system_and_history_become_chat_turns_or_are_refused_without_a_template(tmp_path, byte_tokenizer):
    rows = [dict(row, system="Be brief.", history=[["Hi", "Hello!"], ["Ready?", "Yes."]]) for row in ALPACA_ROWS]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    data = build_preference_data(local_cfg(path, eval_fraction=0.2), byte_tokenizer, seed=0)
    expected = byte_tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Ready?"},
            {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "Translate word 1\nhello 1"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompts_by_chosen(data)["Bonjour 1"] == expected
    with pytest.raises(DataError, match="history turns and a system prompt, which only a chat template can render"):
        build_preference_data(local_cfg(path, eval_fraction=0.2, chat_template="never"), byte_tokenizer, seed=0)
    record(
        "alpaca rows with system and history",
        "system turn + history turns before the instruction; refused without a template",
    )


def test_llama_factory_sharegpt_ranking_rows_keep_their_system_column(tmp_path, byte_tokenizer):
    rows = [
        {
            "conversations": [{"from": "human", "value": f"Question {i}?"}],
            "chosen": {"from": "gpt", "value": f"Good {i}"},
            "rejected": {"from": "gpt", "value": f"Bad {i}"},
            "system": "You are terse.",
        }
        for i in range(5)
    ]
    data = build_preference_data(
        local_cfg(write_jsonl(tmp_path / "sharegpt.jsonl", rows), eval_fraction=0.2), byte_tokenizer, seed=0
    )
    assert data.row_format == "messages"
    assert prompts_by_chosen(data)["Good 3"] == byte_tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Question 3?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    record("LLaMA-Factory sharegpt ranking rows with system", "conversations is the prompt, system its system turn")


def test_a_prompt_like_column_left_unread_is_a_warning(tmp_path, byte_tokenizer, caplog):
    rows = [dict(row, system="Be brief.", context=f"ctx {i}") for i, row in enumerate(ROWS)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        data = build_preference_data(local_cfg(path, eval_fraction=0.2), byte_tokenizer, seed=0)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in data.train[0].prompt  # templated string prompts read it
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("column(s) context look like part of the prompt" in message for message in warnings), warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        build_preference_data(local_cfg(path, eval_fraction=0.2, chat_template="never"), byte_tokenizer, seed=0)
    assert any(
        "column(s) system, context look like part of the prompt" in record.getMessage() for record in caplog.records
    )
    record(
        "a system / context column the layout does not read",
        "system is the system turn under a template; else a warning naming it",
    )


def test_an_unwritable_reference_cache_names_reference_cache_dir_and_the_run_goes_on(tmp_path, capfd):
    from tests.helpers import run_train
    from tests.test_faults import TINY

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    run = run_train(
        tmp_path / "run",
        *TINY,
        "trainer.max_steps=2",
        "reference.precompute=true",
        f"reference.cache_dir={blocker}/ref",
        "logger.wandb.mode=disabled",
    )
    assert (run / "summary.json").is_file()
    output = capfd.readouterr()
    assert f"reference.cache_dir={blocker}/ref cannot be written" in output.out + output.err
    record(
        "unwritable reference.cache_dir",
        "the run goes on uncached; the warning names reference.cache_dir (not hydra.run.dir)",
    )


def test_an_unwritable_model_cache_names_model_cache_dir(tmp_path):
    """The GGUF's conversion is kept in model.cache_dir: a cache that cannot be written names that key, not
    hydra.run.dir."""

    from prefopt.core.errors import ConfigError, ModelNotFoundError
    from prefopt.model.loading import converted_gguf_dir

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a file where the cache directory should be: unwritable even for root
    model_cfg = preset("model", "smollm2_135m", cache_dir=str(blocker / "cache"))
    try:
        with pytest.raises(ConfigError, match=f"model.cache_dir={blocker}/cache: cannot keep the converted model"):
            converted_gguf_dir(model_cfg)
    except ModelNotFoundError as error:  # the offline model package is not installed
        pytest.skip(str(error))
    record("unwritable model.cache_dir (GGUF conversion)", "one-line error naming model.cache_dir (not hydra.run.dir)")
