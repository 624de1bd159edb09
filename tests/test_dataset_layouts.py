"""Datasets where users have them: TRL's four layouts and HH, column mapping (OpenRLHF, LLaMA-Factory),
CSV / parquet / globs / save_to_disk / repository directories through `datasets`, the undetectable-layout
error, and the tokenized-pairs cache."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.data import DataError, build_preference_data
from prefopt.data.columns import ColumnMap
from prefopt.data.tokenize import PairEncoder
from tests.helpers import dataset_node

USER = [{"role": "user", "content": "Name a color."}]
SYSTEM_AND_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a color."},
]
# one row per layout: (row, expected prompt (messages to render, or raw text), chosen, rejected)
LAYOUT_CASES = {
    "strings": ({"prompt": "Name a color.", "chosen": "Blue.", "rejected": "No."}, USER, "Blue.", "No."),
    "implicit": (
        {"chosen": "Q: Name a color.\nA: Blue, of course.", "rejected": "Q: Name a color.\nA: Bleh."},
        "Q: Name a color.\nA:",
        " Blue, of course.",
        " Bleh.",
    ),
    "hh": (
        {
            "chosen": "\n\nHuman: Name a color.\n\nAssistant: Blue.",
            "rejected": "\n\nHuman: Name a color.\n\nAssistant: No.",
        },
        "\n\nHuman: Name a color.\n\nAssistant:",
        " Blue.",
        " No.",
    ),
    "messages": (
        {
            "prompt": USER,
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        },
        USER,
        "Blue.",
        "No.",
    ),
    "implicit_messages": (  # TRL's conversational implicit prompt (trl-lib/ultrafeedback_binarized)
        {
            "chosen": SYSTEM_AND_TURNS + [{"role": "assistant", "content": "Blue."}],
            "rejected": SYSTEM_AND_TURNS + [{"role": "assistant", "content": "No."}],
            "score_chosen": 8.0,
            "score_rejected": 2.0,
        },
        SYSTEM_AND_TURNS,
        "Blue.",
        "No.",
    ),
}


def dataset_cfg(path, tmp_path, **overrides):
    """A dataset node for `path`, with the tokenized cache in tmp_path (or as overridden)."""
    overrides.setdefault("cache_dir", str(tmp_path / "tokenized"))
    columns = overrides.pop("columns", {})
    node = dataset_node(name=overrides.pop("name", "local"), path=str(path), **overrides)
    node.columns = OmegaConf.merge(node.columns, columns)
    return node


def vary(value, index: int):
    """value with "color" made "color <index>" in every string inside it."""
    if isinstance(value, str):
        return value.replace("color", f"color {index}")
    if isinstance(value, list):
        return [vary(item, index) for item in value]
    if isinstance(value, dict):
        return {key: vary(item, index) for key, item in value.items()}
    return value


def rows_like(row: dict, count: int = 4) -> list[dict]:
    """`count` distinct rows shaped like `row`."""
    return [vary(row, index) for index in range(count)]


def all_pairs(data):
    return sorted(data.train + data.eval, key=lambda pair: pair.source_index)


def expected_prompt(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", list(LAYOUT_CASES))
def test_each_layout_is_detected_and_split(tmp_path, preference_file, byte_tokenizer, layout):
    row, prompt, chosen, rejected = LAYOUT_CASES[layout]
    data = build_preference_data(
        dataset_cfg(preference_file(rows_like(row)), tmp_path, eval_fraction=0.25), byte_tokenizer, seed=0
    )
    assert data.row_format == layout
    pairs = all_pairs(data)
    assert [pair.source_index for pair in pairs] == [0, 1, 2, 3]
    for index, pair in enumerate(pairs):
        assert pair.prompt == expected_prompt(byte_tokenizer, vary(prompt, index))
        assert (pair.chosen, pair.rejected) == (chosen, rejected)
        assert byte_tokenizer.decode(pair.prompt_ids) == pair.prompt  # the prompt is exactly the part not trained on


def test_trl_implicit_conversations_no_longer_mistaken_for_hh(tmp_path, preference_file, byte_tokenizer):
    """The issue's case: {chosen: [messages], rejected: [messages]} from parquet, no prompt column."""
    row = LAYOUT_CASES["implicit_messages"][0]
    data = build_preference_data(
        dataset_cfg(preference_file(rows_like(row), ".parquet"), tmp_path), byte_tokenizer, seed=0
    )
    assert data.row_format == "implicit_messages" and len(all_pairs(data)) == 4


