"""What a run trained on, as digests a checkpoint keeps: a resume on other data is refused, not silently mixed.

The identity of tokenized data is the SHA-256 of its pairs' token ids, train and eval separately, in order
(prompt, chosen, rejected of each pair), so it changes when a label flips, a row is added or removed, the
held-out split moves, or the tokenization changes; it does not change when a file is only renamed or
re-serialized. The origin and the file names ride along only to name the data in a message.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from pathlib import Path
from typing import Any, Iterable, Optional

from prefopt.core.fileutil import atomic_write_json
from prefopt.data.errors import DataError
from prefopt.data.tokenize import TokenizedPair

log = logging.getLogger("prefopt")

IDENTITY_VERSION = 1
ALLOW_CHANGED = (
    "allow"  # trainer.resume_data_changed=allow: resume on data that differs from the checkpoint's (config.CHOICES)
)
OVERRIDE_KEY = "trainer.resume_data_changed"


def pairs_digest(pairs: Iterable[TokenizedPair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(8, "little"))  # lengths delimit the parts: a moved boundary is a change
            digest.update(array("q", ids).tobytes())
    return digest.hexdigest()


def data_identity(data) -> dict[str, Any]:
    """data: a PreferenceData. A plain dict (it goes into trainer_state.pt, loaded with weights_only=True, and
    data.json)."""
    return {
        "version": IDENTITY_VERSION,
        "train": pairs_digest(data.train),
        "eval": pairs_digest(data.eval),
        "train_pairs": len(data.train),
        "eval_pairs": len(data.eval),
        "origin": data.origin,
        "files": list(data.files or []),
    }


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the checkpoint's data and today's, in words; [] when they are the same."""
    differences = []
    if saved.get("train") != current["train"]:
        differences.append(
            f"the training pairs differ ({saved.get('train_pairs')} at the checkpoint, {current['train_pairs']} now"
            + (
                ", same count: contents or labels changed)"
                if saved.get("train_pairs") == current["train_pairs"]
                else ")"
            )
        )
    if saved.get("eval") != current["eval"]:
        differences.append(
            f"the eval split differs ({saved.get('eval_pairs')} held-out pairs at the checkpoint, "
            f"{current['eval_pairs']} now): before/after evals would compare different pairs"
        )
    return differences


def check_resume_data(
    saved: Optional[dict[str, Any]], current: dict[str, Any], checkpoint: Any, setting: str
) -> list[str]:
    """Refuse (DataError) a resume whose data differs from what the checkpoint trained on, unless setting is
    ALLOW_CHANGED; returns what differs (the caller records an allowed change). A checkpoint from before prefopt
    recorded its data, or recorded it with another IDENTITY_VERSION, has nothing to compare: [] (a warning for the
    latter: refusing would block every resume across an upgrade that changes the digest, for no change of data)."""
    if not saved:
        return []
    if (
        saved.get("version") != current["version"]
    ):  # digests of another prefopt's scheme: equal data would read as changed
        log.warning(
            "checkpoint %s recorded its data with identity version %s, this prefopt computes version %s: the data "
            "cannot be compared, so a change would go unnoticed; resuming",
            checkpoint,
            saved.get("version"),
            current["version"],
        )
        return []
    differences = identity_differences(saved, current)
    if not differences or setting == ALLOW_CHANGED:
        return differences
    named = current["origin"]
    if saved.get("origin") and saved["origin"] != current["origin"]:
        named += f" (the checkpoint trained on {saved['origin']})"
    raise DataError(
        f"{named}: the data changed since checkpoint {checkpoint}: {'; '.join(differences)}. Resume on the data the "
        f"run trained on, start a fresh run, or set {OVERRIDE_KEY}={ALLOW_CHANGED} to continue on the new data "
        "(recorded in the run)"
    )


def write_data_record(path: Path, record: dict[str, Any]) -> None:
    """RUN_DIR/data.json: what the run trains on (and the steps at which it was resumed on changed data)."""
    atomic_write_json(path, record)
