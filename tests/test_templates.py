"""Chat templates in the data pipeline: each trained sequence is the template's own rendering of the
conversation, tokenized in one go; responses end the way the template ends a turn; a prompt string
that is already templated is not wrapped twice; generation stops where a turn ends.

Every tokenizer here is built in code (no download) to carry one trap: a base-model EOS that is not
the template's turn end, a BOS written by the template and added by the tokenizer, a SentencePiece
dummy prefix, a BPE merge across the prompt/response boundary.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.data import DataError, build_preference_data
from prefopt.data.arith import generate_arith_rows
from prefopt.data.tokenize import end_of_turn_ids, template_turns
from prefopt.model.loading import CHATML_TEMPLATE
from prefopt.train.dynamics import greedy_generate
from tests.helpers import DATA_TEST_SETTINGS, dataset_node, preset
from tests.test_data import MESSAGE_ROWS, STRING_ROWS

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral-7B-Instruct-v0.1's template: the assistant content follows "[/INST]" with no space
INST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
CONF_DIR = Path(__file__).resolve().parents[1] / "prefopt" / "conf"


def byte_level_tokenizer(specials, template, eos, bos=None, add_bos=False, merges=()):
    """A byte-level BPE tokenizer (no regex split: BPE sees the whole text) with `merges` as its only merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(alphabet + [left + right for left, right in merges])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos)
    tokenizer.chat_template = template
    return tokenizer


def sentencepiece_tokenizer():
    """Llama-2 / Mistral style: Metaspace with the dummy prefix ("▁" before each text section not starting with a
    space), BOS added by the tokenizer and written by the [INST] template. Characters only, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "▁"] + sorted(set(string.printable) - {" "})
    backend = Tokenizer(
        models.BPE(vocab={piece: index for index, piece in enumerate(pieces)}, merges=[], unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tokenizer.chat_template = INST_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def chatml_base_tokenizer():
    """A base model's tokenizer (eos <|endoftext|>) shipping a ChatML template that ends turns with <|im_end|>."""
    return byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE, eos="<|endoftext|>")


@pytest.fixture(scope="module")
def llama3_tokenizer():
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return byte_level_tokenizer(specials, LLAMA3_TEMPLATE, eos="<|end_of_text|>", bos="<|begin_of_text|>", add_bos=True)


def local_cfg(path, **overrides):
    return dataset_node(name="local", path=str(path), **overrides)


def all_pairs(data):
    return data.train + data.eval


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def rendered_conversation(tokenizer, pair, response: str) -> str:
    """The template's rendering of the row's conversation with `response` as the assistant turn."""
    user = [{"role": "user", "content": f"Question {pair.source_index}?"}]
    return tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)


# ---------------------------------------------------------------- turn endings


@pytest.mark.parametrize("rows", [STRING_ROWS, MESSAGE_ROWS], ids=["strings", "messages"])
def test_chatml_on_base_eos_ends_responses_with_im_end(preference_file, chatml_base_tokenizer, rows):
    tokenizer = chatml_base_tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    data = build_preference_data(local_cfg(preference_file(rows), eval_fraction=0.25), tokenizer, seed=0)
    for pair in all_pairs(data):
        for response, response_ids in ((pair.chosen, pair.chosen_ids), (pair.rejected, pair.rejected_ids)):
            assert response_ids[-1] == im_end and tokenizer.eos_token_id not in response_ids
            # the template writes "<|im_end|>\n" after the content; the "\n" belongs to the next turn
            rendered = rendered_conversation(tokenizer, pair, response)
            assert rendered.endswith("<|im_end|>\n")
            assert pair.prompt_ids + response_ids == ids(tokenizer, rendered[: -len("\n")])
        assert data.stats["train/boundary_merges"] + data.stats["eval/boundary_merges"] == 0


def test_llama3_style_one_bos_and_eot_ending(preference_file, llama3_tokenizer):
    tokenizer = llama3_tokenizer
    assert (
        tokenizer("a").input_ids[0] == tokenizer.bos_token_id
    )  # the tokenizer adds a BOS, and the template writes one
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    data = build_preference_data(local_cfg(preference_file(STRING_ROWS), eval_fraction=0.25), tokenizer, seed=0)
    for pair in all_pairs(data):
        assert pair.prompt_ids[0] == tokenizer.bos_token_id and pair.prompt_ids.count(tokenizer.bos_token_id) == 1
        assert pair.chosen_ids[-1] == eot and pair.rejected_ids[-1] == eot
        assert pair.prompt_ids + pair.chosen_ids == ids(tokenizer, rendered_conversation(tokenizer, pair, pair.chosen))
        assert tokenizer.decode(pair.chosen_ids, skip_special_tokens=True) == pair.chosen


