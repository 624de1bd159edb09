"""Per-token views of the probes (prefopt/train/token_views.py, observe/token_heatmaps.py): the per-token values
equal a direct full-vocabulary computation and add up to the sequence sums dynamics.jsonl logs (packed and
padded), deltas are from step 0, the top gainers equal a direct computation from full distributions, a resumed
run writes the same tables as an uninterrupted one, and the heatmaps are drawn and redrawn from the run dir."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from prefopt.data import PreferenceData
from prefopt.data.layout import PADDED, BatchLayout
from prefopt.observe.token_heatmaps import load_token_views, plot_token_views
from prefopt.observe.tracking import read_jsonl
from prefopt.train.dynamics import build_probe_set, measure_probes
from prefopt.train.token_views import GAINER_COLUMNS, KINDS, token_decoder, token_rows, top_gainers
from tests.helpers import run_train, tiny_byte_llama
from tests.test_dynamics import make_pair
from tests.test_metrics import latest_table
from tests.test_train import TINY

PACKED = BatchLayout("packed", 64)  # small rows: the probes' groups spread over several packed rows
LAYOUTS = [pytest.param(PACKED, id="packed"), pytest.param(PADDED, id="padded")]
CHUNK = 5  # log-softmax chunks cut through responses, so a token's mass is summed over chunks


@pytest.fixture(scope="module")
def tokenizer(byte_tokenizer):
    return byte_tokenizer


def tiny_model(tokenizer, seed: int = 0):
    return tiny_byte_llama(tokenizer, seed, tie_word_embeddings=False).eval()


@pytest.fixture(scope="module")
def probes(tokenizer):
    train = [make_pair(tokenizer, i, i, 2 * i + 1) for i in range(6)]
    held_out = [make_pair(tokenizer, 100 + i, 10 + 37 * i, 3 * i) for i in range(3)]  # responses of different lengths
    return build_probe_set(PreferenceData(train, held_out), 3, 7, len(tokenizer), set(tokenizer.all_special_ids))


def full_distributions(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log pi(. | x, y_<t) at each response position t, from the model's own logits (float64 log-softmax)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) + len(response) - 1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_token_values_equal_full_distributions_and_the_sequence_sums(tokenizer, probes, layout):
    model = tiny_model(tokenizer)
    measure = measure_probes(model, probes, CHUNK, "cpu", 2, layout, token_views=True)
    tokens, stats = measure.tokens, measure.stats
    mass = torch.zeros(len(tokenizer), dtype=torch.float64)
    for probe, prompt in enumerate(probes.prompt_ids):
        chosen, rejected = probes.responses["chosen"][probe], probes.responses["rejected"][probe]
        chosen_rows = full_distributions(model, prompt, chosen)
        rejected_rows = full_distributions(model, prompt, rejected)
        expected = {
            "chosen": chosen_rows[torch.arange(len(chosen)), torch.tensor(chosen)],
            "rejected": rejected_rows[torch.arange(len(rejected)), torch.tensor(rejected)],
            "greedy": chosen_rows.max(-1).values,
        }
        for kind in KINDS:
            assert tokens.logps[kind][probe] == pytest.approx(expected[kind].tolist(), abs=1e-5), (kind, probe)
        assert tokens.token_ids["greedy"][probe] == chosen_rows.argmax(-1).tolist()
        assert tokens.token_ids["chosen"][probe] == chosen and tokens.token_ids["rejected"][probe] == rejected
        mass += chosen_rows.exp().sum(0)
        # the per-token values add up to the per-sequence sums the same forward gave dynamics.jsonl
        assert sum(tokens.logps["chosen"][probe]) == pytest.approx(float(stats["chosen"]["logp"][probe]), abs=1e-5)
        assert sum(tokens.logps["rejected"][probe]) == pytest.approx(float(stats["rejected"]["logp"][probe]), abs=1e-5)
        assert sum(tokens.logps["greedy"][probe]) == pytest.approx(float(stats["chosen"]["greedy"][probe]), abs=1e-5)
    torch.testing.assert_close(tokens.mass, mass, rtol=0, atol=1e-5)
    assert float(tokens.mass.sum()) == pytest.approx(sum(len(ids) for ids in probes.responses["chosen"]), abs=1e-4)


def test_top_gainers_equal_a_direct_computation_from_full_distributions(tokenizer, probes):
    """Step 0: a model; a later step: the same model with one token's output row pushed along the hidden states'
    mean direction (that token gains everywhere) and noise on every weight. Gains, ranking and argmax counts
    against log_softmax of the two models' logits at every chosen position."""
    start = tiny_model(tokenizer)
    later = copy.deepcopy(start)
    boosted = tokenizer.convert_tokens_to_ids("7")
    with torch.no_grad():
        hidden = later.model(torch.tensor([probes.prompt_ids[0] + probes.responses["chosen"][0]])).last_hidden_state
        later.lm_head.weight[boosted] += 2.0 * hidden[0].mean(0) / hidden[0].mean(0).norm()
        generator = torch.Generator().manual_seed(3)
        for parameter in later.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    measure = lambda model: measure_probes(model, probes, CHUNK, "cpu", 2, PACKED, token_views=True).tokens  # noqa: E731
    baseline, tokens = measure(start), measure(later)
    decode = token_decoder(tokenizer)
    rows = [dict(zip(GAINER_COLUMNS, row)) for row in top_gainers(tokens, baseline, 6, decode)]

    gain = torch.zeros(len(tokenizer), dtype=torch.float64)
    argmax_now, argmax_start = Counter(), Counter()
    for prompt, chosen in zip(probes.prompt_ids, probes.responses["chosen"]):
        before, after = full_distributions(start, prompt, chosen), full_distributions(later, prompt, chosen)
        gain += (after.exp() - before.exp()).sum(0)
        argmax_now.update(after.argmax(-1).tolist())
        argmax_start.update(before.argmax(-1).tolist())
    expected = torch.sort(gain, descending=True).indices[:6].tolist()
    assert [row["token_id"] for row in rows] == expected and rows[0]["token_id"] == boosted
    assert [row["rank"] for row in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        token = row["token_id"]
        assert row["gain"] == pytest.approx(float(gain[token]), abs=1e-5)
        assert row["gain"] == pytest.approx(row["mass"] - row["mass_start"], abs=1e-12)
        assert row["argmax_count"] == argmax_now[token] and row["argmax_count_start"] == argmax_start[token]
        assert row["token"] == decode(token)
    assert rows[0]["argmax_count"] > rows[0]["argmax_count_start"]  # the boosted token took over positions
    assert float((tokens.mass - baseline.mass).sum()) == pytest.approx(0.0, abs=1e-4)  # mass moves, is not made


def test_token_rows_are_deltas_from_the_baseline(tokenizer, probes):
    start, later = tiny_model(tokenizer), tiny_model(tokenizer, seed=1)
    baseline = measure_probes(start, probes, CHUNK, "cpu", 2, PACKED, token_views=True).tokens
    tokens = measure_probes(later, probes, CHUNK, "cpu", 2, PACKED, token_views=True).tokens
    decode = token_decoder(tokenizer)
    assert all(row["delta"] == 0.0 for row in token_rows(0, baseline, baseline, decode))
    rows = token_rows(5, tokens, baseline, decode)
    expected_count = sum(2 * len(c) + len(r) for c, r in zip(probes.responses["chosen"], probes.responses["rejected"]))
    assert len(rows) == expected_count
    for row in rows:
        before = baseline.logps[row["kind"]][row["probe"]][row["position"]]
        assert row["delta"] == row["logp"] - before and row["step"] == 5
        assert row["token_id"] == tokens.token_ids[row["kind"]][row["probe"]][row["position"]]


# ---- end to end: `prefopt train` writes the tables and the heatmaps

RUN = [
    *TINY,
    "trainer.max_steps=4",
    "dynamics.every_n_steps=2",
    "dynamics.num_probes=3",
    "dynamics.token_view_probes=2",
    "dynamics.top_gainers=5",
    "trainer.save_every=2",
]


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    """A packed run with W&B (offline): probes at steps 0, 2, 4."""
    return run_train(tmp_path_factory.mktemp("packed") / "run", *RUN, "trainer.batching=packed")


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory):
    return run_train(
        tmp_path_factory.mktemp("padded") / "run", *RUN, "trainer.batching=padded", "logger.wandb.mode=disabled"
    )


