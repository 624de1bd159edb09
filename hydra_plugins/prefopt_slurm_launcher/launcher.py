"""The Hydra launcher behind hydra/launcher=slurm (and slurm_local): hydra-submitit-launcher's SLURM
launcher with prefopt's handling of jobs that do not finish. (It lives in the hydra_plugins namespace
package because Hydra instantiates launchers from there only.)

    prefopt train -m hydra/launcher=slurm hardware=slurm_8gpu loss=dpo,lpo hydra.launcher.partition=gpu

Each sweep job is one element of a SLURM array job, with tasks_per_node = ranks per node; inside it
prefopt.run.sweep.run_job runs in every task. What this class adds to the plugin's launcher:

- it waits on all jobs with one `sacct` call per poll (poll_interval_s), so a job that ends without a
  result (cancelled, killed, out of memory, over its time limit) is reported as soon as SLURM says so;
- a failed job's error is its run dir's error.txt (the worker's traceback) and its log's path, and a job
  killed from outside gets an error.txt saying how it ended, so `prefopt report` marks it failed;
- sweep.continue_on_failure: true = the other jobs finish, the failed ones come back as failed jobs
  (Hydra then fails the sweep at its end; Optuna records failed trials); false = the first failure
  cancels the jobs still queued or running and stops the sweep;
- srun gets --kill-on-bad-exit, so a rank that fails ends its job's other ranks.

Requeue after a time limit or preemption is the plugin's (submitit's checkpoint hook resubmits the same
job, max_num_timeout times); the requeued job resumes from its run dir (prefopt.worker).
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from prefopt.core.fileutil import atomic_write_text
from prefopt.core.runfiles import ERROR_FILE, ERROR_GLOB

log = logging.getLogger("prefopt")


class JobFailed(RuntimeError):
    """A sweep job failed or ended without a result; the message says which, how, and where its log is."""


@dataclass
class PrefoptSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.prefopt_slurm_launcher.launcher.SlurmLauncher"
    poll_interval_s: float = 10.0  # seconds between sacct polls while the sweep waits on its jobs


# `defaults: [prefopt_submitit_slurm]` in conf/hydra/launcher/slurm.yaml refers to this node
ConfigStore.instance().store(
    group="hydra/launcher", name="prefopt_submitit_slurm", node=PrefoptSlurmQueueConf, provider="prefopt"
)


class SlurmLauncher(SubmititSlurmLauncher):
    def __init__(self, poll_interval_s: float = 10.0, **params: Any) -> None:
        super().__init__(**params)
        self.poll_interval_s = float(poll_interval_s)

    def submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        """The plugin's submission (its parameters, one array job for the batch) without its blocking wait."""
        import submitit

        assert self.config is not None
        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            slurm_max_num_timeout=self.params["max_num_timeout"],
        )
        base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
        params = {
            key if key in base_keys else f"{self._EXECUTOR}_{key}": value
            for key, value in self.params.items()
            if key not in init_keys
        }
        params["slurm_srun_args"] = [
            "--kill-on-bad-exit=1"
        ]  # a rank that fails ends the job, not a hang in a collective
        executor.update_parameters(**params)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("SLURM sweep dir: %s", sweep_dir)
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        return executor.map_array(self, *zip(*job_params))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs = self.submit(job_overrides, initial_job_idx)
        log.info("submitted SLURM jobs %s", ", ".join(job.job_id for job in jobs))
        continue_on_failure = bool(OmegaConf.select(self.config, "sweep.continue_on_failure", default=True))
        returns: list[JobReturn | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        while pending:
            jobs[0].watcher.update()  # one sacct call for every job still running
            for position in list(pending):
                job = jobs[position]
                if not job.done():
                    continue
                pending.remove(position)
                overrides = list(job_overrides[position])
                returns[position] = self.job_return(job, overrides, initial_job_idx + position)
                if returns[position].status == JobStatus.FAILED and not continue_on_failure:
                    for other in pending:
                        jobs[other].cancel(check=False)
                    raise JobFailed(
                        f"{returns[position]._return_value}\n(sweep.continue_on_failure=false: cancelled the "
                        f"{len(pending)} jobs still queued or running)"
                    )
            if pending:
                time.sleep(self.poll_interval_s)
        return returns

    def job_dir(self, overrides: list[str], job_num: int) -> Path:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config.hydra.job):
            config.hydra.job.num = job_num
        return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)

    def job_return(self, job, overrides: list[str], job_num: int) -> JobReturn:
        """The job's own JobReturn (rank 0's) when it finished; a failed one saying why otherwise."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            result = job.results()[0]
            if result.status == JobStatus.COMPLETED:
                return result
            error: BaseException = result._return_value
        except (FailedJobError, UncompletedJobError) as caught:
            error = caught
        job_dir = self.job_dir(overrides, job_num)
        errors = sorted(job_dir.glob(ERROR_GLOB))
        state = job.state
        if errors:
            details = "\n".join(path.read_text() for path in errors)
        else:
            details = str(error)
            atomic_write_text(
                job_dir / ERROR_FILE, f"SLURM job {job.job_id} ended {state} without a result\n{details}\n"
            )
        message = (
            f"job {job_num} ({' '.join(filter_overrides(overrides))}): SLURM job {job.job_id} ended {state}\n"
            f"{details.rstrip()}\njob log: {job.paths.stdout} (and .err)"
        )
        log.error(message)
        return JobReturn(
            overrides=overrides, status=JobStatus.FAILED, _return_value=JobFailed(message), working_dir=str(job_dir)
        )
