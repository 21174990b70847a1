"""Fused Triton kernels for chat SFT. ``tritrain_kernels`` never imports ``trainer``."""

from tritrain_kernels.masked_ce import (
    CrossEntropyOutput,
    masked_linear_cross_entropy,
    masked_linear_cross_entropy_ref,
    masked_linear_logprob_sums,
    masked_linear_logprob_sums_ref,
)
from tritrain_kernels.varlen_attention import varlen_attention, varlen_attention_ref

__all__ = [
    "CrossEntropyOutput",
    "masked_linear_cross_entropy",
    "masked_linear_cross_entropy_ref",
    "masked_linear_logprob_sums",
    "masked_linear_logprob_sums_ref",
    "varlen_attention",
    "varlen_attention_ref",
]
