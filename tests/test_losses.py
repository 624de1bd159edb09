"""The loss zoo and the gate: values and gradients against plain re-implementations of the formulas,
the gate's exact gradient scaling, edge cases, config validation and the conf/loss/*.yaml files.

Everything is float64 on CPU; the reference implementations below use `math`, one example at a time,
and never the package's helpers.
"""

import dataclasses
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.losses import LOSSES, GateParams, get_loss, preference_loss, validate_loss_config

REPO = Path(__file__).resolve().parents[1]
LOSS_CONF = REPO / "conf" / "loss"
GATE_PRESETS = {f"gate_{base}": base for base in ("dpo", "ipo", "cal_dpo", "dpo_shift", "lpo")}
GATE_KIND_OF_PRESET = {"gate_dpo_q10": "q10"}  # presets with another gate kind than seq
GATE_PRESETS["gate_dpo_q10"] = "dpo"
GATE_KINDS = ("seq", "q10", "log", "token")
GATED_LOSSES = [name for name in LOSSES if get_loss(name).has_rejected_term]


# ----------------------------------------------------------------------------- plain references


def logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def log_odds(mean_logp):
    return mean_logp - math.log(1 - math.exp(mean_logp))


def reference_loss(name, hp, pc, pr, rc, rr, lc, lr, progress):
    """One example's loss, straight from the formula in the task description / paper."""
    if hp.get("length_average", name in ("simpo", "orpo", "sft", "sft_extend")):
        pc, pr = pc / lc, pr / lr
        rc, rr = rc / lc, rr / lr
    h = (pc - rc) - (pr - rr)
    beta = hp.get("beta")
    if name in ("dpo", "cdpo"):
        eps = hp["label_smoothing"]
        return -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    if name == "robust_dpo":
        eps = hp["label_smoothing"]
        return (-(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 * eps)
    if name == "hinge":
        return max(0.0, 1 - beta * h)
    if name == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if name == "cal_dpo":
        rw, rl = pc - rc, pr - rr
        return -logsigmoid(rw - rl) + 0.5 * ((rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2)
    if name == "simpo":
        return -logsigmoid(beta * (pc - pr) - hp["gamma"])
    if name == "dpop":
        return -logsigmoid(beta * (h - hp["penalty_lambda"] * max(0.0, rc - pc)))
    if name == "orpo":
        return -pc - hp["odds_ratio_lambda"] * logsigmoid(log_odds(pc) - log_odds(pr))
    if name == "dpo_shift":
        f = {
            "fixed": hp["f"],
            "increase": hp["f_min"] + (hp["f_max"] - hp["f_min"]) * progress,
            "decrease": hp["f_max"] - (hp["f_max"] - hp["f_min"]) * progress,
        }[hp["shift_schedule"]]
        return -logsigmoid(beta * ((pc - rc) - f * (pr - rr)))
    if name == "lpo":
        x1, x2, off = pc - rc, pr - rr, 1 / (2 * beta)
        return 4 * beta * abs(x1 - x2 - off) + hp["gamma"] * max(0.0, rc - pc)  # forward value of every variant
    if name == "sft":
        return -pc
    if name == "sft_extend":
        return -(pc + pr) / 2
    raise KeyError(name)


# Non-default hyperparameters, so a default hard-coded in a loss would show.
CASES = [
    ("dpo", {"beta": 0.3, "label_smoothing": 0.0}),
    ("dpo", {"beta": 0.2, "label_smoothing": 0.2}),
    ("cdpo", {"beta": 0.15, "label_smoothing": 0.25}),
    ("robust_dpo", {"beta": 0.2, "label_smoothing": 0.2}),
    ("hinge", {"beta": 0.25}),
    ("ipo", {"beta": 0.4, "length_average": True}),
    ("ipo", {"beta": 0.05, "length_average": False}),
    ("cal_dpo", {"beta": 0.3}),
    ("simpo", {"beta": 2.5, "gamma": 0.7}),
    ("dpop", {"beta": 0.3, "penalty_lambda": 5.0}),
    ("orpo", {"odds_ratio_lambda": 0.3}),
    ("dpo_shift", {"beta": 0.2, "shift_schedule": "fixed", "f": 0.8, "f_min": 0.5, "f_max": 0.9}),
    ("dpo_shift", {"beta": 0.2, "shift_schedule": "increase", "f": 0.8, "f_min": 0.5, "f_max": 0.9}),
    ("dpo_shift", {"beta": 0.2, "shift_schedule": "decrease", "f": 0.8, "f_min": 0.5, "f_max": 0.9}),
    ("lpo", {"beta": 0.2, "r1": 1.0, "r2": 0.2, "gamma": 10.0, "variant": "ste", "length_average": True}),
    ("lpo", {"beta": 0.1, "r1": 0.5, "r2": 1.5, "gamma": 3.0, "variant": "ste", "length_average": False}),
    ("lpo", {"beta": 0.3, "gamma": 2.0, "variant": "plain", "length_average": True}),
    ("lpo", {"beta": 0.3, "gamma": 0.0, "variant": "ste_dynamic", "length_average": True}),
    ("sft", {}),
    ("sft_extend", {}),
]


# ----------------------------------------------------------------------------- batches


def make_batch(seed, batch=6, max_len=9, valley_rows=(1, 4)):
    """Random pairs: per-token log-probs with masks, their sums, and references near the policy."""
    rng = np.random.default_rng(seed)

    def tokens():
        lengths = rng.integers(1, max_len + 1, batch)
        mask = (np.arange(max_len)[None, :] < lengths[:, None]).astype(np.float64)
        logps = rng.uniform(-3.5, -0.01, (batch, max_len))
        logps[list(valley_rows)] -= 4.0  # some responses sit in a probability valley
        return logps * mask, mask, lengths

    chosen_tokens, chosen_mask, chosen_lengths = tokens()
    rejected_tokens, rejected_mask, rejected_lengths = tokens()
    return {
        "chosen_tokens": chosen_tokens,
        "chosen_mask": chosen_mask,
        "chosen_lengths": chosen_lengths,
        "rejected_tokens": rejected_tokens,
        "rejected_mask": rejected_mask,
        "rejected_lengths": rejected_lengths,
        "reference_chosen": chosen_tokens.sum(1) + rng.normal(0, 1.5, batch),
        "reference_rejected": rejected_tokens.sum(1) + rng.normal(0, 1.5, batch),
    }


def run_loss(name, batch, gate=None, progress=0.3, **hp):
    """preference_loss on `batch` as the trainer calls it; returns (output, leaf tensors)."""
    leaves = {
        "chosen_tokens": torch.tensor(batch["chosen_tokens"], requires_grad=True),
        "rejected_tokens": torch.tensor(batch["rejected_tokens"], requires_grad=True),
    }
    chosen_mask = torch.tensor(batch["chosen_mask"])
    rejected_mask = torch.tensor(batch["rejected_mask"])
    out = preference_loss(
        name,
        policy_chosen_logps=(leaves["chosen_tokens"] * chosen_mask).sum(-1),
        policy_rejected_logps=(leaves["rejected_tokens"] * rejected_mask).sum(-1),
        reference_chosen_logps=torch.tensor(batch["reference_chosen"]) if get_loss(name).needs_reference else None,
        reference_rejected_logps=torch.tensor(batch["reference_rejected"]) if get_loss(name).needs_reference else None,
        chosen_lengths=torch.tensor(batch["chosen_lengths"]),
        rejected_lengths=torch.tensor(batch["rejected_lengths"]),
        chosen_token_logps=leaves["chosen_tokens"],
        chosen_mask=chosen_mask,
        rejected_token_logps=leaves["rejected_tokens"],
        rejected_mask=rejected_mask,
        gate=gate,
        progress=progress,
        **hp,
    )
    return out, leaves


def gradients(out, leaves):
    """Gradients of the summed per-example losses w.r.t. the chosen and rejected token log-probs."""
    chosen, rejected = torch.autograd.grad(out.losses.sum(), [leaves["chosen_tokens"], leaves["rejected_tokens"]])
    return chosen.numpy(), rejected.numpy()


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_value_matches_formula(name, hp):
    batch = make_batch(seed=zlib.crc32(name.encode()) % 1000)
    out, _ = run_loss(name, batch, progress=0.3, **hp)
    pc, pr = batch["chosen_tokens"].sum(1), batch["rejected_tokens"].sum(1)
    expected = [
        reference_loss(
            name,
            hp,
            pc[i],
            pr[i],
            batch["reference_chosen"][i],
            batch["reference_rejected"][i],
            batch["chosen_lengths"][i],
            batch["rejected_lengths"][i],
            0.3,
        )
        for i in range(len(pc))
    ]
    np.testing.assert_allclose(out.losses.detach().numpy(), expected, rtol=1e-6, atol=1e-9)
    assert out.loss.item() == pytest.approx(np.mean(expected), rel=1e-6)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def at_reference(name, **hp):
    """Loss with policy == reference (log-probs -7 and -9 over 3 and 4 tokens)."""
    policy_chosen = torch.tensor([-7.0], dtype=torch.float64)
    policy_rejected = torch.tensor([-9.0], dtype=torch.float64)
    return preference_loss(
        name,
        policy_chosen_logps=policy_chosen,
        policy_rejected_logps=policy_rejected,
        reference_chosen_logps=policy_chosen.clone(),
        reference_rejected_logps=policy_rejected.clone(),
        chosen_lengths=torch.tensor([3]),
        rejected_lengths=torch.tensor([4]),
        **hp,
    ).loss.item()


def test_known_points_at_the_reference():
    assert at_reference("dpo") == pytest.approx(math.log(2))
    assert at_reference("ipo", beta=0.1) == pytest.approx((1 / 0.2) ** 2)
    assert at_reference("hinge") == pytest.approx(1.0)
    assert at_reference("lpo", beta=0.2) == pytest.approx(2.0)  # 4 * 0.2 * |0 - 2.5|, gamma term 0
    assert at_reference("cal_dpo", beta=0.1) == pytest.approx(math.log(2) + 1 / (4 * 0.1**2))
    assert at_reference("robust_dpo", label_smoothing=0.2) == pytest.approx(math.log(2))


def test_rewards():
    batch = make_batch(seed=3)
    out, _ = run_loss("dpo", batch, beta=0.3)
    pc = batch["chosen_tokens"].sum(1)
    np.testing.assert_allclose(out.chosen_rewards.numpy(), 0.3 * (pc - batch["reference_chosen"]), rtol=1e-12)
    out, _ = run_loss("simpo", batch, beta=2.0)
    np.testing.assert_allclose(out.chosen_rewards.numpy(), 2.0 * pc / batch["chosen_lengths"], rtol=1e-12)


def test_loss_specific_metrics():
    batch = make_batch(seed=4)
    assert run_loss("dpo_shift", batch, progress=0.5, shift_schedule="increase", f_min=0.5, f_max=0.9)[0].metrics[
        "dpo_shift/f"
    ] == pytest.approx(0.7)
    assert "lpo/pos_reg" in run_loss("lpo", batch)[0].metrics
    assert not any(key.startswith("gate/") for key in run_loss("dpo", batch)[0].metrics)
    assert not any(key.startswith("gate/") for key in run_loss("dpo", batch, gate={"kind": "none"})[0].metrics)


# ----------------------------------------------------------------------------- gradients


def analytic_gradient(name, hp, x1, x2, lc, lr):
    """(dL/d policy_chosen_logps, dL/d policy_rejected_logps) for one example, x = log pi - log pi_ref
    on the loss's own log-prob kind; lc, lr are the divisors of the length averaging (1 if summed)."""
    beta = hp["beta"]
    if name == "dpo":
        z, eps = beta * (x1 - x2), hp["label_smoothing"]
        dz = -(1 - eps) * sigmoid(-z) + eps * sigmoid(z)
        return beta * dz / lc, -beta * dz / lr
    if name == "ipo":
        d = 2 * (x1 - x2 - 1 / (2 * beta))
        return d / lc, -d / lr
    if name == "cal_dpo":
        s = sigmoid(-(x1 - x2))
        return (-s + (x1 - 1 / (2 * beta))) / lc, (s + (x2 + 1 / (2 * beta))) / lr
    if name == "lpo":
        sign = float(np.sign(x1 - x2 - 1 / (2 * beta)))
        if hp["variant"] == "plain":
            w1 = w2 = 2.0
        elif hp["variant"] == "ste_dynamic":
            r2 = math.exp(x2 - x1)
            w1, w2 = 2 / (1 + r2), 2 * r2 / (1 + r2)
        else:
            w1, w2 = 2 * hp["r1"] / (hp["r1"] + hp["r2"]), 2 * hp["r2"] / (hp["r1"] + hp["r2"])
        positive = -hp["gamma"] if x1 < 0 else 0.0  # d/dx1 of gamma * relu(-x1)
        return (2 * beta * w1 * sign + positive) / lc, (-2 * beta * w2 * sign) / lr
    raise KeyError(name)


GRADIENT_CASES = [case for case in CASES if case[0] in ("dpo", "ipo", "cal_dpo", "lpo")]


@pytest.mark.parametrize("name,hp", GRADIENT_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GRADIENT_CASES)])
def test_gradient_matches_analytic(name, hp):
    batch = make_batch(seed=11)
    out, leaves = run_loss(name, batch, **hp)
    chosen_grad, rejected_grad = gradients(out, leaves)
    averaged = hp.get("length_average", False)
    for i in range(len(batch["chosen_lengths"])):
        lc = float(batch["chosen_lengths"][i]) if averaged else 1.0
        lr = float(batch["rejected_lengths"][i]) if averaged else 1.0
        x1 = (batch["chosen_tokens"][i].sum() - batch["reference_chosen"][i]) / lc
        x2 = (batch["rejected_tokens"][i].sum() - batch["reference_rejected"][i]) / lr
        expected_chosen, expected_rejected = analytic_gradient(name, hp, x1, x2, lc, lr)
        # the summed log-prob is a masked sum of token log-probs: each response token gets the same gradient
        np.testing.assert_allclose(chosen_grad[i], expected_chosen * batch["chosen_mask"][i], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(
            rejected_grad[i], expected_rejected * batch["rejected_mask"][i], rtol=1e-6, atol=1e-12
        )


def test_lpo_ste_splits_the_gradient_by_r1_r2():
    batch = make_batch(seed=12)
    hp = {"beta": 0.2, "r1": 1.0, "r2": 0.2, "gamma": 0.0, "length_average": False}
    ste_c, ste_r = gradients(*run_loss("lpo", batch, variant="ste", **hp))
    plain_c, plain_r = gradients(*run_loss("lpo", batch, variant="plain", **hp))
    np.testing.assert_allclose(ste_c, plain_c * 2 * 1.0 / 1.2 / 2, rtol=1e-12)
    np.testing.assert_allclose(ste_r, plain_r * 2 * 0.2 / 1.2 / 2, rtol=1e-12)


# ----------------------------------------------------------------------------- the gate

# tau per kind so that the test batch has gates on both sides of 1/2 (q10 estimates a lower probability)
GATE = {"alpha": 30.0, "tau": 0.15, "quantile": 0.2, "kappa": 2.0}
GATE_TAU = {"seq": 0.15, "q10": 0.05, "log": 0.15, "token": 0.15}


def expected_gates(kind, batch, gate):
    """The gate per example (per token for kind token), from its definition."""
    tokens, mask, lengths = batch["rejected_tokens"], batch["rejected_mask"], batch["rejected_lengths"]
    rows = []
    for i in range(len(lengths)):
        response = tokens[i][mask[i] > 0]
        mean_logp = response.sum() / lengths[i]
        if kind == "seq":
            rows.append(sigmoid(gate["alpha"] * (math.exp(mean_logp) - gate["tau"])))
        elif kind == "log":
            rows.append(sigmoid(gate["kappa"] * (mean_logp - math.log(gate["tau"]))))
        elif kind == "q10":
            low_prob = float(np.quantile(np.exp(response), gate["quantile"]))
            rows.append(sigmoid(gate["alpha"] * (low_prob - gate["tau"])))
        else:
            rows.append([sigmoid(gate["alpha"] * (math.exp(t) - gate["tau"])) * m for t, m in zip(tokens[i], mask[i])])
    return np.array(rows)


@pytest.mark.parametrize("kind", GATE_KINDS)
@pytest.mark.parametrize("name", GATED_LOSSES)
def test_gate_scales_only_the_rejected_gradient(name, kind):
    batch = make_batch(seed=21)
    gate = {**GATE, "kind": kind, "tau": GATE_TAU[kind]}
    plain = run_loss(name, batch)
    gated = run_loss(name, batch, gate=gate)
    assert torch.equal(gated[0].losses, plain[0].losses)  # value unchanged, bit for bit
    plain_chosen, plain_rejected = gradients(*plain)
    gated_chosen, gated_rejected = gradients(*gated)
    np.testing.assert_array_equal(gated_chosen, plain_chosen)
    g = expected_gates(kind, batch, gate)
    assert ((g >= 0) & (g <= 1)).all() and g.min() < 0.5 < g.max()  # the test batch spans the gate
    scale = g if kind == "token" else g[:, None]
    np.testing.assert_allclose(gated_rejected, scale * plain_rejected, rtol=1e-9, atol=1e-12)
    metrics = gated[0].metrics
    g_values = g[batch["rejected_mask"] > 0] if kind == "token" else g
    assert metrics["gate/mean"] == pytest.approx(g_values.mean(), rel=1e-9)
    assert metrics["gate/min"] == pytest.approx(g_values.min(), rel=1e-9)
    assert metrics["gate/frac_below_half"] == pytest.approx((g_values < 0.5).mean())
    assert 0.0 <= metrics["gate/min"] <= metrics["gate/mean"] <= 1.0


@pytest.mark.parametrize("kind", ["q10", "token"])
def test_gate_ignores_padding(kind):
    batch = make_batch(seed=22)
    gate = {"kind": kind, **GATE}
    reference_metrics = run_loss("dpo", batch, gate=gate)[0].metrics
    for padding_logp in (0.0, -1e-3, -30.0):  # probability ~1 or ~0 in the padding
        padded_tokens = np.where(batch["rejected_mask"] > 0, batch["rejected_tokens"], padding_logp)
        out, leaves = run_loss("dpo", dict(batch, rejected_tokens=padded_tokens), gate=gate)
        assert out.metrics == pytest.approx(reference_metrics, rel=1e-12)
        assert (gradients(out, leaves)[1][batch["rejected_mask"] == 0] == 0).all()


def test_gate_on_seq_and_log_needs_no_tokens_and_accepts_dictconfig():
    summed = torch.tensor([-20.0, -2.0], dtype=torch.float64, requires_grad=True)
    out = preference_loss(
        "dpo",
        policy_chosen_logps=torch.tensor([-3.0, -3.0], dtype=torch.float64),
        policy_rejected_logps=summed,
        reference_chosen_logps=torch.tensor([-3.0, -3.0], dtype=torch.float64),
        reference_rejected_logps=torch.tensor([-3.0, -3.0], dtype=torch.float64),
        chosen_lengths=torch.tensor([4, 4]),
        rejected_lengths=torch.tensor([4, 4]),
        gate=OmegaConf.create({"kind": "seq", "alpha": 50.0, "tau": 0.05}),
    )
    (grad,) = torch.autograd.grad(out.losses.sum(), summed)
    g = [sigmoid(50 * (math.exp(-5.0) - 0.05)), sigmoid(50 * (math.exp(-0.5) - 0.05))]
    s = sigmoid(-0.1 * (0.0 - (-20.0 + 3.0))), sigmoid(-0.1 * (0.0 - (-2.0 + 3.0)))
    np.testing.assert_allclose(grad.numpy(), [g[0] * 0.1 * s[0], g[1] * 0.1 * s[1]], rtol=1e-9)
    assert g[0] < 0.15 and g[1] > 0.99  # the defaults close the gate in a valley and open it elsewhere


def test_token_gates_need_token_logps():
    with pytest.raises(ValueError, match="rejected_token_logps"):
        preference_loss(
            "dpo",
            policy_chosen_logps=torch.zeros(2),
            policy_rejected_logps=torch.zeros(2),
            reference_chosen_logps=torch.zeros(2),
            reference_rejected_logps=torch.zeros(2),
            chosen_lengths=torch.ones(2),
            rejected_lengths=torch.ones(2),
            gate={"kind": "q10"},
        )


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("policy,reference", [(-1e4, -1.0), (-1.0, -1e4), (-1e4, -1e4)])
def test_extreme_inputs_stay_finite(name, policy, reference):
    gates = [None] + ([{"kind": kind} for kind in GATE_KINDS] if get_loss(name).has_rejected_term else [])
    for gate in gates:
        chosen = torch.tensor([[policy]], dtype=torch.float64, requires_grad=True)  # batch of 1, length 1
        rejected = torch.tensor([[policy]], dtype=torch.float64, requires_grad=True)
        mask = torch.ones(1, 1, dtype=torch.float64)
        out = preference_loss(
            name,
            policy_chosen_logps=chosen.sum(-1),
            policy_rejected_logps=rejected.sum(-1),
            reference_chosen_logps=torch.tensor([reference], dtype=torch.float64),
            reference_rejected_logps=torch.tensor([reference - 1], dtype=torch.float64),
            chosen_lengths=torch.tensor([1]),
            rejected_lengths=torch.tensor([1]),
            chosen_token_logps=chosen,
            chosen_mask=mask,
            rejected_token_logps=rejected,
            rejected_mask=mask,
            gate=gate,
        )
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(chosen.grad).all()
        assert rejected.grad is None if name == "sft" else torch.isfinite(rejected.grad).all()
        assert all(math.isfinite(value) for value in out.metrics.values())


def test_missing_reference_is_an_error():
    with pytest.raises(ValueError, match="reference"):
        preference_loss(
            "dpo",
            policy_chosen_logps=torch.zeros(2),
            policy_rejected_logps=torch.zeros(2),
            chosen_lengths=torch.ones(2),
            rejected_lengths=torch.ones(2),
        )


def test_reference_free_losses_need_no_reference():
    for name in LOSSES:
        if not get_loss(name).needs_reference:
            out = preference_loss(
                name,
                policy_chosen_logps=-torch.ones(2),
                policy_rejected_logps=-torch.ones(2) * 3,
                chosen_lengths=torch.ones(2),
                rejected_lengths=torch.ones(2),
            )
            assert torch.isfinite(out.loss)
    assert {n for n in LOSSES if not get_loss(n).needs_reference} == {"simpo", "orpo", "sft", "sft_extend"}


# ----------------------------------------------------------------------------- config validation

BAD_CONFIGS = [
    ({"name": "dpx"}, "loss.name='dpx' is not a registered loss"),
    ({"beta": 0.1}, "loss.name is missing"),
    ({"name": "dpo", "foo": 1}, "loss.foo is not a hyperparameter of loss 'dpo'; its hyperparameters are: beta, "),
    ({"name": "dpo", "beta": "abc"}, "loss.beta='abc' must be a number"),
    ({"name": "dpo", "beta": True}, "loss.beta=True must be a number"),
    ({"name": "dpo", "beta": None}, "loss.beta=None must be a number"),
    ({"name": "dpo", "beta": -1}, "loss.beta=-1 is impossible: it must be > 0"),
    ({"name": "ipo", "beta": 0}, "loss.beta=0 is impossible"),
    ({"name": "dpo", "label_smoothing": 0.5}, "loss.label_smoothing=0.5 is impossible: it must be >= 0 and < 0.5"),
    ({"name": "cdpo", "label_smoothing": -0.1}, "loss.label_smoothing=-0.1"),
    ({"name": "lpo", "r1": 0}, "loss.r1=0 is impossible"),
    ({"name": "lpo", "r2": -1}, "loss.r2=-1 is impossible"),
    ({"name": "lpo", "gamma": -1}, "loss.gamma=-1 is impossible"),
    ({"name": "lpo", "variant": "stee"}, "loss.variant='stee' is not a valid choice"),
    ({"name": "simpo", "gamma": -0.5}, "loss.gamma=-0.5 is impossible"),
    ({"name": "dpop", "penalty_lambda": -1}, "loss.penalty_lambda=-1"),
    ({"name": "orpo", "odds_ratio_lambda": -1}, "loss.odds_ratio_lambda=-1"),
    ({"name": "ipo", "length_average": "yes"}, "loss.length_average='yes' must be true or false"),
    ({"name": "dpo_shift", "f": 1.5}, "loss.f=1.5 is impossible"),
    ({"name": "dpo_shift", "f_min": 0.9, "f_max": 0.5}, "loss.f_min=0.9 must be <= loss.f_max=0.5"),
    ({"name": "dpo_shift", "shift_schedule": "cosine"}, "loss.shift_schedule='cosine' is not a valid choice"),
    ({"name": "sft", "beta": 0.1}, "loss.beta is not a hyperparameter of loss 'sft'"),
    ({"name": "sft", "gate": {"kind": "seq"}}, "loss.gate.kind='seq' cannot apply to loss 'sft'"),
    ({"name": "dpo", "gate": {"kind": "x"}}, "loss.gate.kind='x' is not a valid choice"),
    ({"name": "dpo", "gate": {"kind": "seq", "alpha": -1}}, "loss.gate.alpha=-1 is impossible"),
    ({"name": "dpo", "gate": {"kind": "seq", "tau": 0}}, "loss.gate.tau=0 is impossible"),
    ({"name": "dpo", "gate": {"kind": "q10", "quantile": 1.5}}, "loss.gate.quantile=1.5 is impossible"),
    ({"name": "dpo", "gate": {"kind": "log", "kappa": -2}}, "loss.gate.kappa=-2 is impossible"),
    ({"name": "dpo", "gate": {"kind": "seq", "width": 1}}, "loss.gate.width is not a hyperparameter of the gate"),
    ({"name": "dpo", "gate": {"kind": "seq", "alpha": "big"}}, "loss.gate.alpha='big' must be a number"),
]


@pytest.mark.parametrize("cfg,message", BAD_CONFIGS, ids=[message.split(" ")[0] for _, message in BAD_CONFIGS])
def test_validate_loss_config_names_the_key(cfg, message):
    with pytest.raises(ConfigError) as error:
        validate_loss_config(OmegaConf.create(cfg))
    assert message in str(error.value)


def test_preference_loss_rejects_bad_hyperparameters():
    with pytest.raises(ConfigError, match="loss.betta is not a hyperparameter"):
        at_reference("dpo", betta=0.1)


def test_good_configs_pass():
    validate_loss_config({"name": "dpo", "beta": 1, "gate": {"kind": "none"}})  # an int where a float goes
    validate_loss_config({"name": "sft", "gate": {"kind": "none", "alpha": 50.0}})
    validate_loss_config({"name": "lpo", "gate": None})


# ----------------------------------------------------------------------------- conf/loss/*.yaml


def compose_loss(option, overrides=()):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(overrides=[f"+loss={option}", *overrides]).loss


LOSS_YAMLS = sorted(path.stem for path in LOSS_CONF.glob("*.yaml"))
WEIGHTED_PRESETS = ("mpo", "rpo", "weighted")  # loss.name=weighted: tests/test_weighted_loss.py


@pytest.mark.parametrize("option", [option for option in LOSS_YAMLS if option not in WEIGHTED_PRESETS])
def test_loss_yaml_composes_validates_and_matches_defaults(option):
    loss = compose_loss(option)
    validate_loss_config(loss)
    spec = get_loss(loss.name)
    assert loss.name == GATE_PRESETS.get(option, option)
    hyperparameters = {k: v for k, v in OmegaConf.to_container(loss).items() if k not in ("name", "gate", "reweight")}
    defaults = dataclasses.asdict(spec.params())
    assert hyperparameters == defaults and all(type(hyperparameters[k]) is type(defaults[k]) for k in defaults)
    expected_gate = dataclasses.asdict(GateParams())
    if option in GATE_PRESETS:
        expected_gate["kind"] = GATE_KIND_OF_PRESET.get(option, "seq")
    assert OmegaConf.to_container(loss.gate) == expected_gate


def test_every_loss_and_gate_preset_has_a_yaml():
    assert set(LOSSES) | set(GATE_PRESETS) | set(WEIGHTED_PRESETS) == set(LOSS_YAMLS)


@pytest.mark.parametrize("option", LOSS_YAMLS + ["gate/default", "reweight/default"])
def test_yaml_names_its_source_and_comments_every_key(option):
    lines = (LOSS_CONF / f"{option}.yaml").read_text().splitlines()
    assert lines[0].startswith("# ")
    for line in lines:
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and stripped not in ("defaults:", "gate:", "- _self_"):
            assert " # " in line, f"{option}.yaml: no comment on {line!r}"


def test_command_line_overrides_compose():
    assert compose_loss("ipo", ["loss.gate.kind=q10"]).gate.kind == "q10"
    gated = compose_loss("gate_dpo", ["loss.gate.alpha=20", "loss.beta=0.05"])
    assert (gated.name, gated.gate.kind, gated.gate.alpha, gated.beta) == ("dpo", "seq", 20, 0.05)
    validate_loss_config(gated)
    with pytest.raises(ConfigError, match="loss.gate.kind"):
        validate_loss_config(compose_loss("sft", ["loss.gate.kind=seq"]))


@pytest.mark.skipif(not (REPO / "conf" / "config.yaml").exists(), reason="no root config yet")
def test_root_config_composes_with_loss_overrides():
    from hydra import compose, initialize_config_dir

    from prefopt.run.config import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for overrides in (["loss=ipo", "loss.gate.kind=q10"], ["loss=gate_dpo", "loss.gate.alpha=20"], ["loss=lpo"]):
            validate_loss_config(compose(config_name="config", overrides=overrides).loss)


def test_docs_list_every_loss():
    docs = (REPO / "README.md").read_text()
    for name in LOSSES + tuple(GATE_PRESETS):
        assert f"`{name}`" in docs, name
