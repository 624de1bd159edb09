"""Resume that cannot surprise (true without a checkpoint is an error listing what can be resumed; latest
continues the newest run with this config in its own dir), transformers' LR schedules step by step,
checkpoints kept (trainer.save_total_limit), and trainer.num_epochs -> steps."""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.cli import main
from prefopt.core.errors import ConfigError
from prefopt.observe.tracking import read_jsonl
from prefopt.run.config import validate_config
from prefopt.train.schedules import METRIC_SCHEDULES, SCHEDULES, epoch_steps
from tests.helpers import run_train, trainer_node
from tests.test_config import compose_config

TINY = [
    "model=tiny_llama",
    "hardware=cpu",
    "trainer.micro_batch_size=2",
    "trainer.eval_batch_size=4",
    "trainer.lr=1e-3",
    "dataset.arith.num_train=16",
    "dataset.arith.num_eval=4",
    "trainer.greedy_eval_examples=0",
    "dynamics.enabled=false",
    "trainer.eval_every=0",
    "reference.precompute=false",
]
# a schedule with a warmup ratio and a floor: resume must restore it exactly
SCHEDULE = [
    "trainer.warmup_steps=null",
    "trainer.warmup_ratio=0.34",
    "trainer.lr_schedule=cosine_with_min_lr",
    "trainer.min_lr_ratio=0.1",
]


def run_main(*args: str) -> int:
    argv = sys.argv
    try:
        return main(["train", *args])
    except SystemExit as exit:
        return exit.code
    finally:
        sys.argv = argv


def train_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row]


def transformers_lrs(name: str, lr: float, steps: int, warmup: int, **kwargs) -> list[float]:
    """The LR of each of `steps` optimizer steps under transformers' own scheduler."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=steps, scheduler_specific_kwargs=kwargs
    )
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# --- schedules


def test_the_schedule_table_is_transformers_own():
    """SCHEDULES (what the parent validates against, without importing transformers) lists every schedule
    transformers has, with exactly the arguments its function takes."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    assert set(SCHEDULES) | set(METRIC_SCHEDULES) == {kind.value for kind in SchedulerType}
    common = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    for name, arguments in SCHEDULES.items():
        parameters = set(inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters) - common
        assert parameters == set(arguments), name


# (overrides, transformers' name, its warmup steps, its keyword arguments) for 10 steps at lr 0.01
SCHEDULE_CASES = [
    ({"lr_schedule": "linear", "warmup_steps": 3}, "linear", 3, {}),
    ({"lr_schedule": "cosine", "warmup_ratio": 0.25}, "cosine", 3, {}),  # ceil(0.25 x 10)
    (
        {"lr_schedule": "cosine_with_restarts", "warmup_steps": 1, "lr_scheduler_kwargs": {"num_cycles": 2}},
        "cosine_with_restarts",
        1,
        {"num_cycles": 2},
    ),
    (
        {"lr_schedule": "cosine_with_min_lr", "warmup_ratio": 0.2, "min_lr_ratio": 0.1},
        "cosine_with_min_lr",
        2,
        {"min_lr_rate": 0.1},
    ),
    (
        {"lr_schedule": "cosine_warmup_with_min_lr", "warmup_steps": 2, "min_lr_ratio": 0.05},
        "cosine_warmup_with_min_lr",
        2,
        {"min_lr_rate": 0.05},
    ),
    ({"lr_schedule": "constant_with_warmup", "warmup_steps": 4}, "constant_with_warmup", 4, {}),
    ({"lr_schedule": "constant"}, "constant", 0, {}),
    (
        {"lr_schedule": "polynomial", "warmup_steps": 2, "min_lr_ratio": 0.1, "lr_scheduler_kwargs": {"power": 2.0}},
        "polynomial",
        2,
        {"lr_end": 0.001, "power": 2.0},
    ),
    ({"lr_schedule": "inverse_sqrt", "warmup_steps": 3}, "inverse_sqrt", 3, {}),
    (
        {
            "lr_schedule": "warmup_stable_decay",
            "warmup_ratio": 0.2,
            "min_lr_ratio": 0.1,
            "lr_scheduler_kwargs": {"num_decay_steps": 4},
        },
        "warmup_stable_decay",
        2,
        {"num_decay_steps": 4, "min_lr_ratio": 0.1},
    ),
]


