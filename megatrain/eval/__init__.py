"""``megatrain eval``: held-out loss per head, HumanEval in a sandbox, and the synthetic probes."""
