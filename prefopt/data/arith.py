"""Arithmetic preference pairs generated from the seed, and the answer check used by greedy eval.

A question is (a, op, b) with operands in 0..max_operand. The chosen response states the correct
result ("7 + 5 = 12"); the rejected one states a wrong result, either in the same format (`near`), in
a format the model finds very unlikely (`offpolicy`: the learning-dynamics demo needs rejected
responses with low probability, where the squeezing effect shows), or as the model itself wrote it
(`onpolicy`: a wrong answer among the model's own samples, drawn by train/onpolicy.py and passed in
here; the answer checker below tells wrong from right).

Subtraction is restricted to a >= b so every answer is a non-negative integer: small models handle
that, and a "near" wrong answer never needs a sign.
"""

from __future__ import annotations

import operator
import random
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from omegaconf import DictConfig

from prefopt.core.errors import ConfigError

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
NEAR_OFFSETS = (-3, -2, -1, 1, 2, 3)
# Formats no instruct model would produce. The wrong number is the only number in them, so the
# pair disagrees on the value and answer_is_correct reads the wrong number.
OFFPOLICY_TEMPLATES = ("ANSWER:: {wrong} !!", "rEsUlT ~~ {wrong} ~~", "{wrong} ?!? nO WAY")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
STYLES = ("near", "offpolicy", "onpolicy")
ONPOLICY_CHOSEN = ("key", "sample")


class OnPolicySamplesNeeded(ConfigError):
    """The on-policy pairs need the model's samples, which only a worker (or their cache) has: a caller without them
    (the parent's estimate or resume check) falls back or leaves the check to the worker."""


@dataclass
class OnPolicyCounts:
    """What became of a split's questions in the on-policy regime (logged as data/<split>/onpolicy_*)."""

    no_usable_sample: int = 0  # questions none of whose samples ended in time: no pair (dropped)
    all_correct: int = 0  # questions all of whose usable samples were right: no pair (dropped)
    chosen_sampled: int = 0  # pairs whose chosen response is a correct sample (dataset.arith.onpolicy.chosen=sample)
    dropped_questions: list[str] = field(default_factory=list)  # their prompts, for the warning


def question_space(max_operand: int, operations: list[str]) -> list[tuple[int, str, int]]:
    """Every distinct question, in a fixed order (the seed shuffles it)."""
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown or not operations:
        raise ConfigError(
            f"dataset.arith.operations={list(operations)} is not valid; use a non-empty list of: "
            f"{', '.join(OPERATIONS)}"
        )
    questions = []
    for op in dict.fromkeys(operations):  # a repeated operator would repeat questions
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "-" and a < b:
                    continue
                questions.append((a, op, b))
    return questions


def wrong_response(a: int, op: str, b: int, correct: int, style: str, rng: random.Random) -> str:
    """A near or off-policy wrong answer (onpolicy answers are sampled, see onpolicy_pair)."""
    offset = rng.choice(NEAR_OFFSETS)
    wrong = correct + offset if correct + offset >= 0 else correct - offset
    if style == "near":
        return f"{a} {op} {b} = {wrong}"
    if style == "offpolicy":
        return rng.choice(OFFPOLICY_TEMPLATES).format(wrong=wrong)
    raise ConfigError(f"dataset.arith.rejected_style={style!r} is not valid; use {', '.join(STYLES)}")


def arith_questions(arith_cfg: DictConfig, seed: int) -> tuple[list[tuple[int, str, int]], random.Random]:
    """The run's questions, eval first (num_eval, then num_train), and the generator that drew them (the near and
    off-policy wrong answers continue its stream). on-policy sampling asks the same questions."""
    questions = question_space(arith_cfg.max_operand, list(arith_cfg.operations))
    needed = arith_cfg.num_train + arith_cfg.num_eval
    if needed > len(questions):
        raise ConfigError(
            f"dataset.arith.max_operand={arith_cfg.max_operand} with operations {list(arith_cfg.operations)} gives "
            f"only {len(questions)} distinct questions, fewer than num_train + num_eval = {needed}; raise "
            "dataset.arith.max_operand or lower dataset.arith.num_train / num_eval"
        )
    rng = random.Random(seed)
    rng.shuffle(questions)
    # eval first, so the held-out questions do not change when num_train does
    return questions[:needed], rng


