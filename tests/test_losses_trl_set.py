"""The losses prefopt shares with TRL 1.x's loss set (exo_pair, nca_pair, bco_pair, sppo_hard, aot,
aot_unpaired, apo_zero, apo_down, discopop, dpo_norm) and the f-divergence scores: value and gradient
against references written here from each paper's equation, values at the reference model, validation.

The references are float64 torch written as the papers state them (EXO as a KL between two-point
distributions, f'(u) on u = pi/pi_ref, AOT as sorted samples), so autograd differentiates a formula
that shares no code with the package. The gate's composition with every loss that has a rejected term
is tested in test_losses.py (parametrized over all registered losses); one f-divergence case is here.
"""

import math

import numpy as np
import pytest
import torch

from prefopt.core.errors import ConfigError
from prefopt.losses import get_loss, preference_loss, validate_loss_config

EXO_EPS = 1e-3  # conf/loss/exo_pair.yaml label_smoothing


# ----------------------------------------------------------------------------- the papers' equations


def f_prime(u, kind, a=0.5):
    """f'(u) of the f-divergence (f-DPO, arXiv:2309.16240, Table 1), u = pi / pi_ref."""
    if kind == "reverse_kl":
        return torch.log(u)
    if kind == "forward_kl":
        return 1 - 1 / u
    if kind == "js":
        return torch.log(2 * u / (1 + u))
    if kind == "alpha":
        return (1 - u ** (-a)) / a
    raise KeyError(kind)


def scores(pc, pr, rc, rr, lc, lr, kind="reverse_kl", a=0.5, per_token=False):
    """(chosen, rejected) scores f'(pi/pi_ref) of the sequences, divided by the lengths when per_token."""
    chosen, rejected = f_prime(torch.exp(pc - rc), kind, a), f_prime(torch.exp(pr - rr), kind, a)
    return (chosen / lc, rejected / lr) if per_token else (chosen, rejected)


def sig(x):
    return 1 / (1 + torch.exp(-x))


def reference(name, hp, pc, pr, rc, rr, lc, lr):
    """Per-example losses (B,) from the paper's equation; pc.. are summed log-probs, lc, lr lengths."""
    beta = hp["beta"]
    kind, a = hp.get("f_divergence", "reverse_kl"), hp.get("f_alpha", 0.5)
    sw, sl = scores(pc, pr, rc, rr, lc, lr, kind, a, per_token=name == "dpo_norm")
    rw, rl = pc - rc, pr - rr  # log-ratios
    if name == "exo_pair":
        # KL(p_f || p_label): p_f = softmax(beta * (s_w, s_l)), p_label = (1 - eps, eps) (EXO-pref, K = 2)
        p_f = torch.softmax(torch.stack([beta * sw, beta * sl], -1), -1)
        eps = hp["label_smoothing"]
        p_label = torch.tensor([1 - eps, eps], dtype=torch.float64)
        return (p_f * (torch.log(p_f) - torch.log(p_label))).sum(-1)
    if name == "discopop":
        rho = beta * (sw - sl)
        w = sig(rho / hp["tau"])
        return (1 - w) * torch.log(1 + torch.exp(-rho)) + w * torch.exp(-rho)
    if name == "dpo_norm":
        return torch.log(1 + torch.exp(-beta * (sw - sl)))
    if name == "nca_pair":
        return -torch.log(sig(beta * rw)) - 0.5 * torch.log(sig(-beta * rw)) - 0.5 * torch.log(sig(-beta * rl))
    if name == "bco_pair":
        return -torch.log(sig(beta * rw)) - torch.log(1 - sig(beta * rl))
    if name == "sppo_hard":
        eta = 1 / beta  # P(y_w wins) = 1, P(y_l wins) = 0: targets eta * (P - 1/2)
        return (rw - eta * (1 - 0.5)) ** 2 + (rl - eta * (0 - 0.5)) ** 2
    if name == "apo_zero":
        return (1 - sig(beta * rw)) + sig(beta * rl)
    if name == "apo_down":
        return sig(beta * rw) + (1 - sig(beta * (rw - rl)))
    if name in ("aot", "aot_unpaired"):
        if name == "aot":  # quantiles of the policy's and the reference's chosen - rejected gaps
            delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        else:  # quantiles of the chosen and the rejected log-ratios
            delta = torch.sort(rw).values - torch.sort(rl).values
        eps = hp["label_smoothing"]
        return -(1 - eps) * torch.log(sig(beta * delta)) - eps * torch.log(sig(-beta * delta))
    if name in ("dpo", "cdpo"):
        eps, h = hp.get("label_smoothing", 0.0), sw - sl
        return -(1 - eps) * torch.log(sig(beta * h)) - eps * torch.log(sig(-beta * h))
    if name == "hinge":
        return torch.clamp(1 - beta * (sw - sl), min=0)
    if name == "ipo":  # per-token scores by default (length_average: true), as TRL
        sw, sl = scores(pc, pr, rc, rr, lc, lr, kind, a, per_token=hp.get("length_average", True))
        return (sw - sl - 1 / (2 * beta)) ** 2
    raise KeyError(name)


