"""paci: pipeline-parallel training of PyTorch models, built around PACI (arXiv 2606.07881)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`paci.Pipeline`, `paci.History` and `paci.Stopped` (paci.api) and `paci.plan` (paci.planner),
    imported on first use so that the command line starts fast."""
    if name in ("Pipeline", "History", "Stopped"):
        import paci.api

        return getattr(paci.api, name)
    if name == "plan":
        import paci.planner

        return paci.planner.plan
    raise AttributeError(f"module 'paci' has no attribute {name!r}")