def token_table(run_dir) -> dict[tuple, dict]:
    return {
        (row["step"], row["probe"], row["kind"], row["position"]): row
        for row in read_jsonl(run_dir / "token_views.jsonl")
    }


@pytest.mark.parametrize("run", ["packed_run", "padded_run"])
def test_the_table_adds_up_to_dynamics_jsonl_and_its_deltas_are_from_step_0(run, request):
    run_dir = request.getfixturevalue(run)
    table = token_table(run_dir)
    dynamics = read_jsonl(run_dir / "dynamics.jsonl")
    assert [row["step"] for row in dynamics] == [0, 2, 4] == sorted({key[0] for key in table})
    for metrics in dynamics:
        step = metrics["step"]
        for kind in KINDS:
            sums = [
                sum(row["logp"] for key, row in table.items() if key[:3] == (step, probe, kind)) for probe in range(3)
            ]
            assert sum(sums) / 3 == pytest.approx(metrics[f"dynamics/{kind}/logp"], abs=1e-5), (step, kind)
    for (step, probe, kind, position), row in table.items():
        assert row["delta"] == pytest.approx(row["logp"] - table[(0, probe, kind, position)]["logp"], abs=1e-12)
        assert step > 0 or row["delta"] == 0.0
    assert any(row["delta"] != 0.0 for row in table.values())