def test_template_turns_are_read_from_the_template(chatml_base_tokenizer, llama3_tokenizer, byte_tokenizer):
    chatml = template_turns(chatml_base_tokenizer)
    assert (chatml.user_markers, chatml.after_response, chatml.end_of_turn) == (
        ("<|im_start|>",),
        "<|im_end|>\n",
        "<|im_end|>",
    )
    llama3 = template_turns(llama3_tokenizer)
    assert (llama3.user_markers, llama3.end_of_turn) == (("<|start_header_id|>", "<|end_header_id|>"), "<|eot_id|>")
    assert template_turns(sentencepiece_tokenizer()).user_markers == ("[INST]",)  # plain-text markers, BOS left out
    # a template that writes no special token after the content: responses end with eos_token
    plain = byte_level_tokenizer(["<|im_end|>"], CHATML_TEMPLATE.replace("<|im_end|>", "\n"), eos="<|im_end|>")
    assert template_turns(plain).end_of_turn == "<|im_end|>"
    im_end = chatml_base_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(chatml_base_tokenizer) == [chatml_base_tokenizer.eos_token_id, im_end]
    assert end_of_turn_ids(byte_tokenizer) == [byte_tokenizer.eos_token_id]  # eos is the template's turn end already


def test_prompt_that_is_not_a_prefix_is_a_template_error(preference_file):
    # the generation prompt says "assistant:" but an assistant turn opens with "assistant\n"
    template = CHATML_TEMPLATE.replace("{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant:\n' }}")
    tokenizer = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], template, eos="<|endoftext|>")
    problem = r"pairs.jsonl \(train part\), line \d+: the tokenizer's chat template is at fault.*add_generation_prompt"
    with pytest.raises(DataError, match=problem):
        build_preference_data(local_cfg(preference_file(STRING_ROWS)), tokenizer, seed=0)


# ---------------------------------------------------------------- joint tokenization


def test_sentencepiece_response_has_no_dummy_prefix(preference_file):
    tokenizer = sentencepiece_tokenizer()
    dummy_prefix = tokenizer.convert_tokens_to_ids("▁")
    data = build_preference_data(local_cfg(preference_file(STRING_ROWS), eval_fraction=0.25), tokenizer, seed=0)
    for pair in all_pairs(data):
        assert pair.prompt_ids.count(tokenizer.bos_token_id) == 1 and pair.prompt_ids[0] == tokenizer.bos_token_id
        rendered = rendered_conversation(
            tokenizer, pair, pair.chosen
        )  # "<s>[INST] Question 0? [/INST]Good answer 0.</s>"
        assert pair.prompt_ids + pair.chosen_ids == ids(tokenizer, rendered)
        assert pair.chosen_ids[0] != dummy_prefix and pair.chosen_ids[-1] == tokenizer.eos_token_id
        # the old way, the response tokenized alone, starts with a "▁" the model never sees after "[/INST]"
        separate = ids(tokenizer, pair.chosen) + [tokenizer.eos_token_id]
        assert separate[0] == dummy_prefix and separate[1:] == pair.chosen_ids


def test_sentencepiece_without_template_has_no_dummy_prefix(preference_file):
    tokenizer = sentencepiece_tokenizer()
    dummy_prefix = tokenizer.convert_tokens_to_ids("▁")
    rows = [dict(row, prompt=row["prompt"] + "\n") for row in STRING_ROWS]  # the response starts a new line, no space
    data = build_preference_data(
        local_cfg(preference_file(rows), chat_template="never", eval_fraction=0.25), tokenizer, seed=0
    )
    for pair in all_pairs(data):
        assert pair.prompt == rows[pair.source_index]["prompt"]
        assert pair.prompt_ids == [tokenizer.bos_token_id] + ids(tokenizer, pair.prompt)
        assert pair.prompt_ids[1:] + pair.chosen_ids == ids(tokenizer, pair.prompt + pair.chosen + "</s>")
        assert pair.chosen_ids[0] != dummy_prefix and pair.chosen_ids[-1] == tokenizer.eos_token_id
        separate = ids(tokenizer, pair.chosen) + [tokenizer.eos_token_id]  # alone, "Good" would be "▁Good"
        assert separate[0] == dummy_prefix and separate[1:] == pair.chosen_ids


def test_boundary_merge_moves_the_boundary_and_is_counted(preference_file):
    # BPE merges "a"+"b", so "...say a" + "b then" tokenizes "ab" across the boundary
    tokenizer = byte_level_tokenizer(["<|endoftext|>"], None, eos="<|endoftext|>", merges=[("a", "b")])
    rows = [
        {"prompt": "say a", "chosen": "b then", "rejected": "no"},
        {"prompt": "say x", "chosen": "b", "rejected": "no"},
    ]
    data = build_preference_data(local_cfg(preference_file(rows), eval_fraction=0.5), tokenizer, seed=0)
    assert data.stats["train/boundary_merges"] + data.stats["eval/boundary_merges"] == 1
    for pair in all_pairs(data):
        for response, response_ids in ((pair.chosen, pair.chosen_ids), (pair.rejected, pair.rejected_ids)):
            assert pair.prompt_ids + response_ids == ids(tokenizer, pair.prompt + response + "<|endoftext|>")
        if pair.source_index == 0:  # the prompt gives its "a" to both responses: prompt_ids stay shared
            assert pair.prompt_ids == ids(tokenizer, "say ")
            assert tokenizer.convert_ids_to_tokens(pair.chosen_ids[:1]) == ["ab"] and pair.rejected_ids[:2] == ids(
                tokenizer, "an"
            )


