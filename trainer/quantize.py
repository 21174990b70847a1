"""QLoRA: the frozen base weights in 4-bit NF4 through bitsandbytes, computed in bf16.

``quantize: nf4`` stores every linear layer of the decoder as ``bitsandbytes.nn.Linear4bit`` (NF4 with
bf16 compute, about 0.5 byte per weight plus a scale per 64); LoRA adapts those layers as usual (PEFT
knows them) and stays fp32. The lm_head is left as it is, so the fused loss reads a plain weight and
packing is unchanged. A model directory is quantised as it loads (``from_pretrained`` with a
``BitsAndBytesConfig``), never held whole in bf16; the demo model is quantised after it is built.
Quantisation is a step of :func:`trainer.model.load_model`, which passes in what it has loaded: this
module reads nothing else of the trainer.
"""

from __future__ import annotations

import torch

COMPUTE_DTYPE = torch.bfloat16


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError("quantize: nf4 needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes


def nf4_config(skip: list[str]):
    """Quantisation settings for ``from_pretrained``: NF4, bf16 compute, the modules ``skip`` names kept."""
    from transformers import BitsAndBytesConfig

    _bitsandbytes()
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=COMPUTE_DTYPE,
        llm_int8_skip_modules=skip,
    )  # fmt: skip


def load_nf4(cfg, device: torch.device, *, tokenizer, model: torch.nn.Module | None = None):
    """(model, tokenizer) with the decoder's linear layers in NF4 on ``device``: the quantisation step of
    :func:`trainer.model.load_model`, which hands over what it has. ``model``: one already built (the
    demo), quantised in place; None: ``cfg.model`` loaded from its directory, quantised as it loads.
    ``tokenizer``: the one loaded for ``cfg``, returned with the model as ``load_model`` returns them."""
    if model is not None:
        return quantize_nf4(model), tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        cfg.model, dtype=COMPUTE_DTYPE, quantization_config=nf4_config(["lm_head"]), device_map={"": device},
        trust_remote_code=cfg.trust_remote_code,  # as load_model: a model that ships its own code needs it
        use_kernels=False,  # as load_model
    )  # fmt: skip
    return _no_cpu_repacking(model), tokenizer


def _no_cpu_repacking(model):
    """On CPUs with AVX512-bf16, bitsandbytes repacks a 4-bit weight in place the first time it runs
    without gradients (evaluation), for a kernel that needs out_features % 32 == 0; training the same
    layer afterwards must see the weight as it was, so keep the one format."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@torch.no_grad()
def quantize_nf4(model: torch.nn.Module) -> torch.nn.Module:
    """Replace each ``nn.Linear`` of the decoder by an NF4 ``Linear4bit`` of the same weights, in place."""
    bnb = _bitsandbytes()
    decoder = model.get_decoder()
    for name, module in list(decoder.named_modules()):
        if type(module) is not torch.nn.Linear:
            continue
        device = module.weight.device
        quantized = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None,
            compute_dtype=COMPUTE_DTYPE, quant_type="nf4", device="meta",
        )  # fmt: skip
        quantized.weight = bnb.nn.Params4bit(module.weight.data.to(COMPUTE_DTYPE), requires_grad=False,
                                             quant_type="nf4")  # fmt: skip
        if module.bias is not None:
            quantized.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
        quantized = quantized.to(device)  # bitsandbytes quantises on the move to the device
        parent, _, child = name.rpartition(".")
        setattr(decoder.get_submodule(parent) if parent else decoder, child, quantized)
    model.is_loaded_in_4bit = True  # as from_pretrained marks it: PEFT then wraps the 4-bit layers as such
    return _no_cpu_repacking(model)
