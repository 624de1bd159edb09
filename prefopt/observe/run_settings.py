"""What sets runs apart: the config keys whose values differ between run dirs, so a legend (`prefopt plot`) or a
report table (`prefopt report`) names only those ("loss=gate_dpo, loss.beta=0.05") and states the shared settings
once, instead of repeating every run's whole command line.

A key counts when any run overrides it; each run's value is what it ran with (seed_groups.job_setting: its override,
else Hydra's group choice, else its frozen config.yaml), so `loss.beta=0.05` in one run is compared with the other
run's default 0.1, not with nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from prefopt.observe.seed_groups import Job, job_setting, read_job

SEPARATOR = ", "  # between the settings of one label


@dataclass
class SettingsDiff:
    shared: list[str]  # `key=value` every run has, in the order the runs' overrides name them
    differing: list[list[str]]  # per run, its `key=value` for each key whose value is not the same in every run

    @property
    def shared_text(self) -> str:
        return SEPARATOR.join(self.shared)

    def label(self, index: int) -> str:
        return SEPARATOR.join(self.differing[index])


def settings_diff(jobs: Sequence[Job]) -> SettingsDiff:
    """The overridden keys split into those every job shares a value of and those that differ (per job)."""
    keys = list(dict.fromkeys(key for job in jobs for key in job.overrides))
    shared, differing_keys = [], []
    for key in keys:
        settings = [job_setting(job, key) for job in jobs]
        if len({setting.value for setting in settings}) == 1:
            shared.append(f"{key}={settings[0].text}")
        else:
            differing_keys.append(key)
    differing = [[f"{key}={job_setting(job, key).text}" for key in differing_keys] for job in jobs]
    return SettingsDiff(shared, differing)


def run_legend_labels(run_dirs: Sequence[Path]) -> tuple[list[str], str]:
    """(one legend label per run: the settings that differ, or its dir name when they do not tell it apart; the
    settings all runs share, for the title). A single run gets no label: there is nothing to tell apart."""
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    diff = settings_diff([read_job(run_dir) for run_dir in run_dirs])
    if len(run_dirs) == 1:
        return [""], diff.shared_text
    labels = [diff.label(index) for index in range(len(run_dirs))]
    if len(set(labels)) < len(labels):  # runs alike in every overridden key (a repeat): their dirs tell them apart
        names = [run_dir.resolve().name for run_dir in run_dirs]
        labels = [f"{name}: {label}" if label else name for name, label in zip(names, labels)]
    return labels, diff.shared_text
