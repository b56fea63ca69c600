"""megatrain: pretraining multi-token prediction language models (Gloeckle et al., 2024)."""

__version__ = "0.1.0"
