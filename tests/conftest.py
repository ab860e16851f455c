"""Test-wide settings: CPU only, one intra-op thread.

The suite's models are tiny; on a 2-core machine two intra-op threads per process mostly
contend with each other (and with the gloo test processes) instead of helping.
"""
import os

import torch

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_num_threads(1)


import pytest


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    """Some code under test sets its own thread count (e.g. the CLIP trainer); reset it."""
    torch.set_num_threads(1)
    yield
