"""Shared fixtures: tiny synthesized checkpoints in every form (see pool.synth); Hypothesis profiles."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Tests never touch the network: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The conversion cache is opt-in; a user's own cache must not change what the tests read (tests of the
# cache pass cache_dir= or set the variable themselves).
os.environ.pop("OPENCLIP_POOL_CACHE_DIR", None)

pytest_plugins = ["pool.testing"]

# Hypothesis profiles. "ci" (the default): derandomised, so every run tries the same examples (each
# property test sets its own bounded count through helpers.examples). "fuzz": random examples, 2000
# per property test, failures kept in .hypothesis/ for replay:
#     POOL_HYPOTHESIS_PROFILE=fuzz pytest tests/test_reader_properties.py ...
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("POOL_HYPOTHESIS_PROFILE", "ci"))
