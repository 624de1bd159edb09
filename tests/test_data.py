"""Data pipeline: sources, formats, bad rows, tokenization boundaries, truncation, collate, arith."""

from __future__ import annotations

import json
import logging
import time

import pytest

from prefopt.core.errors import ConfigError
from prefopt.data import DataError, answer_is_correct, build_preference_data, collate_pairs, collate_sequences
from prefopt.data.formats import BadRow, split_hh_transcripts
from prefopt.data.identity import data_identity
from prefopt.data.tokenize import IGNORE_INDEX
from prefopt.data.truncation import TruncationLimits, truncate_pair
from tests.helpers import dataset_node

HH_TRANSCRIPTS = [
    ("\n\nHuman: Hi\n\nAssistant: Hello!", "\n\nHuman: Hi\n\nAssistant: Go away."),
    (
        "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
        "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 7.",
    ),
    ("\n\nHuman: Name a color\n\nAssistant: Blue", "\n\nHuman: Name a color\n\nAssistant: I won't."),
    ("\n\nHuman: Say yes\n\nAssistant: Yes", "\n\nHuman: Say yes\n\nAssistant: No"),
]
STRING_ROWS = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}"} for i in range(4)]
MESSAGE_ROWS = [
    {
        "prompt": [{"role": "user", "content": f"Question {i}?"}],
        "chosen": [{"role": "assistant", "content": f"Good answer {i}."}],
        "rejected": [{"role": "assistant", "content": f"Bad {i}"}],
    }
    for i in range(4)
]
HH_ROWS = [{"chosen": chosen, "rejected": rejected} for chosen, rejected in HH_TRANSCRIPTS]
ROWS_BY_FORMAT = {"strings": STRING_ROWS, "messages": MESSAGE_ROWS, "hh": HH_ROWS}


def dataset_cfg(**overrides):
    arith = overrides.pop("arith", {})
    return dataset_node(arith=arith, **overrides)


def local_cfg(path, **overrides):
    return dataset_cfg(name=overrides.pop("name", "local"), path=str(path), **overrides)


def all_pairs(data):
    return data.train + data.eval


# ---------------------------------------------------------------- formats and files


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
@pytest.mark.parametrize("row_format", ["strings", "messages", "hh"])
def test_each_format_from_each_file_type(preference_file, byte_tokenizer, row_format, suffix):
    rows = ROWS_BY_FORMAT[row_format]
    data = build_preference_data(local_cfg(preference_file(rows, suffix), eval_fraction=0.25), byte_tokenizer, seed=0)
    assert data.row_format == row_format
    assert (len(data.train), len(data.eval)) == (3, 1)
    assert data.stats["train/pairs"] == 3 and data.stats["eval/pairs"] == 1
    assert sorted(pair.source_index for pair in all_pairs(data)) == [0, 1, 2, 3]
    for pair in all_pairs(data):
        if row_format == "hh":
            assert pair.prompt.endswith("\n\nAssistant:") and "<|im_start|>" not in pair.prompt
            chosen, _ = HH_TRANSCRIPTS[pair.source_index]
            assert pair.prompt + pair.chosen == chosen
        else:
            assert pair.prompt == f"<|im_start|>user\nQuestion {pair.source_index}?<|im_end|>\n<|im_start|>assistant\n"
            assert pair.chosen == f"Good answer {pair.source_index}."
        assert pair.answer is None


def test_json_file_may_hold_json_lines(tmp_path, byte_tokenizer):
    path = tmp_path / "pairs.json"
    path.write_text("".join(json.dumps(row) + "\n" for row in STRING_ROWS))
    data = build_preference_data(local_cfg(path), byte_tokenizer, seed=0)
    assert len(all_pairs(data)) == 4


def test_hold_out_is_deterministic_by_seed(preference_file, byte_tokenizer):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(40)]
    path = preference_file(rows)

    def eval_indices(seed):
        return [pair.source_index for pair in build_preference_data(local_cfg(path), byte_tokenizer, seed).eval]

    assert eval_indices(0) == eval_indices(0)
    assert len(eval_indices(0)) == 4 and eval_indices(0) != eval_indices(1)


def test_hh_parser_multi_turn():
    prompt, chosen, rejected = split_hh_transcripts(*HH_TRANSCRIPTS[1])
    assert prompt == "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    assert (chosen, rejected) == (" 6.", " 7.")  # the leading space stays with the response


