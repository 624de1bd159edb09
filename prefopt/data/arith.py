"""Arithmetic preference pairs generated from the seed, and the answer check used by greedy eval.

A question is (a, op, b) with operands in 0..max_operand. The chosen response states the correct
result ("7 + 5 = 12"); the rejected one states a wrong result, either in the same format (`near`) or
in a format the model finds very unlikely (`offpolicy`): the learning-dynamics demo needs rejected
responses with low probability, where the squeezing effect shows.

Subtraction is restricted to a >= b so every answer is a non-negative integer: small models handle
that, and a "near" wrong answer never needs a sign.
"""

from __future__ import annotations

import operator
import random
import re
from typing import Optional

from omegaconf import DictConfig

from prefopt.core.errors import ConfigError

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
NEAR_OFFSETS = (-3, -2, -1, 1, 2, 3)
# Formats no instruct model would produce. The wrong number is the only number in them, so the
# pair disagrees on the value and answer_is_correct reads the wrong number.
OFFPOLICY_TEMPLATES = ("ANSWER:: {wrong} !!", "rEsUlT ~~ {wrong} ~~", "{wrong} ?!? nO WAY")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


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
    offset = rng.choice(NEAR_OFFSETS)
    wrong = correct + offset if correct + offset >= 0 else correct - offset
    if style == "near":
        return f"{a} {op} {b} = {wrong}"
    if style == "offpolicy":
        return rng.choice(OFFPOLICY_TEMPLATES).format(wrong=wrong)
    raise ConfigError(f"dataset.arith.rejected_style={style!r} is not valid; use near or offpolicy")


def generate_arith_rows(arith_cfg: DictConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) in the strings format plus `answer`; no question is in both."""
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
    rows = []
    for a, op, b in questions[:needed]:
        correct = OPERATIONS[op](a, b)
        rows.append(
            {
                "prompt": f"What is {a} {op} {b}?",
                "chosen": f"{a} {op} {b} = {correct}",
                "rejected": wrong_response(a, op, b, correct, arith_cfg.rejected_style, rng),
                "answer": str(correct),
            }
        )
    # eval first, so the held-out questions do not change when num_train does
    return rows[arith_cfg.num_eval :], rows[: arith_cfg.num_eval]


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