def test_top_gainers_file_and_wandb_table(packed_run):
    gainers = read_jsonl(packed_run / "top_gainers.jsonl")
    assert [(row["step"], row["rank"]) for row in gainers] == [(step, rank) for step in (2, 4) for rank in range(1, 6)]
    assert all(row["table"] == "dynamics/top_gainers" for row in gainers)
    for step in (2, 4):
        gains = [row["gain"] for row in gainers if row["step"] == step]
        assert gains == sorted(gains, reverse=True) and gains[0] > 0
    table = latest_table(packed_run, "dynamics/top_gainers")  # the latest version holds every step's rows
    assert table["columns"] == ["step", *GAINER_COLUMNS]
    assert [row[:3] for row in table["data"]] == [[row["step"], row["rank"], row["token_id"]] for row in gainers]


def test_heatmaps_are_written_and_redrawn_from_the_run_dir(packed_run, tmp_path):
    pngs = sorted((packed_run / "token_views").iterdir())
    assert [path.name for path in pngs] == ["probe-0.png", "probe-1.png"]  # dynamics.token_view_probes=2 of 3
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in pngs)
    redrawn = plot_token_views(packed_run, output_dir=tmp_path / "again")  # every probe
    assert [path.name for path in redrawn] == ["probe-0.png", "probe-1.png", "probe-2.png"]
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in redrawn)
    views = load_token_views(packed_run)
    chosen = views[0]["chosen"]
    assert chosen.steps == [0, 2, 4] and chosen.deltas[0] == [0.0] * len(chosen.labels)


def test_a_resumed_run_writes_the_tables_of_an_uninterrupted_one(padded_run, tmp_path):
    common = [*RUN, "trainer.batching=padded", "logger.wandb.mode=disabled"]
    stopped = run_train(tmp_path / "stopped", *common, "trainer.stop_after=2")
    assert sorted({row["step"] for row in read_jsonl(stopped / "token_views.jsonl")}) == [0, 2]
    run_train(tmp_path / "stopped", *common, "trainer.resume=true")
    for name in ("token_views.jsonl", "top_gainers.jsonl"):
        resumed, straight = read_jsonl(stopped / name), read_jsonl(padded_run / name)
        assert len(resumed) == len(straight), name
        for row_a, row_b in zip(resumed, straight):
            assert row_a.keys() == row_b.keys()
            for key, value in row_a.items():
                if isinstance(value, float):
                    assert value == pytest.approx(row_b[key], rel=1e-6, abs=1e-7), (name, row_a)
                else:
                    assert value == row_b[key], (name, key)
    assert any(row["step"] == 4 and row["delta"] != 0.0 for row in read_jsonl(stopped / "token_views.jsonl"))
