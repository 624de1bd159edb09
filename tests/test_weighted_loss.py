"""Weighted multi-loss runs (prefopt/losses/weighted.py): the value and gradient of a weighted sum against the
terms' formulas written here in float64, the gate through every term, the presets (rpo = dpo + sft, mpo), the
refusals, and a tiny run whose logged terms times their weights add up to its logged loss."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.losses import loss_plan_of, preference_loss, validate_loss_config
from tests.helpers import run_train
from tests.test_losses import compose_loss
from tests.test_train import TINY, train_rows

B = 5


def random_batch(seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randint(1, 30, (2, B), generator=generator)).double()  # unequal response lengths
    logps = -lengths.repeat(2, 1) * (0.2 + 3 * torch.rand(4, B, generator=generator, dtype=torch.float64))
    return logps, lengths


def weighted_by_hand(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, terms):
    """sum_k w_k loss_k per example, each term from its paper's formula: dpo -logsig(beta h) on sums, ipo
    (h - 1/(2 beta))^2 on sums (length_average=false), sft -pc/|y_w|, sft_extend -(pc/|y_w| + pr/|y_l|)/2."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    formulas = {
        "dpo": lambda settings: -torch.nn.functional.logsigmoid(settings.get("beta", 0.1) * h),
        "ipo": lambda settings: (h - 1 / (2 * settings["beta"])) ** 2,
        "sft": lambda settings: -policy_chosen / chosen_len,
        "sft_extend": lambda settings: -(policy_chosen / chosen_len + policy_rejected / rejected_len) / 2,
    }
    total = torch.zeros_like(h)
    for name, settings in terms.items():
        total = total + settings["weight"] * formulas[name](settings)
    return total


TERMS = {
    "dpo": {"weight": 0.8, "beta": 0.2},
    "ipo": {"weight": 0.3, "beta": 0.5, "length_average": False},
    "sft": {"weight": 1.0},
    "sft_extend": {"weight": 0.25},
}


def test_value_and_gradient_equal_the_weighted_formulas():
    (pc, pr, rc, rr), (lc, lr) = random_batch(0)
    policy = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
    out = preference_loss(
        "weighted",
        policy_chosen_logps=policy[0],
        policy_rejected_logps=policy[1],
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
        chosen_lengths=lc,
        rejected_lengths=lr,
        terms=TERMS,
    )
    expected = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
    by_hand = weighted_by_hand(*expected, rc, rr, lc, lr, TERMS)
    torch.testing.assert_close(out.losses, by_hand, rtol=1e-12, atol=1e-12)
    out.loss.backward()
    by_hand.mean().backward()
    for got, want in zip(policy, expected):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)
    # each term logged unweighted, and the weights give back the sum
    assert set(out.term_losses) == set(TERMS)
    recombined = sum(TERMS[name]["weight"] * losses for name, losses in out.term_losses.items())
    torch.testing.assert_close(recombined, out.losses.detach(), rtol=1e-12, atol=1e-12)
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(out.chosen_rewards, 0.2 * (pc - rc))  # the first term with a reference: dpo's beta
    torch.testing.assert_close(out.term_losses["ipo"], (h - 1.0) ** 2)


def test_the_gate_scales_the_gradient_through_the_rejected_side_of_every_term():
    (pc, pr, rc, rr), (lc, lr) = random_batch(1)
    terms = {"dpo": {"weight": 0.7}, "sft_extend": {"weight": 0.4}}
    gate = {"kind": "seq", "alpha": 50.0, "tau": 0.05}
    grads = {}
    for gated in (False, True):
        rejected = pr.clone().requires_grad_()
        out = preference_loss(
            "weighted",
            policy_chosen_logps=pc,
            policy_rejected_logps=rejected,
            reference_chosen_logps=rc,
            reference_rejected_logps=rr,
            chosen_lengths=lc,
            rejected_lengths=lr,
            gate=gate if gated else None,
            terms=terms,
        )
        out.loss.backward()
        grads[gated] = (rejected.grad, out.losses.detach(), out.gates)
    (plain_grad, plain_losses, _), (gated_grad, gated_losses, gates) = grads[False], grads[True]
    expected_gates = torch.sigmoid(50.0 * (torch.exp(pr / lr) - 0.05))  # p: the geometric-mean token probability
    torch.testing.assert_close(gates, expected_gates)
    torch.testing.assert_close(gated_losses, plain_losses)  # the gate changes no value
    torch.testing.assert_close(gated_grad, expected_gates * plain_grad)