@pytest.mark.parametrize(
    "overrides, name, warmup, kwargs", SCHEDULE_CASES, ids=[case[0]["lr_schedule"] for case in SCHEDULE_CASES]
)
def test_the_engine_steps_transformers_schedule_exactly(overrides, name, warmup, kwargs):
    from prefopt.train.engine import TorchEngine
    from prefopt.train.schedules import check_schedule_config

    trainer_cfg = trainer_node(**{"max_steps": 10, "lr": 0.01, "warmup_steps": None, **overrides})
    check_schedule_config(trainer_cfg)
    model = torch.nn.Linear(3, 1)
    engine = TorchEngine(model, trainer_cfg)
    seen = []
    for _ in range(10):
        seen.append(engine.lr)
        model(torch.ones(1, 3)).sum().backward()
        engine.step()
    expected = transformers_lrs(name, 0.01, 10, warmup, **kwargs)
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert len(set(seen)) > 1 or name == "constant"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.warmup_ratio=0.1"], "trainer.warmup_steps=4 and trainer.warmup_ratio=0.1 are both set"),
        (["trainer.num_epochs=2"], "trainer.max_steps=30 and trainer.num_epochs=2"),
        (["trainer.max_steps=null"], "trainer.max_steps and trainer.num_epochs are both null"),
        (["trainer.lr_schedule=constant"], "use trainer.lr_schedule=constant_with_warmup"),
        (["trainer.lr_schedule=cosine_with_min_lr"], "set trainer.min_lr_ratio"),
        (["trainer.min_lr_ratio=0.1"], "trainer.min_lr_ratio=0.1 is not used by trainer.lr_schedule=cosine"),
        (["trainer.lr_schedule=reduce_lr_on_plateau"], "steps on a metric"),
        (["trainer.lr_schedule=cosine_annealing"], "trainer.lr_schedule='cosine_annealing' is not a valid choice"),
        (
            ["+trainer.lr_scheduler_kwargs.power=2"],
            "trainer.lr_scheduler_kwargs.power is not an argument of the cosine schedule",
        ),
        (["trainer.lr_schedule=warmup_stable_decay"], "needs trainer.lr_scheduler_kwargs.num_decay_steps"),
        (["trainer.save_total_limit=0"], "trainer.save_total_limit=0 is impossible"),
    ],
)
def test_schedule_and_length_mistakes_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        validate_config(compose_config(["model=tiny_llama", "hardware=cpu", *overrides]))


# --- epochs


def test_epoch_steps_arithmetic():
    assert epoch_steps(1, 16, 2, 1, 1) == 8
    assert epoch_steps(2, 16, 2, 2, 2) == 4
    assert epoch_steps(1, 17, 4, 1, 1) == 5  # the last step finishes the epoch (and starts the next)
    assert epoch_steps(0.5, 16, 2, 1, 1) == 4
    assert epoch_steps(3, 10, 4, 1, 1) == 8  # 30 pairs / 4 per step, rounded up
    assert epoch_steps(0.01, 16, 2, 1, 1) == 1


