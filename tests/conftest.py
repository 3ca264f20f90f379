"""Test-session set-up: the data cache lives in a temporary folder, never in the user's home."""

import os
import tempfile

os.environ.setdefault("PACI_CACHE", tempfile.mkdtemp(prefix="paci-test-cache-"))


def pytest_collection_modifyitems(config, items):
    """The tests marked slow (the end-to-end runs of 10 s and more) go first, so that under
    `make test`'s two workers (pytest-xdist) no long one starts last and runs alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
