"""Hugging Face causal LMs on packed batches: varlen attention and the decoder's final hidden states.

The attention part (this first section) registers :func:`kernels.varlen_attention` with
``transformers.AttentionInterface`` and calls the decoder the padding-free way: ``position_ids``,
``cu_seq_lens_q/k``, ``max_length_q/k``, ``use_cache=False`` and no ``attention_mask``. On
transformers 5.x, leaving ``use_cache`` at its default or passing an all-ones 2D mask makes packed
conversations silently attend to each other; passing cu_seqlens explicitly also saves a GPU->CPU sync
per layer. The name is not registered as a mask function, so transformers builds no [T, T] mask.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from kernels.varlen_attention import select_backend, varlen_attention
from trainer.packing import PackedBatch

ATTN_NAME = "tritrain_varlen"


def _varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, Hq, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: [1, H, T, D] in, ([1, T, Hq, D], None) out."""
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None or max_seqlen is None:
        raise ValueError(
            f"{ATTN_NAME} attention needs cu_seq_lens_q/k and max_length_q/k in the decoder call; "
            "use trainer.model.decoder_hidden_states(model, batch)"
        )
    if attention_mask is not None:
        raise ValueError(f"{ATTN_NAME} attention got an attention_mask; packed batches must pass none")
    if query.shape[0] != 1:
        raise ValueError(
            f"{ATTN_NAME} attention expects one packed row (batch 1), got batch {query.shape[0]}"
        )
    if dropout != 0.0:
        raise ValueError(f"{ATTN_NAME} attention does not support attention dropout ({dropout}); set it to 0")
    if sliding_window is not None or softcap is not None:
        raise ValueError(
            f"{ATTN_NAME} attention does not support sliding_window={sliding_window} / softcap={softcap}; "
            "disable them in the model config or use another attention implementation"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = varlen_attention(
        query[0].transpose(0, 1),  # [T, Hq, D]; last dim stays contiguous
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32),
        int(max_seqlen),
        causal=causal,
        softmax_scale=scaling,
    )
    return out.unsqueeze(0), None


def register_varlen_attention(backend: str | None = None) -> str:
    """Select the varlen backend (see ``kernels.varlen_attention.select_backend``) and register the
    attention function with ``transformers.AttentionInterface``; return its name, :data:`ATTN_NAME`."""
    select_backend(backend)
    AttentionInterface.register(ATTN_NAME, _varlen_attention_forward)
    return ATTN_NAME


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_varlen_attention(model: torch.nn.Module, backend: str | None = None) -> None:
    """Switch a loaded (possibly PEFT-wrapped) transformers model to packed varlen attention."""
    name = register_varlen_attention(backend)
    base = _base_model(model)
    if not getattr(base, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(base).__name__} does not dispatch attention through transformers.AttentionInterface; "
            "packing needs a model that does (Llama, Qwen2/3, GLM-4 ...)"
        )
    base.set_attn_implementation(name)
    if base.config._attn_implementation != name:
        raise RuntimeError(f"{type(base).__name__} refused attention implementation {name!r}")


def decoder_hidden_states(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Final (post-norm) hidden states ``[1, T, H]`` of the decoder on a packed batch; no logits.

    Works on PEFT-wrapped models (LoRA layers live inside the decoder's modules) and with gradient
    checkpointing (the varlen keyword arguments travel through each checkpointed layer).
    """
    base = _base_model(model)
    if base.config._attn_implementation != ATTN_NAME:
        raise ValueError(
            f"model attention is {base.config._attn_implementation!r}, not {ATTN_NAME!r}: packed "
            "conversations would attend to each other; call enable_varlen_attention(model) first"
        )
    decoder = base.get_decoder()
    out = decoder(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        cu_seq_lens_q=batch.cu_seqlens,
        cu_seq_lens_k=batch.cu_seqlens,
        max_length_q=batch.max_seqlen,
        max_length_k=batch.max_seqlen,
        use_cache=False,
    )
    return out.last_hidden_state