def test_num_epochs_gives_the_expected_steps_and_records_them(tmp_path):
    # 16 generated pairs, 2 per micro batch x 2 accumulation x 1 rank = 4 pairs per step: 1.5 epochs = 6 steps
    run_dir = run_train(
        tmp_path / "run",
        *TINY,
        "trainer.max_steps=null",
        "trainer.num_epochs=1.5",
        "trainer.grad_accum=2",
        "logger.wandb.mode=disabled",
        "trainer.save_every=2",
        "trainer.save_total_limit=2",
    )
    [data] = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "data/train/pairs" in row]
    assert data["data/train/pairs"] == 16 and math.ceil(1.5 * 16 / 4) == 6
    assert [row["step"] for row in train_rows(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert train_rows(run_dir)[-1]["train/epoch"] == 1  # half way through the second pass
    recorded = OmegaConf.load(run_dir / "config.yaml")
    assert recorded.trainer.max_steps == 6 and recorded.trainer.num_epochs == 1.5
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    # the same run keeps trainer.save_total_limit=2 of its checkpoints at steps 2, 4, 6
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("step-*")) == ["step-000004", "step-000006"]


# --- checkpoints kept


def test_pruning_spares_the_new_checkpoint_and_the_one_resumed_from(tmp_path):
    from prefopt.train.checkpoint import checkpoints_beyond_limit

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / f"step-{step:06d}").mkdir(parents=True)
    (root / ".step-000010.partial").mkdir()
    names = lambda paths: [path.name for path in paths]  # noqa: E731
    assert names(checkpoints_beyond_limit(root, 2, root / "step-000008")) == ["step-000004", "step-000002"]
    assert names(checkpoints_beyond_limit(root, 2, root / "step-000008", protect=root / "step-000002")) == [
        "step-000004"
    ]
    # resumed from step 2, a new step 4 written while a stale step 6 and 8 exist: neither 4 nor 2 goes
    assert names(checkpoints_beyond_limit(root, 1, root / "step-000004", protect=root / "step-000002")) == [
        "step-000008",
        "step-000006",
    ]
    assert checkpoints_beyond_limit(root, None, root / "step-000008") == []


def test_checkpoints_are_listed_one_way_newest_step_first(tmp_path):
    """runfiles.checkpoint_dirs: what resume, pruning and the reuse check all list. A save in progress is never a
    checkpoint; a retired copy is one only where its step-N is missing (and only when asked for)."""
    from prefopt.core.runfiles import checkpoint_dir_name, checkpoint_dirs
    from prefopt.train.checkpoint import checkpoint_candidates

    root = tmp_path / "checkpoints"
    for step in (2, 10, 1_000_000):  # past six digits the names no longer sort as the steps do
        (root / checkpoint_dir_name(step)).mkdir(parents=True)
    (root / ".step-000012.partial").mkdir()
    (root / ".step-000010.retired").mkdir()  # its step-000010 is back: a leftover, not a checkpoint
    (root / ".step-000004.retired").mkdir()  # a save of step 4 cut off mid-replace: it is step 4
    names = lambda paths: [path.name for path in paths]  # noqa: E731
    assert names(checkpoint_dirs(root)) == ["step-1000000", "step-000010", "step-000002"]
    assert names(checkpoint_dirs(root, retired=True)) == [
        "step-1000000",
        "step-000010",
        ".step-000004.retired",
        "step-000002",
    ]
    assert checkpoint_candidates(tmp_path) == checkpoint_dirs(root, retired=True)
    assert checkpoint_dirs(tmp_path / "none") == []


# two runs, 7 checkpoints (~25 s of CPU); the quick checks: test_pruning_spares_..., and the epochs run below
@pytest.mark.slow
def test_save_total_limit_keeps_n_and_never_the_checkpoint_resumed_from(tmp_path):
    common = [*TINY, "trainer.max_steps=4", "trainer.save_every=1", "logger.wandb.mode=disabled"]
    run_dir = run_train(tmp_path / "run", *common, "trainer.stop_after=3", "trainer.save_total_limit=2")
    checkpoints = run_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.glob("step-*")) == ["step-000002", "step-000003"]
    assert all((path / "manifest.json").is_file() for path in checkpoints.glob("step-*"))
    # resumed from step 2 with a limit of 1: the newest stays, and so does the one it resumed from
    run_train(run_dir, *common, f"trainer.resume={checkpoints / 'step-000002'}", "trainer.save_total_limit=1")
    assert sorted(path.name for path in checkpoints.glob("step-*")) == ["step-000002", "step-000004"]
    assert (checkpoints / "latest").read_text().strip() == "step-000004"


