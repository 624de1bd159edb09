"""L5, the parent side: compose, validate and freeze the config, own the run dir, launch the workers, sweeps and
SLURM jobs, hardware=auto planning, resume lookup, export, `prefopt eval`'s and `prefopt data`'s parent halves.
Imports every lower layer; only cli.py and worker.py import run/."""
