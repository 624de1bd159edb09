# prefopt's SLURM launcher for Hydra (hydra/launcher=slurm, slurm_local): Hydra loads launchers only from
# the hydra_plugins namespace package, which it scans at start-up.
