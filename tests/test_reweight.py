"""Token-level reweighting (prefopt/losses/reweight.py): LD-DPO and WPO against their papers' equations written
here one example at a time in float64 (value and gradient), the head's log sum of squared probabilities against
the model's logits, the reference's shared-length sums (live and precomputed agree), the gate's estimate, and the
refusals."""

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.losses import preference_loss, validate_loss_config
from prefopt.model.logps import labelled_rows_batch, response_token_logps, sequence_logps
from tests.helpers import run_train, tiny_byte_llama
from tests.test_losses import logsigmoid, make_batch
from tests.test_train import TINY, train_rows

BETA = 0.2


def torch_batch(batch):
    leaves = {side: torch.tensor(batch[f"{side}_tokens"], requires_grad=True) for side in ("chosen", "rejected")}
    masks = {side: torch.tensor(batch[f"{side}_mask"]) for side in ("chosen", "rejected")}
    return leaves, masks


def shared_split(tokens, mask, shared):
    """(sum over the first `shared` response tokens, sum over the rest), one example, plain Python."""
    values = [float(t) for t, m in zip(tokens, mask) if m > 0]
    return sum(values[:shared]), sum(values[shared:])


def ld_dpo_by_hand(batch, alpha, reference_shares):
    """-logsigmoid(beta * h_LD) per example; log pi_LD = shared + alpha * tail on policy and reference (eq. of
    arXiv:2409.06411 as TRL 1.x's ld_alpha)."""
    losses = []
    for i in range(len(batch["chosen_lengths"])):
        shared = int(min(batch["chosen_lengths"][i], batch["rejected_lengths"][i]))
        pc_s, pc_t = shared_split(batch["chosen_tokens"][i], batch["chosen_mask"][i], shared)
        pr_s, pr_t = shared_split(batch["rejected_tokens"][i], batch["rejected_mask"][i], shared)
        (rc_s, rc_t), (rr_s, rr_t) = reference_shares[i]
        h = (pc_s + alpha * pc_t - rc_s - alpha * rc_t) - (pr_s + alpha * pr_t - rr_s - alpha * rr_t)
        losses.append(-logsigmoid(BETA * h))
    return torch.tensor(losses, dtype=torch.float64)


def reference_shares(batch, seed):
    """A reference's (shared, tail) sums per response: random, so the reference side of LD is checked too."""
    rng = np.random.default_rng(seed)
    return [
        ((rng.normal(-5, 2), rng.normal(-3, 2)), (rng.normal(-6, 2), rng.normal(-2, 2)))
        for _ in batch["chosen_lengths"]
    ]


