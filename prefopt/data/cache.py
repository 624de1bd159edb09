"""Tokenized pairs, cached: every job of a sweep (and every later run) tokenizes the same data once.

An entry lives in dataset.cache_dir under a key that hashes everything the pairs depend on:
  - the data's content: the SHA-256 of its files (fileutil.file_digests: memoized per file identity, which size and
    mtime alone are not), or `datasets`' fingerprint of what it loaded from the hub;
  - which rows each split holds (the held-out indices follow the seed) and the split names;
  - every dataset.* setting (layout, columns, chat_template, lengths and truncation_mode, caps, on_bad_row; cache_dir
    and warn_truncated_share aside);
  - the tokenizer: its class, name_or_path, the hash of its whole serialized vocabulary and rules, its
    special tokens and chat template;
  - the code of prefopt/data/ itself, so a change to how pairs are made never reads old pairs.
Generated data (arith) is not cached: generating it is as quick as reading a cache.

A cache_dir that cannot be written (read-only, full, not ours) is a one-line error naming dataset.cache_dir
(CacheDirError); entries already there are still read from it.

Entries are written atomically, under a lock, so parallel jobs of a sweep wait for the first instead of
tokenizing the same data side by side. An entry carries a digest of its contents; one that cannot be
read, or whose key or digest does not match, is rebuilt with a warning, never trusted.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from prefopt.core.fileutil import atomic_write_bytes, exclusive_lock
from prefopt.data.errors import DataError
from prefopt.data.tokenize import TokenizedPair

logger = logging.getLogger("prefopt.data")

CACHE_VERSION = 1
Splits = dict[str, list[TokenizedPair]]  # "train" / "eval" -> pairs


def tokenizer_fingerprint(tokenizer) -> str:
    """What makes two tokenizers tokenize alike: name, vocabulary and rules, specials, chat template."""
    digest = hashlib.sha256()
    for part in (
        type(tokenizer).__name__,
        str(getattr(tokenizer, "name_or_path", "")),
        json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        json.dumps(
            [
                (index, str(token), getattr(token, "special", None))
                for index, token in sorted(tokenizer.added_tokens_decoder.items())
            ]
        ),
        str([getattr(tokenizer, name, None) for name in ("add_bos_token", "add_eos_token")]),
    ):
        digest.update(part.encode() + b"\0")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its whole serialization (vocab, merges, normalizer, post-processor)
        digest.update(backend.to_str().encode())
    elif getattr(tokenizer, "sp_model", None) is not None:  # a slow SentencePiece tokenizer: its model file
        digest.update(tokenizer.sp_model.serialized_model_proto())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """The source of prefopt/data/, which decides how rows become pairs."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class CacheDirError(DataError):
    """dataset.cache_dir cannot be written: named, with the fix."""

    def __init__(self, cache_dir: Path, error: OSError):
        super().__init__(
            f"dataset.cache_dir={cache_dir}: cannot write the tokenized-pairs cache ({error.strerror}: "
            f"{error.filename or cache_dir}); point dataset.cache_dir at a writable directory, or set "
            f"dataset.cache_dir=null to tokenize without a cache"
        )


def cache_key(parts: dict) -> str:
    """parts: JSON-able description of everything the pairs depend on (module docstring)."""
    described = json.dumps({"version": CACHE_VERSION, "code": code_digest(), **parts}, sort_keys=True, default=str)
    return hashlib.sha256(described.encode()).hexdigest()[:32]


def indices_digest(indices: list[int]) -> str:
    return hashlib.sha256(torch.tensor(indices, dtype=torch.int64).numpy().tobytes()).hexdigest()