@pytest.mark.parametrize(
    "chosen_tail, problem",
    [
        ([{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "More?"}], "holds: assistant, user"),
        ([], "holds: nothing"),
    ],
)
def test_implicit_conversation_needs_one_differing_assistant_turn(
    tmp_path, preference_file, byte_tokenizer, chosen_tail, problem
):
    good = rows_like(LAYOUT_CASES["implicit_messages"][0], 3)
    bad = {"chosen": USER + chosen_tail, "rejected": USER + [{"role": "assistant", "content": "No."}]}
    with pytest.raises(DataError) as error:
        build_preference_data(
            dataset_cfg(preference_file(good + [bad]), tmp_path, eval_fraction=0.25), byte_tokenizer, seed=0
        )
    assert "line 4" in str(error.value) and problem in str(error.value)


def test_implicit_texts_without_a_shared_prompt_are_bad_rows(tmp_path, preference_file, byte_tokenizer):
    good = rows_like(LAYOUT_CASES["implicit"][0], 3)
    with pytest.raises(DataError, match=r"line 4: chosen and rejected share no prompt.*dataset\.on_bad_row=skip"):
        build_preference_data(
            dataset_cfg(
                preference_file(good + [{"chosen": "Yes indeed", "rejected": "No way"}]), tmp_path, eval_fraction=0.25
            ),
            byte_tokenizer,
            seed=0,
        )


# ---------------------------------------------------------------- column mapping


def test_openrlhf_style_keys_map_onto_prompt_chosen_rejected(tmp_path, preference_file, byte_tokenizer):
    rows = [{"question": f"Q{i}?", "good": f"Yes {i}.", "bad": "No."} for i in range(4)]
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    data = build_preference_data(dataset_cfg(preference_file(rows), tmp_path, columns=columns), byte_tokenizer, seed=0)
    assert data.row_format == "strings"
    for pair in all_pairs(data):
        assert pair.prompt == expected_prompt(byte_tokenizer, [{"role": "user", "content": f"Q{pair.source_index}?"}])
        assert (pair.chosen, pair.rejected) == (f"Yes {pair.source_index}.", "No.")


def test_llama_factory_alpaca_instruction_and_input_join(tmp_path, preference_file, byte_tokenizer):
    rows = [
        {"instruction": f"Translate {i}.", "input": "bonjour" if i % 2 else "", "chosen": "hello", "rejected": "bye"}
        for i in range(4)
    ]
    columns = {"prompt": ["instruction", "input"]}
    data = build_preference_data(
        dataset_cfg(preference_file(rows), tmp_path, columns=columns, chat_template="never"), byte_tokenizer, 0
    )
    assert [pair.prompt for pair in all_pairs(data)] == [
        "Translate 0.",
        "Translate 1.\nbonjour",
        "Translate 2.",
        "Translate 3.\nbonjour",
    ]


def test_llama_factory_sharegpt_messages(tmp_path, preference_file, byte_tokenizer):
    rows = [
        {
            "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"Color {i}?"}],
            "chosen": {"from": "gpt", "value": "Blue."},
            "rejected": {"from": "gpt", "value": "No."},
        }
        for i in range(4)
    ]
    data = build_preference_data(
        dataset_cfg(preference_file(rows), tmp_path, columns={"prompt": "conversations"}), byte_tokenizer, 0
    )
    assert data.row_format == "messages"
    for pair in all_pairs(data):
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Color {pair.source_index}?"},
        ]
        assert pair.prompt == expected_prompt(byte_tokenizer, messages) and pair.chosen == "Blue."