@pytest.mark.parametrize(
    "chosen, rejected, problem",
    [
        ("\n\nHuman: Hi\n\nAssistant: Hello", "\n\nHuman: Hey\n\nAssistant: Go away", "does not start with"),
        ("\n\nHuman: Hi there", "\n\nHuman: Hi\n\nAssistant: x", "no '\\n\\nAssistant:' turn"),
    ],
)
def test_hh_parser_rejects_pairs_without_shared_prompt(chosen, rejected, problem):
    with pytest.raises(BadRow, match=problem.replace("\\", "\\\\")):
        split_hh_transcripts(chosen, rejected)


def test_ultrafeedback_rows_from_local_file(preference_file, smollm2_tokenizer):
    rows = [
        {
            "prompt": f"Write {i} words.",
            "prompt_id": f"id{i}",
            "chosen": [
                {"role": "user", "content": f"Write {i} words."},
                {"role": "assistant", "content": "Sure: one two."},
            ],
            "rejected": [{"role": "user", "content": f"Write {i} words."}, {"role": "assistant", "content": "No."}],
            "score_chosen": 8.0,
            "score_rejected": 2.0,
        }
        for i in range(5)
    ]
    cfg = local_cfg(preference_file(rows, ".parquet"), name="ultrafeedback", eval_fraction=0.2)
    data = build_preference_data(cfg, smollm2_tokenizer, seed=0)
    assert data.row_format == "messages" and len(all_pairs(data)) == 5
    for pair in all_pairs(data):
        user_turn = [{"role": "user", "content": f"Write {pair.source_index} words."}]  # stripped from the responses
        expected = smollm2_tokenizer.apply_chat_template(user_turn, tokenize=False, add_generation_prompt=True)
        assert pair.prompt == expected
        assert (pair.chosen, pair.rejected) == ("Sure: one two.", "No.")


def test_hh_rlhf_rows_from_local_file(preference_file, byte_tokenizer):
    cfg = local_cfg(preference_file(HH_ROWS), name="hh_rlhf", subset="helpful-base", eval_fraction=0.25)
    data = build_preference_data(cfg, byte_tokenizer, seed=0)
    assert data.row_format == "hh" and len(all_pairs(data)) == 4


def test_hub_dataset_offline_fails_fast_with_local_path_hint(byte_tokenizer):
    cfg = dataset_cfg(name="hh_rlhf", path="prefopt-test/no-such-dataset", subset="helpful-base")
    started = time.monotonic()
    with pytest.raises(DataError, match="dataset.path=") as error:
        build_preference_data(cfg, byte_tokenizer, seed=0)
    assert time.monotonic() - started < 10
    assert "prefopt-test/no-such-dataset" in str(error.value) and "split train" in str(error.value)


def test_missing_file(tmp_path, byte_tokenizer):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match="absent.jsonl.*does not exist"):
        build_preference_data(local_cfg(path), byte_tokenizer, seed=0)
    with pytest.raises(DataError, match="does not exist"):  # a local-looking path is never sent to the hub
        build_preference_data(local_cfg(path, name="hh_rlhf"), byte_tokenizer, seed=0)


def test_wrong_columns_lists_found_and_expected(preference_file, byte_tokenizer):
    path = preference_file([{"question": "q", "good": "a", "bad": "b"}] * 3)
    with pytest.raises(DataError) as error:
        build_preference_data(local_cfg(path), byte_tokenizer, seed=0)
    message = str(error.value)
    assert "pairs.jsonl" in message and "Found: bad, good, question" in message
    for expected in ("strings: prompt, chosen, rejected", "messages: prompt", "hh: chosen, rejected"):
        assert expected in message


def test_explicit_format_checks_its_columns(preference_file, byte_tokenizer):
    with pytest.raises(DataError, match="dataset.format=strings expects prompt, chosen, rejected"):
        build_preference_data(local_cfg(preference_file(HH_ROWS), format="strings"), byte_tokenizer, seed=0)


# ---------------------------------------------------------------- bad rows

BAD_ROWS = {
    "missing field 'rejected'": {"prompt": "q", "chosen": "a"},
    "field 'chosen' must be a string": {"prompt": "q", "chosen": ["a"], "rejected": "b"},
    "the rejected response is empty": {"prompt": "q", "chosen": "a", "rejected": "  \n"},
    "identical": {"prompt": "q", "chosen": "same", "rejected": "same"},
    "must be an object with named fields": ["q", "a", "b"],
}


