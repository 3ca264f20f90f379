"""Test-session set-up: the data cache lives in a temporary folder, never in the user's home."""

import os
import tempfile

os.environ.setdefault("PACI_CACHE", tempfile.mkdtemp(prefix="paci-test-cache-"))