def run_reweighted(batch, shares, reweight, gate=None, log_sum_sq=None):
    leaves, masks = torch_batch(batch)
    reference = torch.tensor(
        [[c_s + c_t, r_s + r_t, c_s, r_s] for (c_s, c_t), (r_s, r_t) in shares], dtype=torch.float64
    )
    out = preference_loss(
        "dpo",
        policy_chosen_logps=(leaves["chosen"] * masks["chosen"]).sum(-1),
        policy_rejected_logps=(leaves["rejected"] * masks["rejected"]).sum(-1),
        reference_chosen_logps=reference[:, 0],
        reference_rejected_logps=reference[:, 1],
        reference_chosen_shared=reference[:, 2],
        reference_rejected_shared=reference[:, 3],
        chosen_lengths=torch.tensor(batch["chosen_lengths"]),
        rejected_lengths=torch.tensor(batch["rejected_lengths"]),
        chosen_token_logps=leaves["chosen"],
        chosen_mask=masks["chosen"],
        rejected_token_logps=leaves["rejected"],
        rejected_mask=masks["rejected"],
        chosen_log_sum_sq=None if log_sum_sq is None else log_sum_sq[0],
        rejected_log_sum_sq=None if log_sum_sq is None else log_sum_sq[1],
        gate=gate,
        reweight=reweight,
        beta=BETA,
    )
    return out, leaves


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_ld_dpo_value_and_gradient_equal_the_paper(alpha):
    batch = make_batch(3)
    shares = reference_shares(batch, 3)
    out, leaves = run_reweighted(batch, shares, {"ld_alpha": alpha})
    torch.testing.assert_close(out.losses, ld_dpo_by_hand(batch, alpha, shares), rtol=1e-12, atol=1e-12)
    # gradient: d loss / d token = -beta * sigmoid(-beta h) * (+1 chosen, -1 rejected) * (1 shared, alpha past it)
    chosen_grad, rejected_grad = torch.autograd.grad(out.losses.sum(), [leaves["chosen"], leaves["rejected"]])
    expected = ld_dpo_by_hand(batch, alpha, shares)
    for i in range(len(expected)):
        slope = -BETA * (1 - math.exp(-float(expected[i])))  # d(-logsig(z))/dz = -sigmoid(-z) = -(1 - e^-loss)
        shared = int(min(batch["chosen_lengths"][i], batch["rejected_lengths"][i]))
        for side, sign, grad in (("chosen", 1, chosen_grad), ("rejected", -1, rejected_grad)):
            length = int(batch[f"{side}_lengths"][i])
            weights = [1.0 if k < shared else alpha for k in range(length)] + [0.0] * (grad.shape[1] - length)
            torch.testing.assert_close(grad[i], sign * slope * torch.tensor(weights, dtype=torch.float64))


def test_ld_alpha_one_is_plain_dpo_and_the_gate_estimates_from_the_plain_sum():
    batch = make_batch(4)
    shares = reference_shares(batch, 4)
    gate = {"kind": "seq", "alpha": 50.0, "tau": 0.05}
    plain, _ = run_reweighted(batch, shares, {"ld_alpha": 1.0}, gate=gate)
    desensitized, _ = run_reweighted(batch, shares, {"ld_alpha": 0.3}, gate=gate)
    expected_gates = [
        1 / (1 + math.exp(-50.0 * (math.exp(batch["rejected_tokens"][i].sum() / batch["rejected_lengths"][i]) - 0.05)))
        for i in range(len(batch["rejected_lengths"]))
    ]
    for out in (plain, desensitized):  # p from the rejected response's plain mean log-prob, whatever alpha
        np.testing.assert_allclose(out.gates.numpy(), expected_gates, rtol=1e-10)
    reference = torch.tensor([c_s + c_t for (c_s, c_t), _ in shares])
    h = (torch.tensor(batch["chosen_tokens"]).sum(1) - reference) - (
        torch.tensor(batch["rejected_tokens"]).sum(1) - torch.tensor([r_s + r_t for _, (r_s, r_t) in shares])
    )
    torch.testing.assert_close(plain.losses, -torch.nn.functional.logsigmoid(BETA * h))


def test_wpo_weights_each_pair_by_its_aligned_probability_detached():
    batch = make_batch(5)
    shares = reference_shares(batch, 5)
    rng = np.random.default_rng(5)
    log_sum_sq = [
        torch.tensor(rng.uniform(-2.5, -0.2, batch[f"{side}_tokens"].shape)) for side in ("chosen", "rejected")
    ]
    plain, plain_leaves = run_reweighted(batch, shares, {})
    weighted, leaves = run_reweighted(batch, shares, {"wpo": True}, log_sum_sq=log_sum_sq)
    weights = []
    for i in range(len(batch["chosen_lengths"])):
        w = 1.0
        for k, side in enumerate(("chosen", "rejected")):
            n = int(batch[f"{side}_lengths"][i])
            aligned = [float(batch[f"{side}_tokens"][i][t] - log_sum_sq[k][i][t]) for t in range(n)]
            w *= math.exp(sum(aligned) / n)
        weights.append(w)
    weights = torch.tensor(weights, dtype=torch.float64)
    torch.testing.assert_close(weighted.losses, weights * plain.losses.detach(), rtol=1e-12, atol=1e-12)
    assert weighted.metrics["wpo/weight"] == pytest.approx(float(weights.mean()), rel=1e-12)
    plain_grads = torch.autograd.grad(plain.losses.sum(), list(plain_leaves.values()))
    weighted_grads = torch.autograd.grad((weighted.losses).sum(), list(leaves.values()))
    for plain_grad, weighted_grad in zip(plain_grads, weighted_grads):  # the weights carry no gradient
        torch.testing.assert_close(weighted_grad, weights.unsqueeze(1) * plain_grad)