# ---------------------------------------------------------------- string prompts already templated


def test_templated_string_prompt_is_not_wrapped_twice(preference_file, chatml_base_tokenizer):
    tokenizer = chatml_base_tokenizer
    templated = [
        dict(row, prompt=f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n") for row in STRING_ROWS
    ]
    plain = build_preference_data(local_cfg(preference_file(STRING_ROWS, name="plain")), tokenizer, seed=0)
    already = build_preference_data(local_cfg(preference_file(templated, name="templated")), tokenizer, seed=0)
    by_index = {pair.source_index: pair for pair in all_pairs(plain)}
    fields = lambda pair: (pair.prompt, pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)  # noqa: E731
    for pair in all_pairs(already):
        assert pair.prompt == templated[pair.source_index]["prompt"] and pair.prompt.count("<|im_start|>") == 2
        same = by_index[pair.source_index]  # the plain prompt, wrapped once by the template, gives the same pair
        assert fields(pair) == fields(same)
        assert pair.chosen_ids[-1] == tokenizer.convert_tokens_to_ids(
            "<|im_end|>"
        )  # ended the template's way, not with eos


def test_templated_string_prompt_in_messages_rows(preference_file, chatml_base_tokenizer):
    prompt = "<|im_start|>user\nQuestion?<|im_end|>\n<|im_start|>assistant\n"
    rows = [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "assistant", "content": f"No {i}"}],
        }
        for i in range(2)
    ]
    data = build_preference_data(local_cfg(preference_file(rows), eval_fraction=0.5), chatml_base_tokenizer, seed=0)
    for pair in all_pairs(data):
        assert pair.prompt == prompt
        assert pair.prompt_ids + pair.chosen_ids == ids(chatml_base_tokenizer, prompt + "Yes.<|im_end|>")


# ---------------------------------------------------------------- generation stops at the turn end


class RecordingGenerator(torch.nn.Module):
    """Stands in for a model: records what generate() was asked to stop on and emits one token."""

    def __init__(self, token: int):
        super().__init__()
        self.token, self.stop_ids = token, None

    def generate(self, input_ids, eos_token_id, **_):
        self.stop_ids = eos_token_id
        return torch.cat([input_ids, torch.full((len(input_ids), 1), self.token)], dim=1)


def test_greedy_generate_stops_at_the_templates_turn_end(chatml_base_tokenizer):
    tokenizer = chatml_base_tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = RecordingGenerator(token=ids(tokenizer, "7")[0])
    assert greedy_generate(
        model, tokenizer, [ids(tokenizer, "<|im_start|>assistant\n")], max_new_tokens=4, device="cpu"
    ) == ["7"]
    assert im_end in model.stop_ids and tokenizer.eos_token_id in model.stop_ids


# ---------------------------------------------------------------- the measured main job is unchanged


@pytest.mark.parametrize("experiment", ["main_job", "squeeze_demo"])
def test_smollm2_arith_ids_unchanged(smollm2_tokenizer, experiment):
    """The main job's pairs (conf/dataset/arith.yaml) and the squeeze demo's tokenize as they did when
    prompt and response were tokenized apart and EOS (<|im_end|> for SmolLM2) appended."""
    tokenizer = smollm2_tokenizer
    # conf/dataset/arith.yaml; the cache dir is where config.yaml's ${model.cache_dir}/tokenized leads by default
    cfg = preset("dataset", "arith", cache_dir=DATA_TEST_SETTINGS["cache_dir"])
    if experiment == "squeeze_demo":
        cfg.arith.merge_with(OmegaConf.load(CONF_DIR / "experiment" / "squeeze_demo.yaml").dataset.arith)
    data = build_preference_data(cfg, tokenizer, seed=0)
    train_rows, eval_rows, _ = generate_arith_rows(cfg.arith, seed=0)
    assert (len(data.train), len(data.eval)) == (len(train_rows), len(eval_rows))
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for pairs, rows in ((data.train, train_rows), (data.eval, eval_rows)):
        for pair in pairs:
            row = rows[pair.source_index]
            prompt = f"{system}<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"
            assert pair.prompt == prompt
            assert pair.prompt_ids == ids(tokenizer, prompt)
            assert pair.chosen_ids == ids(tokenizer, row["chosen"]) + [im_end]
            assert pair.rejected_ids == ids(tokenizer, row["rejected"]) + [im_end]
    assert (
        sum(data.stats[f"{split}/{key}"] for split in ("train", "eval") for key in ("truncated", "boundary_merges"))
        == 0
    )
