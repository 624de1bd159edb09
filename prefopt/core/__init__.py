"""L0, the core: user errors, atomic files and locks, run-dir names and ownership, the process tree, ranks and
collectives, the SLURM environment, hub reachability. Imports nothing from prefopt outside core/."""
