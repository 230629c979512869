"""Shared fixtures: tiny synthesized checkpoints in every form (see pool.synth)."""

from __future__ import annotations

import os

# Tests never touch the network: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest_plugins = ["pool.testing"]