@pytest.mark.parametrize("problem", list(BAD_ROWS))
def test_bad_row_is_an_error_naming_file_and_row(preference_file, byte_tokenizer, problem):
    rows = STRING_ROWS[:2] + [BAD_ROWS[problem]] + STRING_ROWS[2:]
    with pytest.raises(DataError) as error:
        build_preference_data(local_cfg(preference_file(rows), eval_fraction=0.2), byte_tokenizer, seed=0)
    message = str(error.value)
    assert "pairs.jsonl" in message and "line 3:" in message and problem in message  # the file's 3rd line
    assert "dataset.on_bad_row=skip" in message


@pytest.mark.parametrize(
    "bad_row, problem",
    [
        (
            {"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "b"}]},
            "message 0",
        ),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "must end with an assistant"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string or a list"),
    ],
)
def test_malformed_message_rows(preference_file, byte_tokenizer, bad_row, problem):
    path = preference_file(MESSAGE_ROWS[:3] + [bad_row], ".json")
    with pytest.raises(DataError, match=f"pairs.json.*row 4: .*{problem}"):  # the list's 4th row
        build_preference_data(local_cfg(path, eval_fraction=0.25), byte_tokenizer, seed=0)


def test_skip_mode_counts_bad_rows(preference_file, byte_tokenizer, caplog):
    rows = STRING_ROWS + [row for row in BAD_ROWS.values()]
    cfg = local_cfg(preference_file(rows), on_bad_row="skip", eval_fraction=0.3)
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        data = build_preference_data(cfg, byte_tokenizer, seed=0)
    assert data.stats["train/skipped_bad_rows"] + data.stats["eval/skipped_bad_rows"] == len(BAD_ROWS)
    assert sorted(pair.source_index for pair in all_pairs(data)) == [0, 1, 2, 3]
    assert "skipped" in caplog.text and "pairs.jsonl" in caplog.text


# ---------------------------------------------------------------- tokenization boundaries


def check_pair_tokens(pair, tokenizer):
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id and pair.rejected_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pair.chosen_ids[:-1]) == pair.chosen
    batch = collate_pairs([pair], tokenizer.pad_token_id)
    prompt_length = len(pair.prompt_ids)
    assert batch["input_ids"][0, :prompt_length].tolist() == pair.prompt_ids  # an exact prefix
    assert (batch["labels"][:, :prompt_length] == IGNORE_INDEX).all()


def test_smollm2_prompt_is_exact_prefix_and_no_bos_added(smollm2_tokenizer):
    data = build_preference_data(dataset_cfg(arith={"num_train": 4, "num_eval": 2}), smollm2_tokenizer, seed=0)
    for pair in all_pairs(data):
        assert pair.prompt.startswith("<|im_start|>system\n") and pair.prompt.endswith("<|im_start|>assistant\n")
        assert pair.prompt_ids == smollm2_tokenizer(pair.prompt, add_special_tokens=False).input_ids
        joint = smollm2_tokenizer(pair.prompt + pair.chosen + "<|im_end|>", add_special_tokens=False).input_ids
        assert pair.prompt_ids + pair.chosen_ids == joint
        check_pair_tokens(pair, smollm2_tokenizer)


@pytest.mark.parametrize("chat_template", ["auto", "never"])
def test_exactly_one_bos(bos_byte_tokenizer, chat_template):
    tokenizer = bos_byte_tokenizer
    data = build_preference_data(
        dataset_cfg(chat_template=chat_template, arith={"num_train": 4, "num_eval": 2}), tokenizer, 0
    )
    for pair in all_pairs(data):
        assert pair.prompt_ids[0] == tokenizer.bos_token_id
        assert pair.prompt_ids.count(tokenizer.bos_token_id) == 1
        assert pair.prompt.startswith("<|bos|>") == (chat_template == "auto")  # the template wrote it as text
        check_pair_tokens(pair, tokenizer)


def test_hh_with_bos_tokenizer_gets_one_bos(preference_file, bos_byte_tokenizer):
    data = build_preference_data(local_cfg(preference_file(HH_ROWS), eval_fraction=0.25), bos_byte_tokenizer, 0)
    for pair in all_pairs(data):
        assert (
            pair.prompt_ids.count(bos_byte_tokenizer.bos_token_id) == 1
            and pair.prompt_ids[0] == bos_byte_tokenizer.bos_token_id
        )


