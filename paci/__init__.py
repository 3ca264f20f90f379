"""paci: pipeline-parallel training of PyTorch models, built around PACI (arXiv 2606.07881)."""

__version__ = "0.1.0"
