"""CUDA availability checks without a cost per optimizer step on machines that have no NVIDIA driver.

Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` when it is imported, so that asking whether CUDA
is available does not initialise CUDA (which a forked process could then not use). PyTorch then
answers ``torch.cuda.is_available()`` by loading NVML, and every ``Optimizer.step`` asks it (its
graph-capture health check): on a machine without the driver each call searches the library path
for ``libnvidia-ml.so.1`` and fails, about a quarter of a millisecond per step, more than a small
student's whole optimizer step. Without NVML there is no NVIDIA GPU to initialise, so the check
that avoids initialising it can go; with NVML present nothing changes.
"""

from __future__ import annotations

import ctypes
import os

import torch

VARIABLE = "PYTORCH_NVML_BASED_CUDA_CHECK"


def skip_nvml_check_without_nvml() -> bool:
    """Unset ``PYTORCH_NVML_BASED_CUDA_CHECK`` when NVML cannot be loaded; return whether it was unset."""
    if os.environ.get(VARIABLE) != "1" or torch.version.hip is not None:  # ROCm asks its own library, not NVML
        return False
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        del os.environ[VARIABLE]
        return True
    return False
