"""Test-wide settings: CPU only, one intra-op thread.

The suite's models are tiny; on a 2-core machine two intra-op threads per process mostly
contend with each other (and with the gloo test processes) instead of helping.
"""
import os

import torch

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_num_threads(1)
