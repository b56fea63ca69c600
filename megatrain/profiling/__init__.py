"""Profiling a training step: memory per phase and per head (``megatrain profile memory``).

``phases`` is imported by the training code itself and must stay free of imports from the rest of
megatrain; ``memory`` runs the trainer and is imported only by the CLI and tests.
"""
