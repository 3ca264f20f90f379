"""paci: pipeline-parallel training of PyTorch models, built around PACI (arXiv 2606.07881)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`paci.Pipeline`, `paci.History` and `paci.Stopped` (paci.api), imported on first use so that
    the command line starts fast."""
    if name in ("Pipeline", "History", "Stopped"):
        import paci.api

        return getattr(paci.api, name)
    raise AttributeError(f"module 'paci' has no attribute {name!r}")
