"""Hugging Face causal LMs on packed batches: model setup, per-layer varlen attention, the head, LoRA.

:func:`prepare_model` is the one place a model is set up (training, ``check``, ``generate`` and the
benchmarks call it): load it in its dtype on its device, refuse what the project cannot express exactly,
read the head spec the fused loss needs, install packed attention layer by layer, and wrap it with LoRA.

Packed attention registers :func:`tritrain_kernels.varlen_attention` with ``transformers.AttentionInterface``
and calls the decoder the padding-free way: ``position_ids``, ``cu_seq_lens_q/k``, ``max_length_q/k``,
``use_cache=False`` and no ``attention_mask``. On transformers 5.x, leaving ``use_cache`` at its default or
passing an all-ones 2D mask makes packed conversations silently attend to each other; passing cu_seqlens
explicitly also saves a GPU->CPU sync per layer. The name is not registered as a mask function, so
transformers builds no [T, T] mask. Each layer's needs (sliding window, logit softcap, sinks) are read
from the model when attention is installed, a backend is chosen for each and printed once; the model's
own arguments at run time must agree, so no feature is ever dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from trainer.data import load_tokenizer
from trainer.packing import PackedBatch
from trainer.quantize import load_nf4
from tritrain_kernels.hf import decoder_of as _hf_decoder_of
from tritrain_kernels.varlen_attention import AttentionNeeds, choose_backend, select_backend, varlen_attention

ATTN_NAME = "tritrain_varlen"
PROBE_NAME = "tritrain_probe"
_NEEDS_ATTR = "_tritrain_attention_needs"  # set on each attention module by enable_varlen_attention
_DROPOUT_ATTR = "_tritrain_attention_dropout"  # the dropout the probe saw, left out (attn_dropout: off)
_RETURNS_ATTR = "_tritrain_returns"  # set by the probe on an nn.Linear whose forward returned no tensor
_PROBED_ATTR = "_tritrain_probed"  # what the probe forward saw the layer pass to its attention function
_MASK_WINDOW_ATTR = "_tritrain_mask_window"  # a window the model declares only through its mask (PhiMoE)
_FROM_POSITIONS_ATTR = "_tritrain_bounds_from_positions"  # its layer passes position_ids but no cu_seq_lens


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
    s_aux: torch.Tensor | None = None,  # gpt-oss: the layer's sinks, one logit per query head
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: [1, H, T, D] in, ([1, T, Hq, D], None) out."""
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None and getattr(module, _FROM_POSITIONS_ATTR, False) and "position_ids" in kwargs:
        cu_seqlens, max_seqlen = _bounds_from_positions(kwargs["position_ids"])  # Nemotron
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
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if sliding_window is None:  # PhiMoE windows through its mask only
        sliding_window = getattr(module, _MASK_WINDOW_ATTR, None)
    planned = getattr(module, _NEEDS_ATTR, None)
    asked = (causal, sliding_window, softcap, s_aux is not None)
    if planned is not None and (planned.causal, planned.window, planned.softcap, planned.sinks) != asked:
        raise RuntimeError(
            f"{type(module).__name__} {getattr(module, 'layer_idx', '')}: attention was planned as "
            f"({planned.features()}) but the model asks for causal={causal}, window={sliding_window}, "
            f"softcap={softcap}, sinks={s_aux is not None}; this model's attention is not supported"
        )
    if dropout != 0.0 and dropout != getattr(module, _DROPOUT_ATTR, None):
        raise RuntimeError(
            f"{type(module).__name__} {getattr(module, 'layer_idx', '')}: attention dropout {dropout} was "
            "not planned; this model's attention is not supported"
        )  # a planned dropout is left out, as enable_varlen_attention said at start (attn_dropout: off)
    dq, dv = query.shape[-1], value.shape[-1]
    if dq != dv:  # MLA (DeepSeek-V3, Kimi K2): zero columns change no score and no output column
        width = max(dq, dv)
        query, key, value = (F.pad(t, (0, width - t.shape[-1])) for t in (query, key, value))
        scaling = scaling if scaling is not None else dq**-0.5
    out = varlen_attention(
        query[0].transpose(0, 1),  # [T, Hq, D]; last dim stays contiguous
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32),
        int(max_seqlen),
        causal=causal,
        softmax_scale=scaling,
        window=sliding_window,
        softcap=softcap,
        sinks=s_aux,
    )
    if dq != dv:
        out = out[..., :dv]
    return out.unsqueeze(0), None


_BOUNDS_CACHE: list = [None, None]  # [weakref to the last position_ids seen, its (cu_seqlens, max_seqlen)]


def _bounds_from_positions(position_ids: torch.Tensor | None) -> tuple[torch.Tensor | None, int | None]:
    """(cu_seqlens int32 [n+1], max_seqlen) of a packed row from its ``position_ids`` [1, T], which restart at
    0 with each conversation (:class:`trainer.packing.PackedBatch`), for layers the decoder hands only
    position_ids. The decoder passes one tensor to every layer: computed once per forward (one sync)."""
    if position_ids is None or position_ids.shape[0] != 1:
        return None, None
    last = _BOUNDS_CACHE[0]() if _BOUNDS_CACHE[0] is not None else None
    if last is not position_ids:
        positions = position_ids[0]
        starts = (positions == 0).nonzero().flatten()
        if starts.numel() == 0 or starts[0].item() != 0:  # not a packed row: no boundaries to read
            return None, None
        cu = torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)
        _BOUNDS_CACHE[:] = [weakref.ref(position_ids), (cu, int((cu[1:] - cu[:-1]).max()))]
    return _BOUNDS_CACHE[1]


