"""`prefopt inspect` and dataset.filter: CHES against an independent computation from output_hidden_states (tiny
model and SmolLM2, padded and packed), the other columns against their definitions, the cache, 2 ranks = 1 rank,
the filter's kept pairs, and the trained policy's columns."""

from __future__ import annotations

import math
import random

import pandas
import pytest
import torch

from prefopt.data import TokenizedPair
from prefopt.data.layout import PADDED, BatchLayout
from prefopt.losses import GateParams
from prefopt.observe.stats import spearman
from prefopt.observe.tracking import read_jsonl
from prefopt.train.inspection import BASE_COLUMNS, score_pairs
from tests.helpers import command_fails, run_train
from tests.test_logps_models import VOCAB, tiny_model

GATES = [GateParams(kind="seq"), GateParams(kind="q10"), GateParams(kind="token", alpha=20.0, tau=0.02)]
COLUMNS = [*BASE_COLUMNS, "gate_seq", "gate_q10", "gate_token"]
TINY = [
    "model=tiny_llama",
    "hardware=cpu",
    "dataset.arith.num_train=24",
    "dataset.arith.num_eval=6",
    "trainer.eval_batch_size=5",
    "logger.wandb.mode=disabled",
]


def random_pairs(count: int, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)
    draw = lambda length: [rng.randrange(vocab) for _ in range(length)]  # noqa: E731
    pairs = []
    for index in range(count):
        chosen = draw(rng.randint(2, 7))
        rejected = chosen[: rng.randint(0, len(chosen))] + draw(rng.randint(1, 5))  # a shared prefix, then not
        pairs.append(TokenizedPair(draw(rng.randint(3, 9)), chosen, rejected, "", "", "", None, index))
    return pairs


@torch.no_grad()
def independent_columns(model, pair: TokenizedPair) -> dict[str, float]:
    """CHES and the log-probs of one pair from plain forwards with output_hidden_states (one sequence each)."""
    values = {}
    sums = {}
    for name, response in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        ids = torch.tensor([pair.prompt_ids + response])
        out = model(input_ids=ids, output_hidden_states=True)
        start = len(pair.prompt_ids) - 1  # the position whose output predicts the first response token
        emitting = slice(start, start + len(response))
        hidden = out.hidden_states[-1][0, emitting].double()
        sums[name] = (hidden.sum(0), len(response))
        logps = torch.log_softmax(out.logits[0, emitting].double(), -1).gather(-1, ids[0, start + 1 :, None])
        values[f"ref_{name}_logps"] = float(logps.sum())
        values[f"ref_{name}_mean"] = float(logps.mean())
        token_probs = logps.exp().flatten()
        if name == "rejected":
            values["gate_seq"] = float(torch.sigmoid(50 * (torch.exp(logps.mean()) - 0.05)))
            values["gate_q10"] = float(torch.sigmoid(50 * (torch.quantile(token_probs, 0.1) - 0.05)))
            values["gate_token"] = float(torch.sigmoid(20 * (token_probs - 0.02)).mean())
    (chosen, chosen_length), (rejected, rejected_length) = sums["chosen"], sums["rejected"]
    values["ches"] = float(chosen @ rejected - chosen @ chosen)
    chosen_mean, rejected_mean = chosen / chosen_length, rejected / rejected_length
    values["ches_norm"] = float(chosen_mean @ rejected_mean - chosen_mean @ chosen_mean)
    return values


def assert_close_to_independent(model, pairs, values: torch.Tensor, tolerance: float) -> None:
    for row, pair in zip(values, pairs):
        expected = independent_columns(model, pair)
        for name, value in expected.items():
            got = float(row[COLUMNS.index(name)])
            assert math.isclose(got, value, rel_tol=tolerance, abs_tol=tolerance), (name, got, value)


@pytest.mark.parametrize("layout", [PADDED, BatchLayout("packed")], ids=["padded", "packed"])
def test_ches_and_columns_equal_an_independent_computation_on_the_tiny_model(layout):
    model = tiny_model("llama").eval()
    pairs = random_pairs(6, VOCAB)
    values = score_pairs(model, pairs, layout, GATES, chunk_size=7, device="cpu", pad_id=0)
    assert values.shape == (6, len(COLUMNS))
    assert_close_to_independent(model, pairs, values, 1e-4)
    for row, pair in zip(values, pairs):  # the columns read from the token ids
        shared = sum(min(pair.chosen_ids.count(t), pair.rejected_ids.count(t)) for t in set(pair.chosen_ids))
        assert row[COLUMNS.index("token_overlap")] == pytest.approx(
            shared / max(len(pair.chosen_ids), len(pair.rejected_ids))
        )
        prefix = next(
            (i for i, (a, b) in enumerate(zip(pair.chosen_ids, pair.rejected_ids)) if a != b),
            min(len(pair.chosen_ids), len(pair.rejected_ids)),
        )
        assert row[COLUMNS.index("shared_prefix")] == prefix
        assert row[COLUMNS.index("ref_margin")] == pytest.approx(
            float(row[COLUMNS.index("ref_chosen_logps")] - row[COLUMNS.index("ref_rejected_logps")])
        )
    ches = values[:, COLUMNS.index("ches")]
    assert ches.std() > 0  # not a constant: the pairs differ