def test_chat_template_never_keeps_raw_prompt(preference_file, byte_tokenizer):
    data = build_preference_data(local_cfg(preference_file(STRING_ROWS), chat_template="never"), byte_tokenizer, 0)
    assert {pair.prompt for pair in all_pairs(data)} == {row["prompt"] for row in STRING_ROWS}


def test_messages_format_needs_a_chat_template(preference_file, byte_tokenizer):
    with pytest.raises(ConfigError, match="dataset.format=messages"):
        build_preference_data(local_cfg(preference_file(MESSAGE_ROWS), chat_template="never"), byte_tokenizer, 0)


# ---------------------------------------------------------------- truncation


def cut(prompt, chosen, rejected, max_length, max_prompt_length, bos_id=None, completion=None, mode="keep_end"):
    """truncate_pair as (prompt, chosen, rejected, truncated), or None."""
    limits = TruncationLimits(max_length, max_prompt_length, completion, mode)
    pair = truncate_pair(prompt, chosen, rejected, limits, bos_id)
    return None if pair is None else (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, pair.truncated)


def test_truncate_cuts_prompt_from_left_keeping_bos():
    assert cut([9, 1, 2, 3, 4, 5], [6, 7], [8], 6, 3, bos_id=9) == ([9, 4, 5], [6, 7], [8], True)
    assert cut([1, 2, 3, 4, 5], [6, 7], [8], 6, 3, bos_id=9)[0] == [3, 4, 5]


def test_truncate_keep_start_keeps_the_prompts_start():
    assert cut([9, 1, 2, 3, 4, 5], [6, 7], [8], 6, 3, bos_id=9, mode="keep_start") == ([9, 1, 2], [6, 7], [8], True)
    assert cut([1, 2, 3, 4, 5], [6, 7, 8, 9], [8], 6, 3, mode="keep_start") == ([1, 2, 3], [6, 7, 8], [8], True)


def test_truncate_cuts_responses_from_right_and_leaves_short_pairs_alone():
    assert cut([1, 2], [3, 4, 5, 6, 7], [8, 9], 4, 2) == ([1, 2], [3, 4], [8, 9], True)
    assert cut([1, 2], [3, 4], [5], 4, 2) == ([1, 2], [3, 4], [5], False)
    assert cut([1, 2, 3], [4], [5, 6], 3, 3) is None  # no room left for a response


