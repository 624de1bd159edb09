"""The CHES study's correlation table: per `prefopt inspect inspect.policy=RUN` dir (one per seed), Spearman's rho of
each pair's CHES (at step 0) against its chosen log-prob change under the run, over the training pairs the run drew,
with its 95% interval; then the seeds pooled in Fisher z (prefopt/observe/stats.py).

    python scripts/ches_correlation.py INSPECT_DIR [INSPECT_DIR ...]      (prints a markdown table)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas

from prefopt.core.runfiles import INSPECTION_PARQUET
from prefopt.observe.stats import pooled_correlation, spearman

SCORES = ("ches", "ches_norm")
CHANGES = ("chosen_change", "rejected_change")


def correlation_table(inspect_dirs: list[Path]) -> str:
    lines = ["| inspection | score | change | trained pairs | Spearman rho | 95% CI |", "|---|---|---|---|---|---|"]
    per_seed: dict[tuple[str, str], list] = {}
    for directory in inspect_dirs:
        table = pandas.read_parquet(directory / INSPECTION_PARQUET)
        if "visits" not in table:
            raise SystemExit(f"{directory}: no policy columns; run prefopt inspect with inspect.policy=RUN_DIR")
        trained = table[(table["split"] == "train") & (table["visits"] > 0)]
        for score in SCORES:
            for change in CHANGES:
                result = spearman(trained[score].tolist(), trained[change].tolist())
                per_seed.setdefault((score, change), []).append(result)
                lines.append(
                    f"| {directory} | {score} | {change} | {result.n} | {result.rho:+.3f} | "
                    f"{result.ci_low:+.3f} to {result.ci_high:+.3f} |"
                )
    for (score, change), results in per_seed.items():
        pooled = pooled_correlation(results)
        lines.append(
            f"| pooled over {len(results)} seeds (Fisher z) | {score} | {change} | {pooled.n} | {pooled.rho:+.3f} | "
            f"{pooled.ci_low:+.3f} to {pooled.ci_high:+.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inspect_dirs", nargs="+", type=Path, help="`prefopt inspect inspect.policy=RUN` run dirs")
    print(correlation_table(parser.parse_args().inspect_dirs))


if __name__ == "__main__":
    main()
