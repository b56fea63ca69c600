"""Using the trained heads: loading a model into one process, KV-cache generation, self-speculative
decoding (see inference/DESIGN.md)."""
