"""Synthetic datasets for the paper's small experiments (``megatrain data synth``).

Each task module (``induction``, ``polynomial``) owns its vocabulary, its generator and the facts
its evaluation needs (which tokens are scored); ``dataset`` writes the documents as a prepared
dataset in ``megatrain data prepare``'s format, with a word-level ``tokenizer.json`` of the task's
vocabulary, so ``megatrain train data.path=DIR`` and the loader take it unchanged.
"""