def register_varlen_attention(backend: str | None = None) -> str:
    """Select how varlen backends are chosen (``tritrain_kernels.varlen_attention.select_backend``) and
    register the attention function with ``transformers.AttentionInterface``; return its name,
    :data:`ATTN_NAME`."""
    select_backend(backend)
    AttentionInterface.register(ATTN_NAME, _varlen_attention_forward)
    return ATTN_NAME


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module that maps ``input_ids`` to the final hidden states (``last_hidden_state``) of a possibly
    PEFT-wrapped model: :func:`tritrain_kernels.hf.decoder_of` (``get_decoder()``, unless that is not such a
    module, as ModernBERT-decoder's vocabulary projection, then the base model). ValueError, in one line,
    when neither takes ``input_ids``."""
    return _hf_decoder_of(
        _base_model(model),
        needs="the packed path needs the final hidden states, so this model is not supported",
    )


def _is_attention(module: torch.nn.Module) -> bool:
    """An attention module by transformers' conventions: its class ends in ``Attention`` or ``MLA``
    (LongCat-Flash), or it declares ``is_causal`` as every attention class does (decoder layers and
    linear-attention mixers carry a ``layer_idx`` too, but no ``is_causal``)."""
    return type(module).__name__.endswith(("Attention", "MLA")) or isinstance(
        getattr(module, "is_causal", None), bool
    )


def attention_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, attention module) of every decoder layer, in order."""
    found = [
        (m.layer_idx, m)
        for name, m in _base_model(model).named_modules()
        if isinstance(getattr(m, "layer_idx", None), int) and _is_attention(m)
    ]
    return sorted(found, key=lambda pair: pair[0])


def _probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function that records what the layer passes (the plan's source), including
    whether an attention mask came (the probe's decoder call passes none, so any mask is the layer's own)
    and whether the decoder's ``cu_seq_lens_q`` reached it, and returns zeros of the right shape: the probe
    needs the arguments, not the output."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    setattr(module, _PROBED_ATTR, dict(
        causal=causal, window=sliding_window, softcap=softcap, sinks=s_aux is not None,
        dropout=float(dropout or 0.0), head_dim=max(query.shape[-1], value.shape[-1]),
        mask=attention_mask is not None, varlen=kwargs.get("cu_seq_lens_q") is not None,
        positions=kwargs.get("position_ids") is not None,
    ))  # fmt: skip
    batch, heads, tokens, _ = query.shape
    return query.new_zeros(batch, tokens, heads, value.shape[-1]), None


