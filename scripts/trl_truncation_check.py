"""Compare prefopt's truncation (prefopt/data/truncation.py) with TRL 1.x's DPO collator on random token ids.

TRL 1.x cuts each whole prompt+response sequence to max_length (DataCollatorForPreference), keep_start by default,
and drops a pair whose prompt alone fills max_length. prefopt cuts the prompt to max_prompt_length first, by
dataset.truncation_mode, then the responses. Where the prompt fits max_prompt_length the two must agree token for
token under keep_start (and under prefopt's default keep_end, which cuts only prompts); this script checks that and
counts where they part. Not in CI (CI has no TRL): run it with an environment that has TRL installed, e.g.

    .venv-bench/bin/python scripts/trl_truncation_check.py
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

from trl import __version__ as trl_version
from trl.trainer.dpo_trainer import DataCollatorForPreference

ROOT = Path(__file__).resolve().parents[1]
CASES = 2000


def load_truncation():
    """prefopt/data/truncation.py alone (it needs nothing else; the package would import omegaconf and datasets)."""
    spec = importlib.util.spec_from_file_location("prefopt_truncation", ROOT / "prefopt" / "data" / "truncation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def trl_rows(prompt, chosen, rejected, max_length):
    """The two sequences TRL 1.x trains on (keep_start), without padding."""
    batch = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode="keep_start")(
        [{"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}]
    )
    return [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]


def check(truncation, prompt, chosen, rejected, max_length, max_prompt_length, mode) -> None:
    """prefopt's two sequences must be TRL 1.x keep_start's, token for token."""
    limits = truncation.TruncationLimits(max_length, max_prompt_length, None, mode)
    cut = truncation.truncate_pair(prompt, chosen, rejected, limits, None)
    ours = [cut.prompt_ids + cut.chosen_ids, cut.prompt_ids + cut.rejected_ids]
    if ours != trl_rows(prompt, chosen, rejected, max_length):
        raise SystemExit(
            f"differs from TRL {trl_version} ({mode}, {max_prompt_length=}): {prompt=} {chosen=} {rejected=}"
        )


def main() -> None:
    truncation = load_truncation()
    rng = random.Random(0)
    compared = agreed = prompt_too_long = trl_drops = 0
    for _ in range(CASES):
        max_length = rng.randint(8, 64)
        max_prompt_length = rng.randint(1, max_length - 1)
        prompt = [rng.randint(1, 999) for _ in range(rng.randint(1, 80))]
        chosen = [rng.randint(1, 999) for _ in range(rng.randint(1, 60))]
        rejected = [rng.randint(1, 999) for _ in range(rng.randint(1, 60))]
        if len(prompt) >= max_length:
            trl_drops += 1  # TRL 1.x filters the pair out (keep_start); prefopt keeps it with its prompt cut
        else:  # TRL 1.x's default as prefopt settings: keep_start with max_prompt_length = max_length - 1
            check(truncation, prompt, chosen, rejected, max_length, max_length - 1, truncation.KEEP_START)
        if len(prompt) > max_prompt_length:
            prompt_too_long += 1
            continue
        compared += 1
        for mode in truncation.TRUNCATION_MODES:
            check(truncation, prompt, chosen, rejected, max_length, max_prompt_length, mode)
        agreed += 1
    print(
        f"TRL {trl_version} keep_start vs prefopt (keep_end and keep_start): {agreed}/{compared} pairs whose prompt "
        f"fits max_prompt_length agree token for token; {prompt_too_long} of {CASES} had a longer prompt (prefopt "
        f"cuts it to max_prompt_length, TRL 1.x keeps it whole and cuts the response), {trl_drops} of which TRL "
        f"1.x would drop (prompt >= max_length); with keep_start and max_prompt_length = max_length - 1 all "
        f"{CASES - trl_drops} pairs TRL 1.x keeps agree"
    )


if __name__ == "__main__":
    main()