# Non-default hyperparameters where a loss has them, so a hard-coded default would show.
CASES = [
    ("exo_pair", {"beta": 0.3, "label_smoothing": 0.02}),
    ("discopop", {"beta": 0.2, "tau": 0.3}),
    ("dpo_norm", {"beta": 1.5}),
    ("nca_pair", {"beta": 0.3}),
    ("bco_pair", {"beta": 0.25}),
    ("sppo_hard", {"beta": 0.4}),
    ("apo_zero", {"beta": 0.3}),
    ("apo_down", {"beta": 0.3}),
    ("aot", {"beta": 0.3, "label_smoothing": 0.1}),
    ("aot_unpaired", {"beta": 0.3, "label_smoothing": 0.0}),
    # f-divergence scores on every loss that takes them
    ("dpo", {"beta": 0.3, "f_divergence": "forward_kl"}),
    ("dpo", {"beta": 0.3, "f_divergence": "js"}),
    ("dpo", {"beta": 0.3, "f_divergence": "alpha", "f_alpha": 0.3}),
    ("cdpo", {"beta": 0.2, "label_smoothing": 0.2, "f_divergence": "alpha", "f_alpha": 0.7}),
    ("hinge", {"beta": 0.3, "f_divergence": "js"}),
    ("ipo", {"beta": 0.4, "f_divergence": "forward_kl"}),
    ("ipo", {"beta": 0.4, "f_divergence": "alpha", "f_alpha": 1.0, "length_average": False}),
    ("exo_pair", {"beta": 0.3, "label_smoothing": 0.02, "f_divergence": "js"}),
    ("discopop", {"beta": 0.2, "tau": 0.3, "f_divergence": "forward_kl"}),
    ("dpo_norm", {"beta": 1.5, "f_divergence": "alpha", "f_alpha": 0.5}),
]


def random_batch(seed, batch=7):
    """Summed log-probs (leaves for autograd), references near them, unequal lengths 1..12."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 13, (2, batch))
    policy = -rng.uniform(0.2, 3.0, (2, batch)) * lengths  # mean token log-prob -0.2 .. -3
    ref = policy + rng.normal(0, 1.0, (2, batch))
    return {
        "pc": torch.tensor(policy[0], requires_grad=True),
        "pr": torch.tensor(policy[1], requires_grad=True),
        "rc": torch.tensor(ref[0]),
        "rr": torch.tensor(ref[1]),
        "lc": torch.tensor(lengths[0], dtype=torch.float64),
        "lr": torch.tensor(lengths[1], dtype=torch.float64),
    }


def prefopt_losses(name, b, gate=None, **hp):
    return preference_loss(
        name,
        policy_chosen_logps=b["pc"],
        policy_rejected_logps=b["pr"],
        reference_chosen_logps=b["rc"],
        reference_rejected_logps=b["rr"],
        chosen_lengths=b["lc"].long(),
        rejected_lengths=b["lr"].long(),
        gate=gate,
        **hp,
    )


@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}-{hp.get('f_divergence', '')}" for n, hp in CASES])
def test_value_and_gradient_match_the_paper(name, hp):
    b = random_batch(seed=sum(map(ord, name)) + len(hp))
    assert (b["lc"] != b["lr"]).any()
    out = prefopt_losses(name, b, **hp)
    expected = reference(name, hp, b["pc"], b["pr"], b["rc"], b["rr"], b["lc"], b["lr"])
    np.testing.assert_allclose(out.losses.detach().numpy(), expected.detach().numpy(), rtol=1e-9, atol=1e-12)
    got = torch.autograd.grad(out.loss, [b["pc"], b["pr"]])
    want = torch.autograd.grad(expected.mean(), [b["pc"], b["pr"]])
    for g, w in zip(got, want):
        assert w.abs().max() > 1e-4  # the case moves both log-probs
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-8, atol=1e-12)


def at_reference(name, **hp):
    """The loss with policy == reference (two pairs, unequal lengths)."""
    logps = torch.tensor([-7.0, -20.0], dtype=torch.float64), torch.tensor([-9.0, -4.0], dtype=torch.float64)
    return preference_loss(
        name,
        policy_chosen_logps=logps[0],
        policy_rejected_logps=logps[1],
        reference_chosen_logps=logps[0].clone(),
        reference_rejected_logps=logps[1].clone(),
        chosen_lengths=torch.tensor([3, 11]),
        rejected_lengths=torch.tensor([4, 2]),
        **hp,
    ).losses


STEP0 = [
    ("exo_pair", {}, -math.log(2) - 0.5 * (math.log(EXO_EPS) + math.log(1 - EXO_EPS))),
    ("exo_pair", {"label_smoothing": 0.1}, -math.log(2) - 0.5 * (math.log(0.1) + math.log(0.9))),
    ("discopop", {}, (math.log(2) + 1) / 2),  # w = 1/2: half logistic (log 2), half exponential (1)
    ("dpo_norm", {}, math.log(2)),
    ("nca_pair", {}, 2 * math.log(2)),
    ("bco_pair", {}, 2 * math.log(2)),
    ("sppo_hard", {"beta": 0.1}, 2 * (1 / 0.2) ** 2),
    ("apo_zero", {}, 1.0),
    ("apo_down", {}, 1.0),
    ("aot", {}, math.log(2)),
    ("aot_unpaired", {"label_smoothing": 0.2}, math.log(2)),
    # every f' vanishes at u = 1 (f'(1) = 0), so the scores, and the loss, start where DPO's do
    ("dpo", {"f_divergence": "forward_kl"}, math.log(2)),
    ("dpo", {"f_divergence": "js"}, math.log(2)),
    ("dpo", {"f_divergence": "alpha", "f_alpha": 0.2}, math.log(2)),
    ("ipo", {"beta": 0.1, "f_divergence": "js"}, (1 / 0.2) ** 2),
]


@pytest.mark.parametrize("name,hp,value", STEP0, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(STEP0)])
def test_values_at_the_reference(name, hp, value):
    np.testing.assert_allclose(at_reference(name, **hp).numpy(), [value, value], rtol=1e-12)


def test_exo_minimum_is_at_the_smoothed_label():
    """EXO's loss is 0 where the model's pairwise preference sigmoid(beta h) equals 1 - eps."""
    eps, beta = 0.05, 0.5
    h = math.log((1 - eps) / eps) / beta
    out = preference_loss(
        "exo_pair",
        policy_chosen_logps=torch.tensor([h], dtype=torch.float64),
        policy_rejected_logps=torch.tensor([0.0], dtype=torch.float64),
        reference_chosen_logps=torch.tensor([0.0], dtype=torch.float64),
        reference_rejected_logps=torch.tensor([0.0], dtype=torch.float64),
        chosen_lengths=torch.tensor([2]),
        rejected_lengths=torch.tensor([2]),
        beta=beta,
        label_smoothing=eps,
    )
    assert abs(out.loss.item()) < 1e-12


def test_aot_is_a_batch_loss_and_order_free():
    """Permuting the pairs permutes nothing in AOT's output: it sees sorted quantities only."""
    b = random_batch(seed=5)
    order = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    shuffled = {key: value.detach()[order] for key, value in b.items()}
    for name in ("aot", "aot_unpaired"):
        first, second = prefopt_losses(name, b), prefopt_losses(name, shuffled)
        torch.testing.assert_close(first.losses, second.losses, rtol=0, atol=1e-12)