def question_prompt(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def generate_arith_rows(
    arith_cfg: DictConfig, seed: int, samples: Optional[Sequence[Sequence[str]]] = None
) -> tuple[list[dict], list[dict], dict[str, OnPolicyCounts]]:
    """(train rows, eval rows, on-policy counts per split) in the strings format plus `answer`; no question is in
    both. samples: rejected_style=onpolicy only, the model's usable samples per question of arith_questions."""
    questions, rng = arith_questions(arith_cfg, seed)
    style = arith_cfg.rejected_style
    if style == "onpolicy" and samples is None:
        raise OnPolicySamplesNeeded(
            "dataset.arith.rejected_style=onpolicy: the pairs are the model's own samples, drawn when the run starts "
            "(and cached in dataset.cache_dir): start the run (prefopt train ...) once, then they are read from there"
        )
    if samples is not None and len(samples) != len(questions):
        raise ValueError(f"{len(samples)} sampled questions for {len(questions)} arith questions")
    splits: dict[str, list[dict]] = {"eval": [], "train": []}
    counts = {"eval": OnPolicyCounts(), "train": OnPolicyCounts()}
    for index, (a, op, b) in enumerate(questions):
        split = "eval" if index < arith_cfg.num_eval else "train"
        correct = OPERATIONS[op](a, b)
        row = {"prompt": question_prompt(a, op, b), "chosen": f"{a} {op} {b} = {correct}", "answer": str(correct)}
        if style == "onpolicy":
            pair = onpolicy_pair(samples[index], row["answer"], arith_cfg.onpolicy.chosen)
            if pair is None:
                if samples[index]:
                    counts[split].all_correct += 1
                else:
                    counts[split].no_usable_sample += 1
                counts[split].dropped_questions.append(row["prompt"])
                continue
            sampled_chosen, row["rejected"] = pair
            if sampled_chosen is not None:
                row["chosen"] = sampled_chosen
                counts[split].chosen_sampled += 1
        else:
            row["rejected"] = wrong_response(a, op, b, correct, style, rng)
        splits[split].append(row)
    return splits["train"], splits["eval"], counts if style == "onpolicy" else {}


def onpolicy_pair(samples: Sequence[str], answer: str, chosen: str) -> Optional[tuple[Optional[str], str]]:
    """(the chosen sample or None for the answer key, the rejected sample) from one question's usable samples, in
    their drawn order: the first wrong one is rejected; with chosen=sample the first correct one is chosen (None when
    none was correct: the key stays). None when no sample was wrong: the question gives no on-policy pair."""
    wrong = [text for text in samples if not answer_is_correct(text, answer)]
    if not wrong:
        return None
    right = [text for text in samples if answer_is_correct(text, answer)] if chosen == "sample" else []
    return (right[0] if right else None), wrong[0]


def stated_number(text: str) -> Optional[str]:
    """The number a response states: the first after the last "=", or else the last one in the text."""
    if "=" in text:
        found = NUMBER.search(text.rsplit("=", 1)[1])
        return found.group() if found else None
    found = NUMBER.findall(text)
    return found[-1] if found else None


def answer_is_correct(generated_text: str, answer: str) -> bool:
    """Does the generated text state `answer`? "2 + 3 = 5", "The answer is 5." and "5" all state 5."""
    stated = stated_number(generated_text)
    if stated is None:
        return False
    try:
        return float(stated) == float(answer)
    except ValueError:  # a non-numeric reference answer
        return stated == answer.strip()
