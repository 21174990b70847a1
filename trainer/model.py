"""Hugging Face causal LMs on packed batches: varlen attention and the decoder's final hidden states.

The attention part (this first section) registers :func:`kernels.varlen_attention` with
``transformers.AttentionInterface`` and calls the decoder the padding-free way: ``position_ids``,
``cu_seq_lens_q/k``, ``max_length_q/k``, ``use_cache=False`` and no ``attention_mask``. On
transformers 5.x, leaving ``use_cache`` at its default or passing an all-ones 2D mask makes packed
conversations silently attend to each other; passing cu_seqlens explicitly also saves a GPU->CPU sync
per layer. The name is not registered as a mask function, so transformers builds no [T, T] mask.
"""

from __future__ import annotations

import json
from pathlib import Path

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


# ------------------------------------------------------------------------------------ loading and LoRA
# (trainer/train.py's part: the model, its dtype and device, the LoRA adapter and the lm_head spec)

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


def load_model(cfg) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) for ``cfg.model``: ``demo`` builds a small random GLM-4 (transformers' ``glm4``)
    from ``assets/demo_model.json`` sized to the built-in tokenizer, seeded by ``cfg.seed``; anything
    else goes to ``AutoModelForCausalLM.from_pretrained``. Weights in ``cfg.dtype`` on ``cfg.device``."""
    from transformers import AutoModelForCausalLM, Glm4Config, Glm4ForCausalLM

    from trainer.data import load_tokenizer

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    _check_model_path(cfg.model)
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
    else:
        remote = cfg.trust_remote_code
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, trust_remote_code=remote)
    return model.to(device=device, dtype=dtype), tokenizer


def _check_model_path(name: str) -> None:
    """A missing local directory gets a clear error (not a hub lookup's "Repo id must be in the form")."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if name != "demo" and looks_local and not Path(name).expanduser().exists():
        raise ValueError("no such directory; give a Hugging Face model directory, a hub id, or demo")


def apply_lora(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """Freeze the model and wrap it with a PEFT LoRA adapter (adapter weights stay fp32 under bf16)."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        raise ValueError(f"lora_target_modules {targets}: {' '.join(str(e).split())}") from None
    if type(model.get_base_model().get_output_embeddings()) is not torch.nn.Linear:
        raise ValueError(
            "lora_target_modules adapts the lm_head; the fused loss needs a plain frozen lm_head, "
            "so remove it from lora_target_modules"
        )
    return model


# Config attributes that make logits something other than lm_head(h) (softcapped): the fused loss cannot
# express them (Cohere's logit_scale, Granite's logits_scaling, MiniCPM's width scaling, ...).
_LOGIT_SCALERS = (
    "logit_scale",
    "logits_scaling",
    "scale_width",
    "output_multiplier_scale",
    "mup_width_scale",
)


def lm_head_spec(
    model: torch.nn.Module, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """(weight [V, H], bias [V] or None, softcap or None) such that the model's logits are
    ``softcap * tanh((h @ weight.T + bias) / softcap)`` of the final hidden states h.

    Tied embeddings need nothing special (the head's weight is the embedding matrix). Gemma 2/3's
    ``final_logit_softcapping`` becomes ``softcap``. A head the loss kernel cannot express is refused
    with ``ValueError``; with ``check`` the formula is also verified against the model's own logits on
    a few tokens, so an unknown transformation of the logits is caught rather than trained on.
    """
    base = _base_model(model)
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"lm_head is a {type(head).__name__}, not a plain nn.Linear; the fused loss cannot express it"
        )
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    for name in _LOGIT_SCALERS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"{config.model_type}: config.{name}={value} rescales the logits, which the fused loss "
                "does not express; this model is not supported"
            )
    softcap = getattr(config, "final_logit_softcapping", None) or None
    spec = (head.weight, head.bias, float(softcap) if softcap else None)
    if check:
        _check_lm_head(base, *spec)
    return spec


@torch.no_grad()
def _check_lm_head(base, weight, bias, softcap) -> None:
    """Compare softcap(h @ W.T + b) with the model's logits on 8 tokens, default attention, eval mode."""
    if base.config._attn_implementation == ATTN_NAME:
        raise ValueError("call lm_head_spec(model) before enable_varlen_attention(model)")
    was_training = base.training
    base.eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, weight.shape[0], (1, 8), generator=generator).to(weight.device)
    hidden = base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
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
