"""Preference data: sources and formats -> tokenized pairs -> batches.

data = build_preference_data(cfg.dataset, tokenizer, seed)   # data.train, data.eval, data.stats
batch = collate_pairs(data.train[:4], tokenizer.pad_token_id)        # 2B rows: chosen, then rejected
batch = collate_sequences(prompt_ids, response_ids, pad_token_id)   # any prompt/response rows (probes)
"""

from prefopt.data.arith import answer_is_correct
from prefopt.data.errors import DataError
from prefopt.data.pipeline import PreferenceData, build_preference_data
from prefopt.data.tokenize import IGNORE_INDEX, TokenizedPair, collate_pairs, collate_sequences

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "PreferenceData",
    "TokenizedPair",
    "answer_is_correct",
    "build_preference_data",
    "collate_pairs",
    "collate_sequences",
]
