"""Fused Triton kernels for chat SFT. ``kernels`` never imports ``trainer``."""

from kernels.masked_ce import masked_linear_cross_entropy, masked_linear_cross_entropy_ref

__all__ = [
    "masked_linear_cross_entropy",
    "masked_linear_cross_entropy_ref",
]
