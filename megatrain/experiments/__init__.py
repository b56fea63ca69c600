"""The paper's small experiments at our scale: ``python -m megatrain.experiments NAME [--quick]``.

Each experiment makes its data, trains the parameter-matched arms (``n_layers`` fixed, so n heads
replace n-1 trunk layers), evaluates them and appends its table to ``docs/results.md`` beside the
paper's finding. ``--quick`` is sized for about 15 minutes on 2 CPU cores; the full variant's cost
is printed before it starts. Experiments are not part of the test suite.
"""