def test_rpo_is_dpo_plus_the_chosen_nll():
    loss = compose_loss("rpo", ["loss.terms.sft.weight=0.6", "loss.terms.dpo.beta=0.2"])
    validate_loss_config(loss)
    plan = loss_plan_of(loss)
    assert [(term.name, term.weight) for term in plan.terms] == [("dpo", 1.0), ("sft", 0.6)]
    (pc, pr, rc, rr), (lc, lr) = random_batch(2)
    values = {key: value for key, value in OmegaConf.to_container(loss).items() if key not in ("name", "gate")}
    out = preference_loss(
        "weighted",
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
        chosen_lengths=lc,
        rejected_lengths=lr,
        **values,
    )
    h = (pc - rc) - (pr - rr)
    rpo = [-math.log(1 / (1 + math.exp(-0.2 * float(h_i)))) + 0.6 * float(-c / n) for h_i, c, n in zip(h, pc, lc)]
    torch.testing.assert_close(out.losses, torch.tensor(rpo, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_mpo_preset_is_trls_example():
    loss = compose_loss("mpo")
    validate_loss_config(loss)
    plan = loss_plan_of(loss)
    assert [(term.name, term.weight) for term in plan.terms] == [("dpo", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]
    assert plan.needs_reference and plan.has_rejected_term


@pytest.mark.parametrize(
    "loss,message",
    [
        ({"name": "weighted", "terms": {}}, "loss.terms must map each term to its weight"),
        ({"name": "weighted", "terms": {"dpoo": {"weight": 1.0}}}, "loss.terms.dpoo: 'dpoo' is not a registered"),
        ({"name": "weighted", "terms": {"dpo": {"beta": 0.1}}}, "loss.terms.dpo must be a mapping with a weight"),
        ({"name": "weighted", "terms": {"dpo": {"weight": 0}}}, "loss.terms.dpo.weight=0 must be a number > 0"),
        ({"name": "weighted", "terms": {"dpo": {"weight": 1, "betta": 1}}}, "loss.terms.dpo.betta is not a hyper"),
        ({"name": "weighted", "terms": {"dpo": {"weight": 1, "beta": -1}}}, "loss.terms.dpo.beta=-1 is impossible"),
        ({"name": "weighted", "beta": 0.1, "terms": {"dpo": {"weight": 1}}}, "loss.beta is not a key of loss 'w"),
        (
            {"name": "weighted", "terms": {"sft": {"weight": 1}}, "gate": {"kind": "seq"}},
            "loss.gate.kind='seq' cannot apply to loss 'weighted'",
        ),
    ],
)
def test_bad_weighted_configs_name_the_key(loss, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_loss_config(OmegaConf.create(loss))


def test_a_weighted_run_logs_each_term_and_their_weighted_sum_is_the_loss(tmp_path):
    run_dir = run_train(
        tmp_path / "run",
        *TINY,
        "loss=rpo",
        "loss.terms.sft.weight=0.5",
        "+loss.terms.sft_extend={weight: 0.25}",
        "loss.gate.kind=q10",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "trainer.save_final=false",
        "logger.wandb.mode=disabled",
    )
    weights = {"dpo": 1.0, "sft": 0.5, "sft_extend": 0.25}
    rows = train_rows(run_dir)
    assert len(rows) == 2
    for row in rows:
        assert row["train/loss"] == pytest.approx(sum(w * row[f"train/loss/{t}"] for t, w in weights.items()), abs=1e-6)
        assert "train/gate/mean" in row
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval/loss"] == pytest.approx(
        sum(w * summary[f"eval/loss/{t}"] for t, w in weights.items()), abs=1e-6
    )