@pytest.mark.parametrize(
    "mode, prompt",
    [("keep_end", [3, 4, 5, 6]), ("keep_start", [1, 2, 3, 4])],
)
def test_max_completion_length_cuts_each_response_before_max_length(mode, prompt):
    limits = TruncationLimits(max_length=10, max_prompt_length=5, max_completion_length=2, mode=mode)
    alone = truncate_pair([1, 2], [3, 4, 5, 6, 7], [8, 9], limits, None)  # fits max_length once cut to 2
    assert (alone.prompt_ids, alone.chosen_ids, alone.rejected_ids) == ([1, 2], [3, 4], [8, 9])
    assert (alone.prompt_cut, alone.responses_cut, alone.by_completion_length) == (False, True, True)
    # 6 prompt + 3 (chosen cut to max_completion_length=3) > 8: the prompt goes to 4, then 4 response tokens fit
    limits = TruncationLimits(max_length=8, max_prompt_length=4, max_completion_length=3, mode=mode)
    both = truncate_pair([1, 2, 3, 4, 5, 6], [7, 8, 9, 10], [11], limits, None)
    assert (both.prompt_ids, both.chosen_ids, both.rejected_ids) == (prompt, [7, 8, 9], [11])
    assert both.by_completion_length and both.responses_cut and both.prompt_cut
    budget = truncate_pair([1, 2, 3, 4, 5, 6], [7, 8, 9], [10], limits, None)  # 6 + 3 > 8; 4 + 3 fit: prompt only
    assert (budget.prompt_ids, budget.chosen_ids) == (prompt, [7, 8, 9])
    assert (budget.prompt_cut, budget.responses_cut, budget.by_completion_length) == (True, False, False)
    short = truncate_pair([1], [2, 3], [4], limits, None)  # within every limit
    assert not short.truncated and (short.prompt_ids, short.chosen_ids, short.rejected_ids) == ([1], [2, 3], [4])


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("mode, kept_prompt", [("keep_end", "efghij"), ("keep_start", "abcdef")])
def test_pipeline_truncation_token_ids_and_counts(preference_file, byte_tokenizer, mode, kept_prompt):
    """Raw text, byte tokens: prompt 10, chosen 6 + EOS, rejected 2 + EOS. max_completion_length=4 cuts chosen to
    "KLMN"; 10 + 4 > max_length=12 cuts the prompt to max_prompt_length=6 (by mode); 6 response tokens fit."""
    rows = [
        {"prompt": "abcdefghij", "chosen": "KLMNOP", "rejected": "xy"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ]
    limits = dict(max_length=12, max_prompt_length=6, max_completion_length=4, truncation_mode=mode)
    cfg = local_cfg(preference_file(rows), chat_template="never", eval_fraction=0.0, cache_dir=None, **limits)
    data = build_preference_data(cfg, byte_tokenizer, 0)
    long = next(pair for pair in data.train if pair.source_index == 0)
    eos = byte_tokenizer.eos_token_id
    assert long.prompt_ids == ids(byte_tokenizer, kept_prompt)
    assert long.chosen_ids == ids(byte_tokenizer, "KLMN")  # its end-of-turn token cut off with "OP"
    assert long.rejected_ids == ids(byte_tokenizer, "xy") + [eos]
    short = next(pair for pair in data.train if pair.source_index == 1)
    assert short.chosen_ids == ids(byte_tokenizer, "a") + [eos]
    expected = dict(
        truncated=1, truncated_share=0.5, truncated_prompts=1, truncated_responses=1, truncated_by_completion_length=1
    )
    assert {key: data.stats[f"train/{key}"] for key in expected} == expected
    unlimited = build_preference_data(
        local_cfg(
            preference_file(rows),
            chat_template="never",
            eval_fraction=0.0,
            cache_dir=None,
            **{**limits, "max_completion_length": None},
        ),
        byte_tokenizer,
        0,
    )
    assert data_identity(unlimited)["train"] != data_identity(data)["train"]  # what a resume compares


@pytest.mark.parametrize("share, warned", [(0.5, True), (0.75, False)])
def test_truncation_warning_above_the_share_only(preference_file, byte_tokenizer, caplog, share, warned):
    rows = [{"prompt": "p" * 40, "chosen": "c", "rejected": "r"}] * 3 + [
        {"prompt": "p", "chosen": "c", "rejected": "r"}
    ]
    cfg = local_cfg(
        preference_file(rows),
        chat_template="never",
        max_length=30,
        max_prompt_length=10,
        eval_fraction=0.0,
        cache_dir=None,
        warn_truncated_share=share,
    )
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        data = build_preference_data(cfg, byte_tokenizer, 0)
    assert data.stats["train/truncated_share"] == 0.75
    said = [record.getMessage() for record in caplog.records if "were truncated" in record.getMessage()]
    if warned:
        assert said == [
            "75% of train pairs (3/4) were truncated: 3 lost the start of their prompt (dataset.max_length=30 kept "
            "dataset.max_prompt_length=10 prompt tokens, dataset.truncation_mode=keep_end), 0 the end of a response "
            "and its end-of-turn token (dataset.max_length=30); raise those limits or set "
            "dataset.truncation_mode=keep_start, or set dataset.warn_truncated_share=1 to accept it"
        ]
    else:
        assert said == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        build_preference_data(cfg, byte_tokenizer, 0, announce=False)  # ranks other than 0
    assert not caplog.records


def test_truncation_counts_in_stats(preference_file, byte_tokenizer):
    rows = [{"prompt": "p" * 40, "chosen": "c" * 40, "rejected": "r"}, {"prompt": "p", "chosen": "c", "rejected": "r"}]
    cfg = local_cfg(
        preference_file(rows * 2), chat_template="never", max_length=30, max_prompt_length=10, eval_fraction=0.5
    )
    data = build_preference_data(cfg, byte_tokenizer, 0)
    assert data.stats["train/truncated"] + data.stats["eval/truncated"] == 2
    for pair in all_pairs(data):
        assert len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) <= 30
        if pair.source_index % 2 == 0:
            assert len(pair.prompt_ids) == 10 and len(pair.chosen_ids) == 20
            assert (
                pair.chosen_ids[-1] != byte_tokenizer.eos_token_id
                and pair.rejected_ids[-1] == byte_tokenizer.eos_token_id
            )