def cached_pairs(path: Path, key: str, build: Callable[[], tuple[Splits, dict]]) -> tuple[Splits, dict, bool]:
    """(pairs per split, meta, hit): the entry at path if it is whole and has this key, else build() written there.
    meta: JSON-able facts kept with the pairs (row_format, stats, warnings)."""
    entry = load_entry(path, key)
    if entry is not None:
        return (*entry, True)
    check_writable(path.parent)
    with exclusive_lock(path.with_suffix(".lock")):
        entry = load_entry(path, key, quiet=True)  # another job may have written it while this one waited
        if entry is not None:
            return (*entry, True)
        splits, meta = build()
        save_entry(path, key, splits, meta)
    return splits, meta, False


def check_writable(cache_dir: Path) -> None:
    """A cache_dir that cannot be written fails here, naming dataset.cache_dir, before any tokenizing."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=cache_dir).close()
    except OSError as error:
        raise CacheDirError(cache_dir, error) from None


def packed(pairs: list[TokenizedPair]) -> dict:
    """A split as a few tensors (all token ids in one) and its texts: fast to save and load."""
    return {
        "ids": torch.tensor(
            [token for pair in pairs for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) for token in ids],
            dtype=torch.int32,
        ),
        "lengths": torch.tensor(
            [[len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)] for pair in pairs], dtype=torch.int64
        ).view(-1, 3),
        "source_index": torch.tensor([pair.source_index for pair in pairs], dtype=torch.int64),
        "texts": [[pair.prompt, pair.chosen, pair.rejected, pair.answer] for pair in pairs],
    }


def unpacked(split: dict) -> list[TokenizedPair]:
    ids, lengths = split["ids"].tolist(), split["lengths"].tolist()
    if sum(sum(row) for row in lengths) != len(ids) or not (
        len(lengths) == len(split["texts"]) == len(split["source_index"])
    ):
        raise ValueError("its token counts do not add up")
    pairs, start = [], 0
    for (prompt_length, chosen_length, rejected_length), (prompt, chosen, rejected, answer), source_index in zip(
        lengths, split["texts"], split["source_index"].tolist()
    ):
        chosen_start = start + prompt_length
        rejected_start = chosen_start + chosen_length
        end = rejected_start + rejected_length
        pairs.append(
            TokenizedPair(
                ids[start:chosen_start],
                ids[chosen_start:rejected_start],
                ids[rejected_start:end],
                prompt,
                chosen,
                rejected,
                answer,
                source_index,
            )
        )
        start = end
    return pairs


def entry_digest(key: str, splits: dict, meta: dict) -> str:
    digest = hashlib.sha256(key.encode() + json.dumps(meta, sort_keys=True).encode())
    for name in sorted(splits):
        split = splits[name]
        for tensor_name in ("ids", "lengths", "source_index"):
            digest.update(split[tensor_name].contiguous().numpy().tobytes())
        for texts in split["texts"]:
            digest.update(json.dumps(texts).encode())
    return digest.hexdigest()


def save_entry(path: Path, key: str, splits: Splits, meta: dict) -> None:
    packed_splits = {name: packed(pairs) for name, pairs in splits.items()}
    buffer = io.BytesIO()
    entry = {"version": CACHE_VERSION, "key": key, "meta": meta, "splits": packed_splits}
    torch.save({**entry, "digest": entry_digest(key, packed_splits, meta)}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_entry(path: Path, key: str, quiet: bool = False) -> Optional[tuple[Splits, dict]]:
    """The entry's pairs and meta, or None when it is absent, unreadable, altered or another key's (then it is
    rebuilt)."""
    if not path.exists():
        return None
    try:
        stored = torch.load(path, weights_only=True)
        if stored.get("version") != CACHE_VERSION or stored.get("key") != key:
            raise ValueError(f"it belongs to another key ({stored.get('key')})")
        if stored.get("digest") != entry_digest(key, stored["splits"], stored["meta"]):
            raise ValueError("its contents do not match their stored digest")
        return {name: unpacked(split) for name, split in stored["splits"].items()}, stored["meta"]
    except Exception as error:  # a truncated, edited or foreign file: never trust it
        if not quiet:
            logger.warning("tokenized-pairs cache %s is corrupt or mismatched (%s): rebuilding it", path, error)
        return None
