"""Sampling parameters and the batched sampler."""

from .params import RequestOutputKind, SamplingParams

__all__ = ["RequestOutputKind", "SamplingParams"]
