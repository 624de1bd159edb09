"""L2, the model: loading the policy, the reference and the tokenizer; log-probs; the precision rule.
Imports core/, data/ and losses/ only."""
