"""The Gate-DPO study preset (+experiment=gate_vs_field, issue 13): every job of the 48 composes and validates,
and the whole pipeline (sweep over losses x regimes x seeds, the gate's distribution at step 0, the report with
per-regime baselines) runs at tiny scale."""

from __future__ import annotations

import itertools
import json

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from prefopt.cli import main
from prefopt.observe.tracking import read_jsonl
from prefopt.run.config import register_schema, validate_config
from tests.helpers import run_sweep

STUDY_LOSSES = ["dpo", "gate_dpo", "gate_dpo_q10", "ipo", "gate_ipo", "cal_dpo", "lpo", "dpo_shift"]


def study_params() -> dict[str, list[str]]:
    with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=gate_vs_field"], return_hydra_config=True)
    return {key: str(value).split(",") for key, value in cfg.hydra.sweeper.params.items()}


def test_the_study_sweeps_8_losses_2_regimes_3_seeds_and_every_job_validates():
    register_schema()
    params = study_params()
    assert params == {
        "loss": STUDY_LOSSES,
        "dataset.arith.rejected_style": ["near", "offpolicy"],
        "trainer.seed": ["0", "1", "2"],
    }
    gate_kinds = {}
    with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
        for values in itertools.product(*params.values()):
            overrides = ["+experiment=gate_vs_field", *(f"{key}={value}" for key, value in zip(params, values))]
            cfg = compose(config_name="config", overrides=overrides)
            validate_config(cfg)
            assert cfg.model.name_or_path if "name_or_path" in cfg.model else cfg.model.source != "tiny"
            assert cfg.dynamics.num_probes <= cfg.dataset.arith.num_eval  # the probes are drawn from the held-out split
            gate_kinds[cfg.loss.name, values[0]] = cfg.loss.gate.kind
    assert {loss: kind for (_, loss), kind in gate_kinds.items()} == {
        "dpo": "none",
        "gate_dpo": "seq",
        "gate_dpo_q10": "q10",
        "ipo": "none",
        "gate_ipo": "seq",
        "cal_dpo": "none",
        "lpo": "none",
        "dpo_shift": "none",
    }


@pytest.mark.slow
def test_the_study_runs_at_tiny_scale_and_reports_each_regime_against_its_own_dpo(tmp_path, capsys):
    sweep_dir = tmp_path / "study"
    jobs = run_sweep(
        sweep_dir,
        "+experiment=gate_vs_field",
        "loss=dpo,gate_dpo_q10",
        "dataset.arith.rejected_style=near,offpolicy",
        "trainer.seed=0,1",
        "model=tiny_llama",
        "trainer.max_steps=2",
        "trainer.micro_batch_size=2",
        "dataset.arith.num_train=16",
        "dataset.arith.num_eval=8",
        "dynamics.num_probes=4",
        "dynamics.every_n_steps=1",
        "logger.wandb.mode=disabled",
    )
    assert len(jobs) == 8
    for job in jobs:
        config = OmegaConf.load(job / "config.yaml")
        step0 = next(row for row in read_jsonl(job / "metrics.jsonl") if row.get("step") == 0 and "eval/loss" in row)
        if config.loss.gate.kind == "q10":  # the gate's distribution over the held-out pairs, before training
            assert 0 <= step0["eval/gate/p10"] <= step0["eval/gate/p50"] <= step0["eval/gate/p90"] <= 1
            assert step0["eval/gate/min"] <= step0["eval/gate/mean"] <= step0["eval/gate/max"]
        else:
            assert not any(key.startswith("eval/gate/") for key in step0)
    capsys.readouterr()
    assert (
        main(["report", str(sweep_dir), "--group-by", "loss,dataset.arith.rejected_style", "--baseline", "loss=dpo"])
        == 0
    )
    markdown = (sweep_dir / "report_groups.md").read_text()
    for regime in ("near", "offpolicy"):
        assert (
            f"| loss=gate_dpo_q10 dataset.arith.rejected_style={regime} | loss=dpo "
            f"dataset.arith.rejected_style={regime} | 2 | 0 |"
        ) in markdown
    assert (sweep_dir / "report_bands.png").stat().st_size > 0
    assert json.loads((jobs[0] / "summary.json").read_text())["steps"] == 2


ISSUE_26_STUDIES = {  # preset -> (its sweep, what every job must hold)
    "lpo_control": (
        {"loss": ["lpo"], "dataset.arith.rejected_style": ["near"], "trainer.seed": ["0", "1", "2"]}
        | {"loss.r2": ["0.05", "0.1", "0.2", "0.4", "0.8"]},
        lambda cfg: cfg.loss.gamma == 10.0 and cfg.dynamics.term_grads and cfg.trainer.max_steps == 30,
    ),
    "horizon": (
        {
            "dataset.arith.rejected_style": ["near"],
            "loss": ["dpo", "gate_dpo_q10", "lpo"],
            "trainer.seed": ["0", "1", "2"],
        },
        lambda cfg: cfg.trainer.max_steps == 120 and cfg.dataset.arith.num_train >= 120 * 4,  # one pass, no repeats
    ),
    "gate_complements": (
        {"loss": ["ipo", "cal_dpo"], "dataset.arith.rejected_style": ["near", "onpolicy"]}
        | {"trainer.seed": ["0", "1", "2"], "loss.gate.kind": ["none", "seq", "q10"]},
        lambda cfg: cfg.trainer.max_steps == 30 and cfg.dataset.arith.num_train >= 30 * 4,
    ),
}


@pytest.mark.parametrize("name", ISSUE_26_STUDIES)
def test_each_study_of_issue_26_sweeps_what_it_says_and_every_job_validates(name):
    """The other studies (scripts/study.sh): each preset's sweep is its own (gate_vs_field's keys, inherited, pinned),
    on gate_vs_field's model, probes and learning rate, and every job composes and validates."""
    register_schema()
    expected, holds = ISSUE_26_STUDIES[name]
    with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)
        params = {key: str(value).split(",") for key, value in cfg.hydra.sweeper.params.items()}
        assert params == expected
        for values in itertools.product(*params.values()):
            overrides = [f"+experiment={name}", *(f"{key}={value}" for key, value in zip(params, values))]
            job = compose(config_name="config", overrides=overrides)
            validate_config(job)
            assert holds(job), overrides
            assert job.model.name == "smollm2_135m" and job.trainer.lr == 5.0e-6 and job.dynamics.num_probes == 32
