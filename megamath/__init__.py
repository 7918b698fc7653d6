"""megamath: continued pretraining of mathematical language models, Megatron style."""

__version__ = "0.1.0"
