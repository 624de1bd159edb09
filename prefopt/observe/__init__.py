"""L2, observation: the console, tracking (metrics.jsonl, W&B), metric names, plots, sweep reports and seed
statistics. Imports core/, data/ and losses/ only, and no torch: `prefopt report` and `prefopt plot` read files."""