@pytest.mark.slow
def test_ches_equals_an_independent_computation_on_smollm2(smollm2_tokenizer):
    from prefopt.model.loading import load_model, resolve_model_source
    from tests.helpers import preset
    from tests.test_dynamics import make_pair

    model_cfg = preset("model", "smollm2_135m")
    model = load_model(model_cfg, resolve_model_source(model_cfg), len(smollm2_tokenizer), seed=0).eval()
    pairs = [make_pair(smollm2_tokenizer, index, 3 + index, 10 + 7 * index) for index in range(4)]
    for layout in (PADDED, BatchLayout("packed")):
        values = score_pairs(model, pairs, layout, GATES, chunk_size=64, device="cpu", pad_id=0)
        assert_close_to_independent(model, pairs, values, 1e-4)


def test_inspect_writes_its_table_caches_it_and_two_ranks_equal_one(tmp_path):
    cache = f"inspect.cache_dir={tmp_path / 'cache'}"
    first = tmp_path / "first"
    assert run_inspect(first, *TINY, cache) == 0
    table = pandas.read_parquet(first / "inspection.parquet")
    assert list(table.columns[:2]) == ["split", "index"] and len(table) == 30
    assert (table["split"] == "train").sum() == 24
    assert pandas.read_csv(first / "inspection.csv").shape == table.shape
    for name in ("inspection_histograms.png", "inspection_scatter.png", "inspection.md"):
        assert (first / name).stat().st_size > 0
    assert "ches_norm" in (first / "inspection.md").read_text()
    again = tmp_path / "again"
    assert run_inspect(again, *TINY, cache) == 0
    assert "inspection cache hit" in (again / "cli.log").read_text()
    pandas.testing.assert_frame_equal(pandas.read_parquet(again / "inspection.parquet"), table)
    two = tmp_path / "two_ranks"
    assert run_inspect(two, *TINY, "hardware=cpu_2proc", f"inspect.cache_dir={tmp_path / 'cache2'}") == 0
    pandas.testing.assert_frame_equal(pandas.read_parquet(two / "inspection.parquet"), table, rtol=1e-5)


def run_inspect(run_dir, *overrides: str) -> int:
    import sys

    from prefopt.cli import main

    argv = sys.argv
    try:
        return main(["inspect", *overrides, f"hydra.run.dir={run_dir}"])
    finally:
        sys.argv = argv


def test_filter_trains_on_the_pairs_the_column_keeps(tmp_path):
    cache = f"inspect.cache_dir={tmp_path / 'cache'}"
    assert run_inspect(tmp_path / "inspect", *TINY, cache, "inspect.split=train") == 0
    table = pandas.read_parquet(tmp_path / "inspect" / "inspection.parquet")
    cut = float(torch.quantile(torch.tensor(table["ches_norm"].to_numpy()), 0.75))
    expected_kept = int((table["ches_norm"] <= cut).sum())
    run_dir = run_train(
        tmp_path / "run",
        *TINY,
        cache,
        "trainer.max_steps=2",
        "dynamics.enabled=false",
        "trainer.greedy_eval_examples=0",
        "trainer.save_final=false",
        "dataset.filter.column=ches_norm",
        "dataset.filter.quantile=0.75",
    )
    [data_row] = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "data/train/pairs" in row]
    assert data_row["data/train/pairs"] == expected_kept == 18
    assert data_row["data/train/filter_dropped"] == 24 - expected_kept
    assert data_row["data/train/filter_cut"] == pytest.approx(cut)
    assert "inspection cache hit" in (run_dir / "cli.log").read_text()  # the filter read what inspect computed


def test_filter_and_inspect_refuse_bad_settings(tmp_path, capsys):
    for overrides, needle in (
        (["dataset.filter.column=chess"], "dataset.filter.column=chess is not an inspected column"),
        (["dataset.filter.column=ches"], "exactly one of dataset.filter.quantile"),
        (["dataset.filter.column=ches", "dataset.filter.quantile=1.5"], "quantile=1.5 must be in [0, 1]"),
        (["dataset.filter.quantile=0.5"], "dataset.filter.column is null"),
        (["inspect.gates=[seq,none]"], "inspect.gates: 'none' is not a gate kind"),
        (["dataset.filter.column=gate_log", "dataset.filter.threshold=0.5"], "needs the kind in inspect.gates"),
    ):
        code, err = command_fails(capsys, "train", tmp_path / "run", *TINY, *overrides)
        assert code == 2 and needle in err, (overrides, err)
    code, err = command_fails(capsys, "inspect", tmp_path / "insp", *TINY, f"inspect.policy={tmp_path}")
    assert code == 2 and "inspect.policy=" in err


def test_inspect_with_a_policy_reports_how_far_the_run_moved_each_pair(tmp_path):
    run_dir = run_train(
        tmp_path / "run",
        *TINY,
        "trainer.max_steps=3",
        "trainer.micro_batch_size=4",
        "trainer.lr=1e-3",
        "dynamics.enabled=false",
        "trainer.greedy_eval_examples=0",
    )
    inspected = tmp_path / "inspect"
    assert run_inspect(inspected, f"inspect.policy={run_dir}", "hardware=cpu", "logger.wandb.mode=disabled") == 0
    table = pandas.read_parquet(inspected / "inspection.parquet")
    train = table[table["split"] == "train"]
    assert train["visits"].sum() == 3 * 4  # steps x pairs per step
    assert (table["chosen_change"] == table["policy_chosen_logps"] - table["ref_chosen_logps"]).all()
    assert train["chosen_change"].abs().max() > 1e-3  # lr 1e-3 moved them
    summary = (inspected / "inspection.md").read_text()
    assert "Spearman(ches_norm, chosen_change) over the" in summary
    drawn = train[train["visits"] > 0]
    rho = spearman(drawn["ches_norm"].tolist(), drawn["chosen_change"].tolist()).rho
    assert f"{rho:+.3f}" in summary
