"""Test-wide settings."""

from __future__ import annotations

import os

from hypothesis import settings

# In CI, property tests draw the same examples every run (and keep no database): a failure there is reproducible,
# never a flake. Locally they explore new examples each run.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