def test_mapping_a_column_the_data_lacks_names_key_and_columns(tmp_path, preference_file, byte_tokenizer):
    rows = [{"question": "Q?", "good": "Yes.", "bad": "No."}] * 3
    with pytest.raises(DataError) as error:
        build_preference_data(
            dataset_cfg(preference_file(rows), tmp_path, columns={"chosen": "better"}), byte_tokenizer, 0
        )
    message = str(error.value)
    assert "dataset.columns.chosen names column 'better'" in message and "bad, good, question" in message


@pytest.mark.parametrize(
    "columns, key", [({"prompt": [""]}, "dataset.columns.prompt"), ({"rejected": 3}, "dataset.columns.rejected")]
)
def test_bad_column_settings_are_config_errors(columns, key):
    with pytest.raises(ConfigError, match=key):
        ColumnMap.from_config(OmegaConf.create(columns))


# ---------------------------------------------------------------- files and directories through `datasets`


def test_csv_keeps_every_cell_as_text(tmp_path, byte_tokenizer):
    path = tmp_path / "pairs.csv"
    path.write_text('prompt,chosen,rejected,answer\n"Say 007, please",007,NA,007\n"Two\nlines?",yes,no,\n1+1,2,3,2\n')
    data = build_preference_data(
        dataset_cfg(path, tmp_path, chat_template="never", eval_fraction=0.0), byte_tokenizer, 0
    )
    triples = [(pair.prompt, pair.chosen, pair.rejected, pair.answer) for pair in all_pairs(data)]
    assert triples == [
        ("Say 007, please", "007", "NA", "007"),
        ("Two\nlines?", "yes", "no", None),
        ("1+1", "2", "3", "2"),
    ]


def test_glob_reads_every_file_and_names_the_file_of_a_bad_row(tmp_path, byte_tokenizer):
    rows = rows_like(LAYOUT_CASES["strings"][0], 4)
    (tmp_path / "part-a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))
    (tmp_path / "part-b.jsonl").write_text(json.dumps(rows[2]) + "\n" + json.dumps(rows[3]) + "\n")
    data = build_preference_data(
        dataset_cfg(tmp_path / "part-*.jsonl", tmp_path, eval_fraction=0.25), byte_tokenizer, 0
    )
    assert [pair.chosen for pair in all_pairs(data)] == ["Blue."] * 4 and data.cache == "miss"
    (tmp_path / "part-b.jsonl").write_text(
        json.dumps(rows[2]) + "\n" + json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n"
    )
    with pytest.raises(
        DataError, match=r"files .*part-\*\.jsonl \(2 files\).*part-b\.jsonl, line 2: chosen and rejected"
    ):
        build_preference_data(dataset_cfg(tmp_path / "part-*.jsonl", tmp_path, eval_fraction=0.25), byte_tokenizer, 0)
    with pytest.raises(DataError, match="matches no file"):
        build_preference_data(dataset_cfg(tmp_path / "nothing-*.jsonl", tmp_path), byte_tokenizer, 0)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, byte_tokenizer):
    import datasets

    rows = rows_like(LAYOUT_CASES["strings"][0], 4)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    data = build_preference_data(dataset_cfg(tmp_path / "one", tmp_path, eval_fraction=0.25), byte_tokenizer, 0)
    assert (len(data.train), len(data.eval)) == (3, 1)
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list(rows), test=datasets.Dataset.from_list(rows[:2]))
    splits.save_to_disk(str(tmp_path / "dict"))
    data = build_preference_data(dataset_cfg(tmp_path / "dict", tmp_path, eval_split="test"), byte_tokenizer, 0)
    assert (len(data.train), len(data.eval)) == (4, 2)
    with pytest.raises(DataError, match=r"has no split 'validation' \(it has: train, test\)"):
        build_preference_data(dataset_cfg(tmp_path / "dict", tmp_path, eval_split="validation"), byte_tokenizer, 0)