# --- resume


def copy_run_with(run_dir: Path, new_dir: Path, **changes) -> Path:
    """A copy of a finished run dir, its config.yaml changed (dotted keys) and not finished: another run,
    saved a minute later, without training it."""
    shutil.copytree(run_dir, new_dir)
    config = OmegaConf.load(new_dir / "config.yaml")
    for key, value in changes.items():
        OmegaConf.update(config, key.replace("__", "."), value)
    (new_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (new_dir / "summary.json").unlink()
    for manifest in new_dir.glob("checkpoints/step-*/manifest.json"):
        os.utime(manifest, (manifest.stat().st_mtime + 60,) * 2)
    return new_dir


def test_resume_true_without_a_checkpoint_lists_the_runs_that_have_one(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    common = [*TINY, "trainer.max_steps=2", "logger.wandb.mode=disabled"]
    same = run_train(outputs / "same", *common)
    other = copy_run_with(same, outputs / "other", loss__beta=0.5)
    capsys.readouterr()
    assert run_main(*common, f"hydra.run.dir={outputs / 'new'}", "trainer.resume=true") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"run dir {outputs / 'new'} has no checkpoint" in err
    lines = err.splitlines()
    other_line = next(line for line in lines if f"trainer.resume={other.resolve()} " in line)
    same_line = next(line for line in lines if f"trainer.resume={same.resolve()} " in line)
    assert lines.index(other_line) < lines.index(same_line)  # newest first
    assert "step 2" in same_line and "same config" in same_line
    assert "other config" in other_line and "loss.beta: 0.5 there vs 0.1 now" in other_line
    assert "trainer.resume=latest" in err
    assert not (outputs / "new" / "config.yaml").exists()  # nothing was written

    # latest: the run with this config has finished, the other differs, and the error says so
    assert run_main(*common, f"hydra.run.dir={outputs / 'new2'}", "trainer.resume=latest") == 2
    assert "have finished" in capsys.readouterr().err
    assert run_main(*common, "loss.beta=0.3", f"hydra.run.dir={outputs / 'new3'}", "trainer.resume=latest") == 2
    err = capsys.readouterr().err
    assert "no run under" in err and "has this config" in err and "loss.beta: 0.5 there vs 0.3 now" in err


def test_latest_picks_the_newest_unfinished_run_with_this_config(tmp_path):
    from prefopt.run.resume import find_latest_run

    cfg = compose_config(["model=tiny_llama", "hardware=cpu"])
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def fake_run(name: str, saved_at: float, finished: bool = False, **changes) -> Path:
        run_dir = tmp_path / "outputs" / "2026-12-04" / name
        checkpoint = run_dir / "checkpoints" / "step-000003"
        checkpoint.mkdir(parents=True)
        (checkpoint / "manifest.json").write_text("{}")
        os.utime(checkpoint / "manifest.json", (saved_at, saved_at))
        config = OmegaConf.create(resolved)
        for key, value in {"run_dir": str(run_dir), **changes}.items():
            OmegaConf.update(config, key.replace("__", "."), value)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
        if finished:
            (run_dir / "summary.json").write_text("{}")
        return run_dir

    older = fake_run("a", 1000, trainer__stop_after=3, logger__wandb__mode="disabled")  # keys resume ignores
    fake_run("b", 2000, trainer__seed=7)  # newer, another config
    fake_run("c", 3000, finished=True)  # newest, same config, finished: nothing to continue
    (tmp_path / "outputs" / "2026-12-04" / "d").mkdir()  # this launch's fresh dir: no checkpoint
    found = find_latest_run(cfg, [tmp_path / "outputs"], exclude=tmp_path / "outputs" / "2026-12-04" / "d")
    assert found.run_dir == older.resolve() and found.step == 3


# four tiny runs (~40 s of CPU); test_latest_picks_the_newest_unfinished_run_with_this_config is the quick one
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_resume_latest_continues_the_same_dir_and_matches_an_uninterrupted_run(tmp_path, engine):
    common = [*TINY, *SCHEDULE, f"hardware.engine={engine}", "trainer.max_steps=6", "trainer.save_every=3"]
    straight = run_train(
        tmp_path / "elsewhere" / "straight", *common, "logger.wandb.mode=disabled"
    )  # logger: a key resume ignores
    outputs = tmp_path / "outputs"
    stopped = run_train(outputs / "stopped", *common, "trainer.stop_after=3", "logger.wandb.mode=offline")
    other = run_train(
        outputs / "other", *common, "trainer.stop_after=3", "trainer.seed=1", "logger.wandb.mode=disabled"
    )  # newer, another config
    wandb_id = (stopped / "wandb_run_id").read_text()
    other_rows = read_jsonl(other / "metrics.jsonl")

    launch_dir = run_train(outputs / "launch", *common, "trainer.resume=latest", "logger.wandb.mode=offline")
    assert not (launch_dir / "metrics.jsonl").exists() and not (launch_dir / "checkpoints").exists()
    assert read_jsonl(other / "metrics.jsonl") == other_rows  # the other config's run is untouched
    assert [row["step"] for row in train_rows(stopped)] == [1, 2, 3, 4, 5, 6]  # one metrics.jsonl, continued
    ignore = {"train/tokens_per_s", "train/tflops", "train/mfu"}
    for row_a, row_b in zip(read_jsonl(straight / "metrics.jsonl"), read_jsonl(stopped / "metrics.jsonl"), strict=True):
        assert row_a.keys() == row_b.keys()
        for key in row_a.keys() - ignore:
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-6, abs=1e-7), (row_a["step"], key)
    assert [row["train/learning_rate"] for row in train_rows(stopped)] == pytest.approx(
        transformers_lrs("cosine_with_min_lr", 1e-3, 6, warmup=3, min_lr_rate=0.1), rel=1e-9
    )
    assert (stopped / "summary.json").is_file()
    assert (stopped / "wandb_run_id").read_text() == wandb_id  # the same W&B run, resumed
    assert len(list((stopped / "wandb").glob(f"offline-run-*-{wandb_id.strip()}"))) == 2
    assert OmegaConf.load(stopped / "config.yaml").trainer.resume == "latest"
    logs = "".join(path.read_text() for path in stopped.glob("*.log"))
    assert "resumed from" in logs and "step 6/6" in logs  # this launch's log went to the run it continued
    assert math.isfinite(json.loads((stopped / "summary.json").read_text())["eval/loss"])


def test_the_torch_engine_steps_fused_adamw_and_it_is_the_adamw_formula():
    """The plain engine uses torch's fused AdamW (4.5x faster per step on the CPU); its update is still
    AdamW's formula: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2,
    w -= lr (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd w)."""
    from prefopt.train.engine import TorchEngine

    trainer_cfg = trainer_node(
        max_steps=10, lr=0.01, warmup_steps=0, lr_schedule="constant", weight_decay=0.1, max_grad_norm=1e9
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    engine = TorchEngine(model, trainer_cfg)
    assert engine.optimizer.param_groups[0]["fused"] is True
    weight = model.weight.detach().clone().double()
    first, second = torch.zeros_like(weight), torch.zeros_like(weight)
    (beta1, beta2), eps, lr, decay = (0.9, 0.999), 1e-8, 0.01, 0.1
    for step in range(1, 4):
        inputs = torch.randn(2, 4)
        model(inputs).pow(2).sum().backward()
        grad = model.weight.grad.detach().double()
        engine.step()
        weight = weight - lr * decay * weight  # decoupled weight decay, applied first (torch's order)
        first, second = beta1 * first + (1 - beta1) * grad, beta2 * second + (1 - beta2) * grad**2
        weight = weight - lr * (first / (1 - beta1**step)) / ((second / (1 - beta2**step)).sqrt() + eps)
        torch.testing.assert_close(model.weight.detach().double(), weight, rtol=1e-5, atol=1e-7)
