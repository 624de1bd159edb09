"""Write HH-like preference pairs made of real English text, offline and deterministic from a seed.

    .venv/bin/python scripts/make_hh_like_pairs.py --out pairs.jsonl --num-pairs 50 --seed 0

No preference data set can be downloaded here, so the text comes from what every Python ships: the
prose of the language reference in `pydoc_data.topics` (~460 kB of English; code blocks and grammar
lines are dropped). Each row is {"prompt", "chosen", "rejected"} as plain strings in the HH-RLHF raw
layout (no chat template):

    prompt   "\\n\\nHuman: <a passage of one reference topic>\\n\\nWhat does this mean?\\n\\nAssistant:"
    chosen   " <the passage that follows it in the same topic>"            (on topic)
    rejected " <a passage of another topic>"                                 (off topic)

Lengths, in SmolLM2 tokens (its tokenizer, add_special_tokens=False): prompt 32-192, each response
16-192, drawn uniformly per row. A trainer appends its end-of-sequence token to each response (+1).
Responses start with a space after "Assistant:" so the prompt ends on a token boundary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

PROMPT_HEAD = "\n\nHuman: "
PROMPT_TAIL = "\n\nWhat does this mean?\n\nAssistant:"
PROMPT_TOKENS = (32, 192)
RESPONSE_TOKENS = (16, 192)
MIN_TOPIC_WORDS = 600  # topics with at least this much prose (room for a prompt and its continuation)


def default_tokenizer_dir() -> Path:
    """The SmolLM2 directory prefopt converts from the GGUF (run `prefopt train model=smollm2_135m` once to make it)."""
    cache = Path(os.path.expanduser(os.environ.get("PREFOPT_CACHE") or "~/.cache/prefopt")) / "models"
    found = sorted(path for path in cache.glob("SmolLM2-135M*") if (path / "tokenizer.json").is_file())
    if not found:
        raise SystemExit(
            f"no converted SmolLM2 directory under {cache}: run `prefopt train model=smollm2_135m "
            f"trainer.max_steps=1` once, or pass --tokenizer DIR"
        )
    return found[0]


def is_prose(line: str) -> bool:
    """Mostly letters and spaces (drops heading rules, table rows, symbol lists)."""
    text = line.strip()
    return sum(ch.isalpha() or ch.isspace() for ch in text) >= 0.75 * len(text)


def prose_words(text: str) -> tuple[str, list[str]]:
    """A topic's title and the words of its prose paragraphs (indented code/grammar and heading rules dropped)."""
    lines = text.splitlines()
    title = lines[0].strip() if lines else ""
    paragraphs, current = [], []
    for line in lines[1:]:
        if not line.strip():
            if current:
                paragraphs.append(" ".join(current))
            current = []
        elif line.startswith((" ", "|", "+")) or not is_prose(line):
            continue  # code, grammar, tables, heading underlines
        else:
            current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    words = " ".join(paragraphs).split()
    return title, words


def load_topics() -> list[tuple[str, list[str]]]:
    import pydoc_data.topics

    topics = [prose_words(pydoc_data.topics.topics[key]) for key in sorted(pydoc_data.topics.topics)]
    return [(title, words) for title, words in topics if len(words) >= MIN_TOPIC_WORDS]


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit(tokenizer, words: list[str], start: int, target: int, head: str = "", tail: str = "") -> tuple[str, int]:
    """head + the words from `start` (wrapping around) + tail, cut at a word boundary so that it has at most
    `target` tokens and as many as fit; returns (text, end word index)."""
    budget = target - count(tokenizer, head + tail)
    taken = [words[(start + i) % len(words)] for i in range(max(budget, 1) + 8)]
    body = " ".join(taken)
    encoded = tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    cut = len(body) if len(offsets) <= budget else offsets[budget][0]  # character where token `budget` starts
    kept = body[:cut].rstrip().split()
    if cut < len(body) and not body[cut - 1].isspace() and cut < len(body) and not body[cut].isspace():
        kept = kept[:-1]  # the cut fell inside a word: drop that word
    while kept and count(tokenizer, head + " ".join(kept) + tail) > target:
        kept = kept[:-1]
    return head + " ".join(kept) + tail, start + len(kept)


def sentence_start(words: list[str], rng: random.Random) -> int:
    """A random word index that starts a sentence (follows a word ending in . ! or ?)."""
    starts = [i + 1 for i, word in enumerate(words[:-200]) if word.endswith((".", "!", "?"))]
    return rng.choice(starts) if starts else 0


def make_pairs(tokenizer, num_pairs: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    topics = load_topics()
    rows, seen_prompts = [], set()
    while len(rows) < num_pairs:
        a, b = rng.sample(range(len(topics)), 2)
        (_, words_a), (_, words_b) = topics[a], topics[b]
        prompt_target = rng.randint(*PROMPT_TOKENS)
        chosen_target = rng.randint(*RESPONSE_TOKENS)
        rejected_target = rng.randint(*RESPONSE_TOKENS)
        start = sentence_start(words_a, rng)
        prompt, end = fit(tokenizer, words_a, start, prompt_target, PROMPT_HEAD, PROMPT_TAIL)
        chosen, _ = fit(tokenizer, words_a, end, chosen_target)
        rejected, _ = fit(tokenizer, words_b, sentence_start(words_b, rng), rejected_target)
        chosen, rejected = " " + chosen, " " + rejected
        lengths = count(tokenizer, prompt), count(tokenizer, chosen), count(tokenizer, rejected)
        ok = PROMPT_TOKENS[0] <= lengths[0] <= PROMPT_TOKENS[1] and all(
            RESPONSE_TOKENS[0] <= n <= RESPONSE_TOKENS[1] for n in lengths[1:]
        )
        if ok and prompt not in seen_prompts and chosen != rejected:  # a draw that misses the bounds is redrawn
            seen_prompts.add(prompt)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    parser.add_argument("--num-pairs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="a SmolLM2 tokenizer dir (default: prefopt's converted one)"
    )
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer or default_tokenizer_dir()))
    rows = make_pairs(tokenizer, args.num_pairs, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    totals = [sum(count(tokenizer, row[key]) for row in rows) for key in ("prompt", "chosen", "rejected")]
    print(
        f"wrote {len(rows)} pairs to {args.out} (seed {args.seed}); tokens: prompt {totals[0]}, chosen {totals[1]}, "
        f"rejected {totals[2]} (mean per pair {sum(totals) / len(rows):.0f}, before end-of-sequence tokens)"
    )


if __name__ == "__main__":
    main()