def test_subset_is_a_config_name_of_a_dataset_repository(tmp_path, byte_tokenizer):
    repo = tmp_path / "repo"
    for config in ("alpha", "beta"):
        (repo / config).mkdir(parents=True)
        rows = [{"prompt": f"{config} {i}?", "chosen": "yes", "rejected": "no"} for i in range(3)]
        (repo / config / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train.jsonl\n"
        for name in ("alpha", "beta")
    )
    (repo / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    for subset in ("alpha", "beta"):
        data = build_preference_data(
            dataset_cfg(repo, tmp_path, subset=subset, eval_split=None, chat_template="never"), byte_tokenizer, 0
        )
        assert {pair.prompt.split()[0] for pair in all_pairs(data)} == {subset}
    with pytest.raises(DataError, match=r"subset gamma.*BuilderConfig 'gamma' not found"):
        build_preference_data(dataset_cfg(repo, tmp_path, subset="gamma", eval_split=None), byte_tokenizer, 0)


def test_hub_subset_goes_to_load_dataset_as_the_config_name(tmp_path, byte_tokenizer, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **options):
        calls.append((path, name, options))
        return datasets.Dataset.from_list(rows_like(LAYOUT_CASES["strings"][0], 4))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr("prefopt.data.hub.hub_reachable", lambda: False)
    cfg = dataset_cfg("org/prefs", tmp_path, name="ultrafeedback", subset="default", data_dir="v2", eval_split="test")
    build_preference_data(cfg, byte_tokenizer, 0)
    assert calls == [
        ("org/prefs", "default", {"data_dir": "v2", "split": "train"}),
        ("org/prefs", "default", {"data_dir": "v2", "split": "test"}),
    ]


# ---------------------------------------------------------------- undetectable layouts


def test_undetectable_layout_names_layouts_columns_and_column_keys(tmp_path, preference_file, byte_tokenizer):
    path = preference_file([{"question": "q", "good": "a", "bad": "b"}] * 3)
    with pytest.raises(DataError) as error:
        build_preference_data(dataset_cfg(path, tmp_path), byte_tokenizer, 0)
    message = str(error.value)
    assert "Found: bad, good, question" in message
    for layout in ("strings:", "implicit:", "hh:", "messages:", "implicit_messages:"):
        assert layout in message
    assert "dataset.columns.prompt=<column>" in message and "dataset.columns.chosen=<column>" in message
    assert "on_bad_row" not in message


def test_a_layout_no_row_fits_is_a_layout_error_not_bad_rows(tmp_path, preference_file, byte_tokenizer):
    """Every row would be skipped: the error is about the layout and never advises on_bad_row=skip."""
    path = preference_file(rows_like(LAYOUT_CASES["implicit_messages"][0]))
    with pytest.raises(DataError) as error:
        build_preference_data(dataset_cfg(path, tmp_path, format="hh", eval_fraction=0.0), byte_tokenizer, 0)
    message = str(error.value)
    assert "With dataset.format=hh, none of the first 4 rows makes a pair" in message
    assert "(line 1 and 3 more: field 'chosen' must be a string" in message and "dataset.columns." in message
    assert "on_bad_row" not in message


# ---------------------------------------------------------------- tokenized pairs cache


@pytest.fixture
def tokenizer_calls(monkeypatch):
    """How many times rows were tokenized (PairEncoder's one tokenizer entry point)."""
    calls = []
    original = PairEncoder.token_ids

    def counting(self, texts):
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(PairEncoder, "token_ids", counting)
    return calls


def cache_files(tmp_path):
    return sorted((tmp_path / "tokenized").glob("pairs-*.pt"))


def as_tuples(data):
    return [
        (p.prompt_ids, p.chosen_ids, p.rejected_ids, p.prompt, p.chosen, p.rejected, p.answer, p.source_index)
        for p in data.train + data.eval
    ]


def test_second_load_hits_the_cache_and_a_changed_setting_misses(
    tmp_path, preference_file, byte_tokenizer, bos_byte_tokenizer, tokenizer_calls
):
    path = preference_file(rows_like(LAYOUT_CASES["strings"][0], 8))
    first = build_preference_data(dataset_cfg(path, tmp_path), byte_tokenizer, 0)
    assert first.cache == "miss" and tokenizer_calls and len(cache_files(tmp_path)) == 1
    tokenizer_calls.clear()
    second = build_preference_data(dataset_cfg(path, tmp_path), byte_tokenizer, 0)
    assert second.cache == "hit" and not tokenizer_calls  # nothing tokenized
    assert (
        as_tuples(second) == as_tuples(first) and second.stats == first.stats and second.row_format == first.row_format
    )
    for changed in (
        dict(max_length=64),
        dict(max_prompt_length=8),
        dict(max_completion_length=3),
        dict(truncation_mode="keep_start"),
        dict(chat_template="never"),
    ):
        tokenizer_calls.clear()
        assert (
            build_preference_data(dataset_cfg(path, tmp_path, **changed), byte_tokenizer, 0).cache == "miss"
            and tokenizer_calls
        ), changed
    tokenizer_calls.clear()  # when a warning is said does not change a pair
    assert (
        build_preference_data(dataset_cfg(path, tmp_path, warn_truncated_share=1.0), byte_tokenizer, 0).cache == "hit"
    )
    tokenizer_calls.clear()
    assert (
        build_preference_data(dataset_cfg(path, tmp_path), bos_byte_tokenizer, 0).cache == "miss" and tokenizer_calls
    )  # another tokenizer
    assert (
        build_preference_data(dataset_cfg(path, tmp_path), byte_tokenizer, 1).cache == "miss"
    )  # another held-out split
    path.write_text(path.read_text().replace("Blue.", "Green."))  # the same file, new content
    changed = build_preference_data(dataset_cfg(path, tmp_path), byte_tokenizer, 0)
    assert changed.cache == "miss" and {pair.chosen for pair in all_pairs(changed)} == {"Green."}


def test_corrupt_or_altered_entries_are_rebuilt(tmp_path, preference_file, byte_tokenizer, tokenizer_calls, caplog):
    path = preference_file(rows_like(LAYOUT_CASES["strings"][0], 8))
    first = build_preference_data(dataset_cfg(path, tmp_path), byte_tokenizer, 0)
    [entry] = cache_files(tmp_path)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        rebuilt = build_preference_data(dataset_cfg(path, tmp_path), byte_tokenizer, 0)
    assert rebuilt.cache == "miss" and "corrupt or mismatched" in caplog.text and as_tuples(rebuilt) == as_tuples(first)
    stored = torch.load(entry, weights_only=True)
    stored["splits"]["train"]["ids"][0] += 1  # a token changed, digest left as it was
    torch.save(stored, entry)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        rebuilt = build_preference_data(dataset_cfg(path, tmp_path), byte_tokenizer, 0)
    assert (
        rebuilt.cache == "miss"
        and "do not match their stored digest" in caplog.text
        and as_tuples(rebuilt) == as_tuples(first)
    )
    assert build_preference_data(dataset_cfg(path, tmp_path), byte_tokenizer, 0).cache == "hit"


def test_a_hit_repeats_the_skipped_rows_warning(tmp_path, preference_file, byte_tokenizer, caplog):
    rows = rows_like(LAYOUT_CASES["strings"][0], 4) + [{"prompt": "q", "chosen": "same", "rejected": "same"}]
    cfg = dataset_cfg(preference_file(rows), tmp_path, on_bad_row="skip", eval_fraction=0.0)
    for expected in ("miss", "hit"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="prefopt.data"):
            data = build_preference_data(cfg, byte_tokenizer, 0)
        assert data.cache == expected and data.stats["train/skipped_bad_rows"] == 1
        assert "skipped 1 bad rows, e.g. line 5: chosen and rejected responses are identical" in caplog.text


def test_cache_off_and_generated_data_are_not_cached(tmp_path, preference_file, byte_tokenizer):
    path = preference_file(rows_like(LAYOUT_CASES["strings"][0]))
    assert build_preference_data(dataset_cfg(path, tmp_path, cache_dir=None), byte_tokenizer, 0).cache == "off"
    arith = dataset_node(arith={"num_train": 4, "num_eval": 2}, cache_dir=str(tmp_path / "tokenized"))
    assert build_preference_data(arith, byte_tokenizer, 0).cache == "off" and not cache_files(tmp_path)