def test_the_head_returns_log_sum_of_squared_probabilities(byte_tokenizer):
    model = tiny_byte_llama(byte_tokenizer)  # the head scores in fp32
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 200, (2, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :4] = -100
    assert response_token_logps(model, input_ids, attention_mask, labels, chunk_size=3).log_sum_sq is None  # if asked
    ours = sequence_logps(model, labelled_rows_batch(input_ids, attention_mask, labels), 3, with_log_sum_sq=True)
    log_probs = torch.log_softmax(model(input_ids=input_ids).logits[:, :-1], dim=-1)
    expected = torch.log((log_probs.exp() ** 2).sum(-1))[:, 3:]  # response positions: targets 4..9
    torch.testing.assert_close(ours.log_sum_sq, expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "loss,message",
    [
        ({"name": "dpo", "reweight": {"ld_alpha": 1.5}}, "loss.reweight.ld_alpha=1.5 is impossible"),
        ({"name": "dpo", "reweight": {"wpo": "yes"}}, "loss.reweight.wpo='yes' must be true or false"),
        ({"name": "dpo", "reweight": {"ld": 0.5}}, "loss.reweight.ld is not a hyperparameter of loss.reweight"),
        (
            {"name": "dpo", "reweight": {"ld_alpha": 0.5}, "gate": {"kind": "token"}},
            "loss.gate.kind=token with loss.reweight.ld_alpha=0.5",
        ),
    ],
)
def test_bad_reweighting_names_the_key(loss, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_loss_config(OmegaConf.create(loss))


def test_ld_dpo_and_wpo_runs_agree_live_and_precomputed(tmp_path):
    """The same LD-DPO + WPO run with the reference precomputed (4 cached columns) and as a live model: equal
    losses; at step 0 the policy is the reference, so each pair's DPO loss is log 2 times its WPO weight."""
    common = [*TINY, "loss.reweight.ld_alpha=0.4", "loss.reweight.wpo=true", "loss.gate.kind=q10"]
    common += ["trainer.max_steps=2", "trainer.save_final=false", "logger.wandb.mode=disabled"]
    live = run_train(tmp_path / "live", *common, "reference.precompute=false")
    cached = run_train(tmp_path / "cached", *common, "reference.precompute=true", f"reference.cache_dir={tmp_path}/c")
    live_rows, cached_rows = train_rows(live), train_rows(cached)
    for live_row, cached_row in zip(live_rows, cached_rows, strict=True):
        assert cached_row["train/loss"] == pytest.approx(live_row["train/loss"], rel=1e-5)
        assert cached_row["train/wpo/weight"] == pytest.approx(live_row["train/wpo/weight"], rel=1e-5)
    first = live_rows[0]
    assert 0 < first["train/wpo/weight"] < 1
    assert first["train/loss"] == pytest.approx(math.log(2) * first["train/wpo/weight"], rel=1e-5)
    assert first["train/rewards/margins"] == pytest.approx(0, abs=1e-6)
    summary = json.loads((live / "summary.json").read_text())
    assert math.isfinite(summary["eval/loss"])


def test_wpo_is_refused_for_the_sorting_losses():
    with pytest.raises(ConfigError, match="loss.reweight.wpo=true with loss 'aot'"):
        validate_loss_config(OmegaConf.create({"name": "aot", "reweight": {"wpo": True}}))