def test_pairs_left_without_response_are_dropped_counted_and_said(preference_file, byte_tokenizer, caplog):
    """Only a config validation refuses (max_prompt_length >= max_length) leaves a response empty: still loud."""
    rows = [{"prompt": "p" * 40, "chosen": "c", "rejected": "r"}] + STRING_ROWS
    cfg = local_cfg(
        preference_file(rows), chat_template="never", max_length=20, max_prompt_length=20, eval_fraction=0.2
    )
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        data = build_preference_data(cfg, byte_tokenizer, 0)
    assert data.stats["train/dropped_empty_response"] + data.stats["eval/dropped_empty_response"] == 1
    assert "1 train pairs were dropped" in caplog.text or "1 eval pairs were dropped" in caplog.text
    assert 0 not in [pair.source_index for pair in all_pairs(data)]


def test_caps_take_the_first_pairs(preference_file, byte_tokenizer):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(20)]
    cfg = local_cfg(preference_file(rows), max_train_examples=3, max_eval_examples=1, eval_fraction=0.5)
    data = build_preference_data(cfg, byte_tokenizer, 0)
    assert (len(data.train), len(data.eval), data.stats["train/pairs"]) == (3, 1, 3)
    assert [pair.source_index for pair in data.train] == sorted(pair.source_index for pair in data.train)


# ---------------------------------------------------------------- collate


def test_collate_shapes_padding_and_labels(byte_tokenizer):
    data = build_preference_data(dataset_cfg(arith={"num_train": 3, "num_eval": 1}), byte_tokenizer, 0)
    pairs = data.train
    batch = collate_pairs(pairs, pad_token_id=byte_tokenizer.pad_token_id)
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (6, width)
    assert batch["prompt_lengths"].tolist() == [len(prompt) for prompt, _ in sequences]
    assert batch["response_lengths"].tolist() == [len(response) for _, response in sequences]
    for row, (prompt, response) in enumerate(sequences):
        end = len(prompt) + len(response)
        assert batch["input_ids"][row, :end].tolist() == prompt + response
        assert (batch["input_ids"][row, end:] == byte_tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * end + [0] * (width - end)
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * len(prompt) + response + [IGNORE_INDEX] * (width - end)


def test_collate_sequences_for_unpaired_rows():
    batch = collate_sequences([[1, 2], [3]], [[4], [5, 6, 7]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 4, 0], [3, 5, 6, 7]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 4, IGNORE_INDEX], [IGNORE_INDEX, 5, 6, 7]]
    assert batch["prompt_lengths"].tolist() == [2, 1] and batch["response_lengths"].tolist() == [1, 3]


# ---------------------------------------------------------------- arith


def arith_data(tokenizer, seed, **arith):
    return build_preference_data(dataset_cfg(arith={"num_train": 50, "num_eval": 10, **arith}), tokenizer, seed)


def test_arith_is_deterministic_per_seed_and_held_out(byte_tokenizer):
    first, again, other = (arith_data(byte_tokenizer, seed) for seed in (0, 0, 1))
    texts = lambda data: [(p.prompt, p.chosen, p.rejected) for p in data.train + data.eval]  # noqa: E731
    assert texts(first) == texts(again) and texts(first) != texts(other)
    assert (len(first.train), len(first.eval)) == (50, 10)
    assert not {p.prompt for p in first.train} & {p.prompt for p in first.eval}
    for pair in first.train:
        assert answer_is_correct(pair.chosen, pair.answer)
        assert not answer_is_correct(pair.rejected, pair.answer)
        assert 0 < abs(int(pair.rejected.rsplit("= ", 1)[1]) - int(pair.answer)) <= 3


def test_arith_offpolicy_rejected_is_in_an_unusual_format(byte_tokenizer):
    data = arith_data(byte_tokenizer, 0, rejected_style="offpolicy", operations=["+", "-", "*"])
    for pair in data.train:
        assert " = " not in pair.rejected and not answer_is_correct(pair.rejected, pair.answer)
    assert {op for p in data.train for op in "+-*" if f" {op} " in p.chosen} == {"+", "-", "*"}


def test_arith_needs_enough_questions(byte_tokenizer):
    with pytest.raises(ConfigError, match="dataset.arith.max_operand"):
        arith_data(byte_tokenizer, 0, max_operand=3)


@pytest.mark.parametrize(
    "text, answer, correct",
    [
        ("2 + 3 = 5", "5", True),
        ("The answer is 5.", "5", True),
        ("5", "5", True),
        ("2 + 3 = 5<|im_end|>", "5", True),
        ("2 + 3 = 6", "5", False),
        ("2 + 3 =", "3", False),
        ("I don't know", "5", False),
        ("The answer is 15.", "5", False),
    ],
)
def test_answer_is_correct(text, answer, correct):
    assert answer_is_correct(text, answer) is correct