def probe_attention(model: torch.nn.Module, tokens: int = 4) -> bool:
    """Record what each attention layer's forward really passes to the attention interface (window,
    softcap, sinks, causal, dropout, head dims): one ``tokens``-long packed forward in training mode
    through :func:`_probe_attention`, without gradients and with the RNG state restored. Families decide
    per layer in their own ways (``sliding_window`` on every layer but ``is_sliding`` deciding, windows
    from ``layer_types``, ...); the forward is the one place they all agree. False when the weights are
    not materialised (meta device): the plan then reads the modules' attributes."""
    base = _base_model(model)
    weight = base.get_input_embeddings().weight
    if weight.device.type == "meta":
        return False
    AttentionInterface.register(PROBE_NAME, _probe_attention)
    previous, training = base.config._attn_implementation, base.training
    ids = (torch.arange(tokens, device=weight.device) % weight.shape[0]).unsqueeze(0)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=weight.device)
    devices = [weight.device.index or 0] if weight.is_cuda else []
    base.set_attn_implementation(PROBE_NAME)
    hooks = [m.register_forward_hook(_note_return) for m in base.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            base.train()
            decoder_of(base)(
                input_ids=ids, position_ids=torch.arange(tokens, device=weight.device).unsqueeze(0),
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=tokens, max_length_k=tokens, use_cache=False,
            )  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
        base.train(training)
        base.set_attn_implementation(previous)
    return True


def probe_record(model: torch.nn.Module) -> dict[str, dict]:
    """What :func:`probe_attention` recorded, per module name: to plan a skeleton of the same model
    (FSDP's meta-device ranks) exactly as the probed one (:func:`set_probe_record`)."""
    marks = {}
    for name, module in _base_model(model).named_modules():
        mark = {a: getattr(module, a) for a in (_PROBED_ATTR, _RETURNS_ATTR) if hasattr(module, a)}
        if mark:
            marks[name] = mark
    return marks


def set_probe_record(model: torch.nn.Module, record: dict[str, dict]) -> None:
    """Mark ``model``'s modules with another copy's :func:`probe_record` (module names must agree)."""
    base = _base_model(model)
    for name, mark in record.items():
        for attr, value in mark.items():
            setattr(base.get_submodule(name), attr, value)


def _note_return(module: torch.nn.Module, args, output) -> None:
    """Forward hook of the probe: mark an nn.Linear whose forward returns something other than a tensor
    (PEFT's LoRA wrapper adds its update to the base layer's output, so it cannot wrap one)."""
    if not isinstance(output, torch.Tensor):
        setattr(module, _RETURNS_ATTR, type(output).__name__)


def layer_needs(module: torch.nn.Module, config, dtype: torch.dtype, device: torch.device) -> AttentionNeeds:
    """What one attention layer asks of the kernel: what :func:`probe_attention` saw it pass, or where
    the layer was not probed, read from the module as most forwards read it: ``module.sliding_window``
    or ``config.sliding_window`` (Mistral, Phi-3), ``module.attn_logit_softcapping`` (Gemma 2),
    ``module.sinks`` (gpt-oss)."""
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    gqa = kv_heads is not None and kv_heads != heads
    probed = getattr(module, _PROBED_ATTR, None)
    if probed is not None and probed["window"] is None and _mask_window(module, config) is not None:
        setattr(module, _MASK_WINDOW_ATTR, _mask_window(module, config))
        probed = {**probed, "window": _mask_window(module, config)}
    if probed is not None:
        return AttentionNeeds(
            head_dim=probed["head_dim"], dtype=dtype, device=device.type, causal=probed["causal"],
            window=probed["window"], softcap=probed["softcap"], sinks=probed["sinks"], gqa=gqa,
        )  # fmt: skip
    window = getattr(module, "sliding_window", getattr(config, "sliding_window", None))
    softcap = getattr(module, "attn_logit_softcapping", None)
    head_dim = getattr(module, "head_dim", None) or config.hidden_size // heads
    return AttentionNeeds(
        head_dim=head_dim, dtype=dtype, device=device.type, causal=getattr(module, "is_causal", True),
        window=window, softcap=softcap, sinks=isinstance(getattr(module, "sinks", None), torch.Tensor),
        gqa=gqa,
    )  # fmt: skip


def _mask_window(module: torch.nn.Module, config) -> int | None:
    """A window the model applies only through the mask it builds (``config.sliding_window`` with no
    ``layer_types``, the forward passing no ``sliding_window``: PhiMoE), None otherwise. With
    ``layer_types`` the probe has seen every window the forward applies."""
    if getattr(config, "layer_types", None):
        return None
    return getattr(config, "sliding_window", None)


def hf_reference_attention(model: torch.nn.Module) -> str:
    """transformers' own attention that computes every layer exactly and that the model class supports:
    eager where a layer has a logit softcap or sinks (sdpa has neither) or the class has no sdpa
    (Gemma 2), sdpa otherwise (it takes sliding windows as a mask)."""
    base = _base_model(model)
    if not getattr(base, "_supports_sdpa", False):
        return "eager"
    for _, module in attention_modules(model):
        if getattr(module, "attn_logit_softcapping", None) or isinstance(
            getattr(module, "sinks", None), torch.Tensor
        ):
            return "eager"
    return "sdpa"


# Token mixers that are not softmax attention, by the words their classes carry in transformers (and any
# class named ...Mixer: Falcon-H1's and Nemotron-H's Mamba blocks).
_OTHER_MIXERS = ("Mamba", "GatedDeltaNet", "DeltaNet", "LinearAttention", "ShortConv", "Lightning", "RWKV")


def other_layer_kinds(model: torch.nn.Module) -> list[str]:
    """The decoder's token-mixing layers that are not attention (Qwen3.5 / Qwen3-Next linear attention,
    Nemotron-H and Falcon-H1 Mamba, LFM2 convolutions), from ``config.layer_types`` and module classes."""
    base = _base_model(model)
    kinds = {
        kind
        for kind in getattr(_text_config(base.config), "layer_types", None) or ()
        if kind not in _NOT_MIXERS
    }
    kinds |= {
        name
        for name in {type(m).__name__ for m in base.modules()}
        if is_other_mixer(name) and not name.endswith(_CONTAINERS)
    }
    return sorted(kinds)


# layer_types entries that name attention or a feed-forward block, not another token mixer (Nemotron-H)
_NOT_MIXERS = ("full_attention", "sliding_attention", "attention", "mlp", "moe", "dense")
# classes named after a mixer family that hold or normalise layers, not mix tokens (MambaBlock, MambaModel)
_CONTAINERS = ("Model", "ForCausalLM", "Block", "DecoderLayer", "Norm", "RMSNorm", "Cache")


def is_other_mixer(class_name: str) -> bool:
    """Whether a module class, by its name, mixes tokens other than by attention (:data:`_OTHER_MIXERS`,
    or any ``...Mixer``)."""
    return any(w in class_name for w in _OTHER_MIXERS) or class_name.endswith("Mixer")


def _layer_ranges(indices: list[int]) -> str:
    spans, start = [], None
    for i, idx in enumerate(indices):
        start = idx if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != idx + 1:
            spans.append(f"{start}" if start == idx else f"{start}-{idx}")
            start = None
    return ",".join(spans)


def enable_varlen_attention(
    model: torch.nn.Module, backend: str | None = None, *, log=None, dropout: str = "off", device=None
) -> list[str]:
    """Switch a loaded (possibly PEFT-wrapped) transformers model to packed varlen attention: probe what
    each layer passes to its attention (:func:`probe_attention`), choose a backend for each layer from
    that, remember the plan on the module (the forward checks it), and return the choices as lines (also
    passed to ``log`` when given: print once at start). A config's attention dropout is left out with one
    line (``dropout="off"``) or refused (``"refuse"``). ``device``: where the model will run, when its
    weights are not there yet (a meta skeleton that FSDP fills later); default, where they are."""
    name = register_varlen_attention(backend)
    base = _base_model(model)
    linear = linear_attention_modules(base)
    others = sorted(set(other_layer_kinds(base)) - _kinds_of(base, linear))
    if others:
        raise ValueError(
            f"{type(base).__name__} has {', '.join(others)} layers besides attention; packed training "
            "covers decoders whose layers are attention + MLP/MoE, and Gated DeltaNet linear attention "
            f"({', '.join(sorted(PACKED_LINEAR_ATTENTION))})"
        )
    weight = base.get_input_embeddings().weight
    # before the probe: transformers' own Gated DeltaNet refuses cu_seqlens without flash-linear-attention
    linear_line = (
        enable_packed_linear_attention(base, linear, device=device or weight.device) if linear else ""
    )
    probed = probe_attention(base)
    # Qwen3.5 / Qwen3-Next dispatch attention through the interface without declaring it: the probe shows it
    reached = linear and probed and all(hasattr(m, _PROBED_ATTR) for _, m in attention_modules(base))
    if not getattr(base, "_supports_attention_backend", False) and not reached:
        raise ValueError(
            f"{type(base).__name__} does not dispatch attention through transformers.AttentionInterface; "
            "packing needs a model that does (Llama, Qwen2/3, GLM-4 ...)"
        )
    config = _text_config(base.config)
    groups: dict[tuple[str, str], list[int]] = {}
    dropped: set[float] = set()
    for idx, module in attention_modules(base):
        _refuse_unpackable(idx, module)
        needs = layer_needs(module, config, weight.dtype, device or weight.device)
        setattr(module, _NEEDS_ATTR, needs)
        p = getattr(module, _PROBED_ATTR, {}).get("dropout", 0.0)
        if p:
            setattr(module, _DROPOUT_ATTR, p)
            dropped.add(p)
        groups.setdefault((choose_backend(needs), needs.features()), []).append(idx)
    if not groups:
        raise ValueError(f"{type(base).__name__}: no attention layer with a layer_idx found; not supported")
    if dropped and dropout == "refuse":
        raise ValueError(
            f"{type(base).__name__}: the config asks for attention dropout {max(dropped):g}, which packed "
            "attention does not apply (attn_dropout: refuse); attn_dropout: off trains without it"
        )
    base.set_attn_implementation(name)
    if base.config._attn_implementation != name:
        raise RuntimeError(f"{type(base).__name__} refused attention implementation {name!r}")
    lines = [
        f"attention layers {_layer_ranges(indices)}: {chosen} ({features})"
        for (chosen, features), indices in groups.items()
    ]
    if linear_line:
        lines.append(linear_line)
    from_positions = [idx for idx, m in attention_modules(base) if getattr(m, _FROM_POSITIONS_ATTR, False)]
    if from_positions:
        lines.append(
            f"attention layers {_layer_ranges(from_positions)}: their decoder layers pass no cu_seq_lens on, "
            "so conversation boundaries are read from position_ids (each restart at 0 starts one)"
        )
    if dropped:
        lines.append(
            f"attention dropout {max(dropped):g} (the model's config) is left out: packed attention trains "
            "without it, as most fine-tuning recipes set it to 0 (attn_dropout: refuse to stop instead)"
        )
    for line in lines if log is not None else ():
        log(line)
    return lines


# ------------------------------------------------------------------ hybrid layers: Gated DeltaNet, packed

# Gated DeltaNet classes whose packed forward is installed: their forward calls the module-level functions
# ``causal_conv1d_fn`` (through ``causal_conv1d_forward``, with the decoder's keyword arguments) and
# ``torch_chunk_gated_delta_rule`` (with ``cu_seqlens=`` the decoder's ``cu_seq_lens_q``) by name, which
# the packed forward points at boundary-respecting versions for the duration of the call. Other linear
# attention classes (OLMo-Hybrid, LaraMini, Qwen4-exp's extra short convolution) are not verified: refused.
PACKED_LINEAR_ATTENTION = ("Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet", "Qwen3NextGatedDeltaNet")
_LINEAR_PLAN_ATTR = "_tritrain_linear_backend"  # set on each Gated DeltaNet by enable_packed_linear_attention


def linear_attention_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, module) of the decoder's Gated DeltaNet layers that packing supports
    (:data:`PACKED_LINEAR_ATTENTION`)."""
    return [
        (m.layer_idx, m) for m in _base_model(model).modules() if type(m).__name__ in PACKED_LINEAR_ATTENTION
    ]


def _kinds_of(model: torch.nn.Module, linear: list[tuple[int, torch.nn.Module]]) -> set[str]:
    """The names :func:`other_layer_kinds` gives the supported linear attention layers: their classes and
    their ``layer_types`` entry."""
    layer_types = getattr(_text_config(_base_model(model).config), "layer_types", None) or ()
    kinds = {type(m).__name__ for _, m in linear}
    kinds |= {layer_types[idx] for idx, _ in linear if idx < len(layer_types)}
    return kinds


def enable_packed_linear_attention(
    model: torch.nn.Module, linear: list[tuple[int, torch.nn.Module]], *, device
) -> str:
    """Make each Gated DeltaNet layer restart its short convolution and its recurrent state at every
    conversation of a packed row, and return the one line saying what they run on.

    transformers' torch fallbacks ignore ``cu_seqlens``: the convolution reads the previous conversation's
    last 3 tokens and the recurrence carries its state over. Each layer's forward is wrapped: when the
    decoder passes ``cu_seq_lens_q`` (the packed path), the module-level ``causal_conv1d_fn`` and
    ``torch_chunk_gated_delta_rule`` its forward calls are, for that call, :func:`short_conv_varlen` and
    :func:`chunk_gated_delta_rule_varlen` (flash-linear-attention's kernel on CUDA when installed);
    otherwise (generation, the padded path of ``check``) the model's own forward runs untouched. A packed
    call (varlen attention installed) without ``cu_seq_lens_q`` is an error, never a silent mix."""
    from tritrain_kernels.linear_attention import gated_delta_rule_backend

    backend = gated_delta_rule_backend(device)
    for _, module in linear:
        if not hasattr(module, _LINEAR_PLAN_ATTR):  # installed once (prepare_model may run on a set-up model)
            module.forward = _packed_linear_forward(module, module.forward, model.config)
        setattr(module, _LINEAR_PLAN_ATTR, backend)
    kinds = sorted({type(m).__name__ for _, m in linear})
    recurrence = "flash-linear-attention" if backend == "fla" else "torch chunked"
    return (
        f"attention layers {_layer_ranges(sorted(idx for idx, _ in linear))}: linear ({', '.join(kinds)}): "
        f"short convolution torch, gated delta rule {recurrence}, both restarted at each conversation"
    )


def _packed_linear_forward(module: torch.nn.Module, forward, config):
    import sys

    from tritrain_kernels.linear_attention import chunk_gated_delta_rule_varlen, short_conv_varlen

    namespace = vars(sys.modules[type(module).__module__])  # the globals its forward calls by name
    missing = [f for f in ("causal_conv1d_fn", "torch_chunk_gated_delta_rule") if f not in namespace]
    if missing:
        raise ValueError(
            f"{type(module).__name__}: its module has no {', '.join(missing)} (a transformers release this "
            "project was not written for); packed linear attention is not supported"
        )

    def conv_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        cu = kwargs["cu_seq_lens_q"]
        return short_conv_varlen(hidden_states, weight, bias, cu_seqlens=cu, activation=activation)

    def chunk_fn(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                 use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):  # fmt: skip
        return chunk_gated_delta_rule_varlen(
            query, key, value, g, beta, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
            initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, backend=getattr(module, _LINEAR_PLAN_ATTR),
        )  # fmt: skip

    swaps = {"causal_conv1d_fn": conv_fn, "torch_chunk_gated_delta_rule": chunk_fn}

    def packed_forward(*args, **kwargs):
        if kwargs.get("cu_seq_lens_q") is None:
            if config._attn_implementation == ATTN_NAME:
                raise ValueError(
                    f"{type(module).__name__} (layer {module.layer_idx}) got no cu_seq_lens_q in a packed "
                    "call; packed conversations would mix in its convolution and recurrent state"
                )
            return forward(*args, **kwargs)
        saved = {name: namespace[name] for name in swaps}
        namespace.update(swaps)
        try:
            return forward(*args, **kwargs)
        finally:
            namespace.update(saved)

    return packed_forward


def _refuse_unpackable(idx: int, module: torch.nn.Module) -> None:
    """Check, at start, that a layer's probed attention call (:func:`probe_attention`) can keep packed
    conversations apart. One its decoder layer hands ``position_ids`` but not ``cu_seq_lens_q/k``
    (Nemotron's calls ``self_attn`` without the decoder's keyword arguments) is marked to read the
    boundaries from the positions (:func:`_bounds_from_positions`). Refused in one line: one handed neither,
    and one that makes its own attention mask (Doge's dynamic mask, a learned bias per key), which varlen
    attention cannot apply."""
    probed = getattr(module, _PROBED_ATTR, None) or {}
    name = f"{type(module).__name__} (layer {idx})"
    if not probed.get("varlen", True) and not probed.get("positions"):
        raise ValueError(
            f"{name} is handed neither cu_seq_lens_q/k nor position_ids by its decoder layer, so packed "
            "conversations would attend to each other; not supported"
        )
    if not probed.get("varlen", True):
        setattr(module, _FROM_POSITIONS_ATTR, True)  # the boundaries are where position_ids restart at 0
    if probed.get("mask"):
        raise ValueError(
            f"{name} builds its own attention mask (given none), which packed varlen attention cannot apply; "
            "not supported"
        )


def decoder_hidden_states(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """The head's input ``[1, T, H]`` on a packed batch: the decoder's final (post-norm) hidden states,
    times the head's logit scale when the model has one (:func:`head_scale`); no logits.

    Works on PEFT-wrapped models (LoRA layers live inside the decoder's modules) and with gradient
    checkpointing (the varlen keyword arguments travel through each checkpointed layer).
    """
    base = _base_model(model)
    if base.config._attn_implementation != ATTN_NAME:
        raise ValueError(
            f"model attention is {base.config._attn_implementation!r}, not {ATTN_NAME!r}: packed "
            "conversations would attend to each other; call enable_varlen_attention(model) first"
        )
    out = decoder_of(base)(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        cu_seq_lens_q=batch.cu_seqlens,
        cu_seq_lens_k=batch.cu_seqlens,
        max_length_q=batch.max_seqlen,
        max_length_k=batch.max_seqlen,
        use_cache=False,
    )
    scale = head_scale(base)
    return out.last_hidden_state if scale == 1.0 else out.last_hidden_state * scale


# ------------------------------------------------------------------------------------ loading and LoRA

DEMO_MODEL_CONFIG = Path(__file__).parent / "assets" / "demo_model.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_model(cfg, device: str | None = None, *, tokenizer=None) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) for ``cfg.model``: ``demo`` builds a small random GLM-4 (transformers' ``glm4``)
    from ``assets/demo_model.json`` sized to the built-in tokenizer, seeded by ``cfg.seed``; anything
    else goes to ``AutoModelForCausalLM.from_pretrained``. Weights in ``cfg.dtype`` on ``device`` (default
    ``cfg.device``); with ``quantize: nf4`` the decoder's linear layers in NF4 (trainer/quantize.py: a
    model directory is quantised as it loads, the demo once built). ``tokenizer``: one already loaded for
    ``cfg`` (training reads its data first)."""
    from transformers import AutoModelForCausalLM, Glm4Config, Glm4ForCausalLM

    device = resolve_device(device or cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    nf4 = getattr(cfg, "quantize", "none") == "nf4"
    _check_model_path(cfg.model)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.model == "demo":
        spec = json.loads(DEMO_MODEL_CONFIG.read_text())
        spec["vocab_size"] = len(tokenizer)
        spec["pad_token_id"] = tokenizer.pad_token_id
        spec["eos_token_id"] = tokenizer.eos_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = Glm4ForCausalLM(Glm4Config(**spec))
        model.name_or_path = "demo"
        model = model.to(device=device, dtype=dtype)
        return load_nf4(cfg, device, tokenizer=tokenizer, model=model) if nf4 else (model, tokenizer)
    if nf4:
        return load_nf4(cfg, device, tokenizer=tokenizer)
    # use_kernels=False: transformers >= 5.25 (with Hugging Face's `kernels`) kernelizes by default, which
    # routes Gated DeltaNet's functions past the packed ones and fetches hub code at run time; the
    # packed path installs its own per layer
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_kernels=False
    )
    return model.to(device=device, dtype=dtype), tokenizer


def _check_model_path(name: str) -> None:
    """A missing local directory gets a clear error (not a hub lookup's "Repo id must be in the form")."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if name != "demo" and looks_local and not Path(name).expanduser().exists():
        raise ValueError("no such directory; give a Hugging Face model directory, a hub id, or demo")


@contextlib.contextmanager
def native_lora_targets():
    """PEFT rewrites the targets of some MoE models (Mixtral, Qwen2/3-MoE, GLM-4.5, ...) for adapters
    trained on transformers 4, where the experts were nn.Linear: a dense ``down_proj`` (or ``gate``)
    target then also adapts every expert's stacked weight (or the router). Targets here name modules
    and parameters of the model as it is, so that rewrite is switched off while an adapter is attached."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a PEFT without the rewrite
        yield
        return
    saved = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = saved


def expert_parameters(model: torch.nn.Module) -> list[str]:
    """PEFT ``target_parameters`` for the stacked expert weights of an MoE model (3-D parameters of a
    module named ``experts``, e.g. ``experts.gate_up_proj``, ``experts.down_proj``); [] for dense ones."""
    names = set()
    for name, p in _base_model(model).named_parameters():
        owner, _, leaf = name.rpartition(".")
        if p.ndim == 3 and owner.rsplit(".", 1)[-1] == "experts":
            names.add(f"experts.{leaf}")
    return sorted(names)


def _num_experts(config) -> int | None:
    for name in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def router_modules(model: torch.nn.Module) -> list[str]:
    """Names of the MoE routers that are ``nn.Linear``s: a class named ``...Router``/``...Gate`` built on
    nn.Linear (PhiMoE's returns a tuple), or a plain Linear named ``gate``/``router`` with one output per
    expert. LoRA on a router changes which experts each token reaches, and PEFT's wrapper expects a tensor
    back: ``all-linear`` leaves them out, and naming one is refused."""
    base = _base_model(model)
    experts = _num_experts(_text_config(base.config))
    found = []
    for name, m in base.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        cls, leaf = type(m).__name__, name.rsplit(".", 1)[-1]
        if ("Router" in cls or cls.endswith("Gate")) or (
            leaf in ("gate", "router") and experts is not None and m.out_features == experts
        ):
            found.append(name)
    return found


def non_tensor_linears(model: torch.nn.Module) -> dict[str, str]:
    """{name: what it returned} of the nn.Linear modules whose forward returned no tensor in the probe
    (:func:`probe_attention`); routers are the known case, this catches the next family's."""
    base = _base_model(model)
    return {n: getattr(m, _RETURNS_ATTR) for n, m in base.named_modules() if hasattr(m, _RETURNS_ATTR)}


def apply_lora(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """Freeze the model and wrap it with a PEFT LoRA adapter (adapter weights stay fp32 under bf16).

    ``all-linear`` adapts every nn.Linear but the lm_head: attention and dense MLP projections, an MoE
    model's shared experts; its routed experts are stacked parameters, adapted only with
    ``cfg.lora_target_experts`` (PEFT parameter targeting, which has no dropout: ``cfg.lora_dropout``
    then applies to the module targets only)."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    experts = expert_parameters(model) if cfg.lora_target_experts else []
    if cfg.lora_target_experts and not experts:
        raise ValueError(
            f"lora_target_experts: {type(_base_model(model)).__name__} has no stacked expert weights to adapt"
        )
    excluded = _never_adapted(model, targets)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0 if experts else cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        exclude_modules=excluded or None,
        target_parameters=experts or None,
        task_type="CAUSAL_LM",
    )
    try:
        with native_lora_targets():
            model = get_peft_model(model, lora)
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        raise ValueError(f"lora_target_modules {targets}: {' '.join(str(e).split())}") from None
    if type(model.get_base_model().get_output_embeddings()) is not torch.nn.Linear:
        raise ValueError(
            "lora_target_modules adapts the lm_head; the fused loss needs a plain frozen lm_head, "
            "so remove it from lora_target_modules"
        )
    if experts and cfg.lora_dropout:
        _module_dropout(model, cfg.lora_dropout)
    return model


def _never_adapted(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Modules LoRA must not wrap, left out of ``all-linear``: the MoE routers (:func:`router_modules`)
    and every nn.Linear whose forward returned no tensor in the probe (:func:`non_tensor_linears`).
    Naming one in ``targets`` is refused in one line."""
    routers = router_modules(model)
    named = sorted({r.rsplit(".", 1)[-1] for r in routers} & set(targets))
    if named:
        raise ValueError(
            f"lora_target_modules names {', '.join(named)}, the MoE router: routers never get LoRA (it would "
            "change which experts each token reaches); target the attention and expert projections instead"
        )
    returns = {n: r for n, r in non_tensor_linears(model).items() if n not in routers}
    for name, returned in returns.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets:
            raise ValueError(
                f"lora_target_modules names {leaf}, but {name} ({type(model.get_submodule(name)).__name__}) "
                f"returns a {returned}, not a tensor, so LoRA cannot wrap it; leave {leaf} out of the targets"
            )
    return [*routers, *returns]


def _module_dropout(model: torch.nn.Module, p: float) -> None:
    """Dropout ``p`` on the adapter input of every nn.Linear LoRA layer (the expert wrappers keep none)."""
    from peft.tuners.lora import Linear as LoraLinear

    for module in model.modules():
        if isinstance(module, LoraLinear):
            for name in module.lora_dropout:
                module.lora_dropout[name] = torch.nn.Dropout(p)


# ------------------------------------------------------------------------------------------------ the head


class HeadSpec(NamedTuple):
    """What the fused loss needs: logits = softcap(h @ weight.T + bias), h = decoder_hidden_states(...)."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V] or None
    softcap: float | None  # final logit softcap (Gemma 2/3) or None


# Config attributes that make logits something other than a scaled lm_head(h), softcapped: the fused loss
# cannot express them (MiniCPM's width scaling, ...).
_LOGIT_TRANSFORMS = ("scale_width", "output_multiplier_scale", "mup_width_scale")


def head_scale(model: torch.nn.Module) -> float:
    """The one multiply between lm_head and the logits, folded into the hidden states: Cohere's
    ``logit_scale`` (logits * s), Granite's ``logits_scaling`` (logits / s); 1.0 for other models."""
    config = _text_config(_base_model(model).config)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    return scale / float(getattr(config, "logits_scaling", None) or 1.0)


def lm_head_spec(model: torch.nn.Module, check: bool = True) -> HeadSpec:
    """(weight [V, H], bias [V] or None, softcap or None) such that the model's logits are
    ``softcap * tanh((h @ weight.T + bias) / softcap)`` of h, the final hidden states times
    :func:`head_scale` (what :func:`decoder_hidden_states` returns).

    Tied embeddings need nothing special (the head's weight is the embedding matrix). Gemma 2/3's
    ``final_logit_softcapping`` becomes ``softcap``. A head the loss kernel cannot express is refused
    with ``ValueError`` naming the config field; with ``check`` the formula is also verified against the
    model's own logits on a few tokens, so an unknown transformation of the logits is caught.
    """
    base = _base_model(model)
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"lm_head is a {type(head).__name__}, not a plain nn.Linear; the fused loss cannot express it"
        )
    config = _text_config(base.config)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"{config.model_type}: config.{name}={value} rescales the logits, which the fused loss "
                "does not express; this model is not supported"
            )
    if head_scale(base) != 1.0 and head.bias is not None:
        raise ValueError(f"{config.model_type}: a logit scale with an lm_head bias is not supported")
    softcap = getattr(config, "final_logit_softcapping", None) or None
    spec = HeadSpec(head.weight, head.bias, float(softcap) if softcap else None)
    if check and head.weight.device.type != "meta":  # a skeleton: checked on the real weights
        _check_lm_head(base, *spec)
    return spec


@torch.no_grad()
def _check_lm_head(base, weight, bias, softcap) -> None:
    """Compare softcap(scale * h @ W.T + b) with the model's logits on 8 tokens, default attention."""
    if base.config._attn_implementation == ATTN_NAME:
        raise ValueError("call lm_head_spec(model) before enable_varlen_attention(model)")
    was_training = base.training
    base.eval()
    generator = torch.Generator().manual_seed(0)
    vocab = min(weight.shape[0], base.get_input_embeddings().weight.shape[0])  # Inkling 2: head rows > tokens
    ids = torch.randint(0, vocab, (1, 8), generator=generator).to(weight.device)
    hidden = decoder_of(base)(input_ids=ids, use_cache=False).last_hidden_state * head_scale(base)
    if hidden.shape[-1] != weight.shape[1]:  # ELECTRA, RemBERT: a projection between decoder and head
        base.train(was_training)
        raise ValueError(
            f"{base.config.model_type}: the model's logits are not lm_head(final hidden states): lm_head "
            f"takes {weight.shape[1]} features, the decoder's final hidden states have {hidden.shape[-1]}; "
            "the fused loss cannot express this head, so this model is not supported"
        )
    theirs = base(input_ids=ids, use_cache=False).logits.float()
    mine = torch.nn.functional.linear(hidden, weight, bias).float()
    if softcap is not None:
        mine = softcap * torch.tanh(mine / softcap)
    base.train(was_training)
    err = ((mine - theirs).abs().max() / theirs.abs().max().clamp_min(1e-6)).item()
    if not err <= 2e-2:  # bf16 rounding is ~4e-3; any real rescaling is far larger
        raise ValueError(
            f"{base.config.model_type}: the model's logits are not lm_head(final hidden states)"
            f"{' softcapped' if softcap else ''} (max relative difference {err:.3g}); the fused loss "
            "cannot express this head, so this model is not supported"
        )


# ----------------------------------------------------------------------------------------- one setup

# Attention config fields the packed path cannot express, with why: refused at start, never dropped.
_UNSUPPORTED_ATTENTION = {
    "attention_chunk_size": "chunked local attention",
    "use_alibi": "ALiBi position biases",
    "alibi": "ALiBi position biases",
}


def check_attention_supported(model: torch.nn.Module, *, for_training: bool = True) -> None:
    """Refuse, in one line naming the config field, an attention the packed path cannot run exactly."""
    config = _text_config(_base_model(model).config)
    for name, what in _UNSUPPORTED_ATTENTION.items():
        if getattr(config, name, None):
            raise ValueError(
                f"{config.model_type}: config.{name}={getattr(config, name)} ({what}) is not supported "
                "by packed varlen attention"
            )


def _say(line: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, flush=True)


def prepare_model(
    cfg, *, device=None, for_training=True, model=None, tokenizer=None, log=_say, plan_device=None
):
    """(model, tokenizer, head): the one model setup of training, ``check``, ``generate`` and benchmarks.

    Loads ``cfg.model`` (or takes ``model``, already built, then tokenizer is ``cfg.tokenizer``'s or None)
    in ``cfg.dtype`` on ``device`` (default ``cfg.device``), with ``tokenizer`` when one is already loaded
    for ``cfg``; refuses an attention or a head the project cannot express exactly, and reads the head
    spec (:func:`lm_head_spec`, checked against the model's own logits). ``for_training``: install packed
    varlen attention layer by layer (the backend chosen for each is passed to ``log`` once), gradient
    checkpointing when ``cfg.gradient_checkpointing``, and the LoRA adapter (:func:`apply_lora`).
    Otherwise the model keeps its own attention, in eval mode, with no adapter (``generate`` loads one)."""
    if model is None:
        model, tokenizer = load_model(cfg, device, tokenizer=tokenizer)  # quantised when cfg says nf4
    else:
        target = resolve_device(device or cfg.device)
        model = model.to(device=target, dtype=resolve_dtype(cfg.dtype, target))
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    check_attention_supported(model, for_training=for_training)
    head = lm_head_spec(model)
    if not for_training:
        return model.eval(), tokenizer, head
    backend = None if cfg.attn_backend == "auto" else cfg.attn_backend
    enable_varlen_attention(model, backend, log=log, dropout=cfg.attn_dropout, device=plan_device)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)
    model = apply_lora(model, cfg)
    model.train()
    return model, tokenizer, head


def enable_activation_checkpointing(model, use_reentrant: bool = False) -> None:
    """Checkpoint each decoder layer's activations: transformers >= 5.21 names it
    ``activation_checkpointing_enable`` (the old ``gradient_checkpointing_enable`` warns and goes in v6);
    older releases only have the old name."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
