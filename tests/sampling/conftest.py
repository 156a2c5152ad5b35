"""The sampler tests run on the device this fixture names: the CPU here; tests/gpu collects the
same test functions again with a CUDA `device`."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device("cpu")
