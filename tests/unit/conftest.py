"""Fixtures shared by the kernel tests."""

from __future__ import annotations

import secrets

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed each run (printed, to replay a failure)."""
    seed = secrets.randbits(32)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