def test_gate_composes_with_f_divergence_scores():
    """Gated: the loss value is unchanged and the gradient through the rejected log-probs is g times the ungated one."""
    b = random_batch(seed=8)
    hp = {"beta": 0.3, "f_divergence": "alpha", "f_alpha": 0.4}
    gate = {"kind": "log", "kappa": 2.0, "tau": 0.3}
    plain, gated = prefopt_losses("exo_pair", b, **hp), prefopt_losses("exo_pair", b, gate=gate, **hp)
    assert torch.equal(plain.losses, gated.losses)
    plain_grads = torch.autograd.grad(plain.loss, [b["pc"], b["pr"]])
    gated_grads = torch.autograd.grad(gated.loss, [b["pc"], b["pr"]])
    g = torch.sigmoid(2.0 * (b["pr"].detach() / b["lr"] - math.log(0.3)))
    assert g.min() < 0.5 < g.max()
    torch.testing.assert_close(gated_grads[0], plain_grads[0], rtol=0, atol=0)
    torch.testing.assert_close(gated_grads[1], g * plain_grads[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"name": "dpo", "f_divergence": "kl"}, "loss.f_divergence='kl' is not a valid choice; use one of: reverse_kl"),
        ({"name": "ipo", "f_divergence": "alpha", "f_alpha": 0}, "loss.f_alpha=0 is impossible: it must be > 0"),
        ({"name": "hinge", "f_alpha": 1.5}, "loss.f_alpha=1.5 is impossible"),
        ({"name": "exo_pair", "label_smoothing": 0}, "loss.label_smoothing=0 is impossible: it must be > 0"),
        ({"name": "discopop", "tau": 0}, "loss.tau=0 is impossible"),
        ({"name": "aot", "label_smoothing": 0.5}, "loss.label_smoothing=0.5 is impossible"),
        ({"name": "nca_pair", "f_divergence": "js"}, "loss.f_divergence is not a hyperparameter of loss 'nca_pair'"),
        ({"name": "bco_pair", "beta": 0}, "loss.beta=0 is impossible"),
    ],
)
def test_bad_values_name_the_key(cfg, message):
    with pytest.raises(ConfigError) as error:
        validate_loss_config(cfg)
    assert message in str(error.value)


def test_which_losses_take_f_divergence():
    """Only losses of the chosen - rejected score difference (where beta log Z cancels) take an f-divergence."""
    takes = ("dpo", "cdpo", "robust_dpo", "hinge", "ipo", "exo_pair", "discopop", "dpo_norm")
    for name in takes:
        assert get_loss(name).make_params({}).f_divergence == "reverse_kl"
    for name in ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "aot", "aot_unpaired", "dpop"):
        assert not hasattr(get_loss(name).make_params({}), "f_divergence")
