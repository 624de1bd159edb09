"""Data that `datasets` loads by name: hub ids, local dataset repositories and `save_to_disk` directories.

    hub id / repository directory : load_dataset(path, dataset.subset, data_dir=dataset.data_dir, split=...)
                                    dataset.subset is the config name (TRL, the hub viewer: "name"); data_dir
                                    a folder of the repository (Anthropic/hh-rlhf keeps helpful-base there)
    save_to_disk directory        : load_from_disk(path): a Dataset (one split) or a DatasetDict (named splits)

Offline, a hub id is read only from the local cache and fails in about a second with a message that
says how to pass a local copy.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from prefopt.core.hub import hub_reachable
from prefopt.data.errors import DataError

LOCAL_COPY_HINT = (
    "Download it where there is internet, or pass a local copy: dataset.path=/path/to/file.jsonl (.json, .jsonl, "
    ".csv or .parquet, or a glob of them), a directory written by save_to_disk, or a clone of the dataset repository"
)


def is_saved_dataset(directory: Path) -> bool:
    """A directory written by Dataset.save_to_disk (state.json) or DatasetDict.save_to_disk (dataset_dict.json)."""
    return (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()


def load_saved(directory: Path):
    """The Dataset or DatasetDict saved in the directory."""
    import datasets

    try:
        return datasets.load_from_disk(str(directory))
    except Exception as error:  # a damaged or partial save raises several types
        raise DataError(
            f"directory {directory} holds a save_to_disk dataset that cannot be loaded ({type(error).__name__}: "
            f"{error}); save it again"
        ) from None


def saved_split(saved, split: str, label: str):
    """One split of a loaded DatasetDict, or a clear error naming the splits it has."""
    if split not in saved:
        raise DataError(
            f"{label} has no split '{split}' (it has: {', '.join(saved)}); set dataset.train_split / "
            "dataset.eval_split to one of them, or dataset.eval_split=null to hold out dataset.eval_fraction of the "
            "train split"
        )
    return saved[split]


def load_named_split(path: str, subset: Optional[str], data_dir: Optional[str], split: str, local: bool):
    """One split through load_dataset; a hub id offline is read from the local cache only (module docstring)."""
    import datasets

    offline = local or datasets.config.HF_HUB_OFFLINE or not hub_reachable()
    try:
        with hub_offline_mode(offline):
            return datasets.load_dataset(path, subset, data_dir=data_dir, split=split)
    except Exception as error:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ... here
        kind = "dataset directory" if local else "hub dataset"
        label = (
            f"{kind} {path}"
            + (f" (subset {subset})" if subset else "")
            + (f" (data_dir {data_dir})" if data_dir else "")
        )
        if local or not offline:
            reason = f"{type(error).__name__}: {error}"
        else:
            reason = "the hub cannot be reached (offline?) and it is not in the local cache"
        raise DataError(
            f"{label} split {split} could not be loaded: {reason}. Check dataset.subset (a config name), "
            "dataset.data_dir "
            f"and the split names. {'' if local else LOCAL_COPY_HINT}".rstrip()
        ) from error


@contextlib.contextmanager
def hub_offline_mode(offline: bool):
    """Without this, `datasets` retries an unreachable hub for ~25 s per file. The flags are read at
    import time, so the environment variable would come too late; set the module constants instead."""
    if not offline:
        yield
        return
    import datasets
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
