"""L3, the machinery of a worker job: the preference step, the optimizer engine, checkpoints, schedules, guards,
the reference pass, rank-split passes, probes and evaluation, and the build phase that assembles them.
Imports model/, observe/, data/, losses/ and core/."""
