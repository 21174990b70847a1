"""One call to make a Hugging Face causal LM compute its loss with the fused masked cross-entropy.

    from tritrain_kernels.hf import use_masked_ce
    model = AutoModelForCausalLM.from_pretrained(name)      # or a PEFT model wrapping one
    use_masked_ce(model)                                     # patches this model instance only
    Trainer(model=model, args=args, train_dataset=data).train()    # or TRL's SFTTrainer

Afterwards ``model(input_ids, labels=labels, ...)`` runs the decoder, then
``masked_linear_cross_entropy`` on its final hidden states and the model's own ``lm_head`` weight: the
``[batch, seq, vocab]`` logits tensor is never made, and positions labelled ``ignore_index`` cost nothing.
The loss is the one transformers computes (``ForCausalLMLoss``): labels shifted left by one inside (or
``shift_labels`` taken as given), mean over the labelled positions, or their sum divided by
``num_items_in_batch`` when the Trainer passes it (gradient accumulation). Two differences, both by
design: the output's ``logits`` is None whenever ``labels`` is given (call without labels, as
``generate`` does, to get logits: that path is unchanged), and a batch with no labelled position has loss
0 with zero gradients instead of NaN.

TRL: SFTTrainer versions that compute their token-accuracy and entropy metrics from ``outputs.logits``
(TRL 0.x) fail on the missing logits; TRL versions with their own fused LM head (1.x) work, and so does
transformers' Trainer.

The head is read from the model itself, so one call serves every family: tied embeddings need nothing,
Gemma 2/3's ``final_logit_softcapping`` becomes the kernel's softcap. A head the kernel cannot express (a
non-Linear lm_head, a config that rescales the logits, anything else found by comparing with the model's
own logits on a few tokens) is refused with ValueError rather than trained on wrongly. The head weight is
read at every call, whole: sharding it (ZeRO-3, FSDP) is not supported.
"""

from __future__ import annotations

import functools
import inspect

import torch

from tritrain_kernels.masked_ce import masked_linear_cross_entropy

# Config attributes by which some families rescale the logits after lm_head (Cohere, Granite, MiniCPM, ...).
LOGIT_SCALERS = ("logit_scale", "logits_scaling", "scale_width", "output_multiplier_scale", "mup_width_scale")
# Keyword arguments of the loss only; the decoder does not need them.
LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


def use_masked_ce(model: torch.nn.Module, *, check: bool = True) -> torch.nn.Module:
    """Patch ``model`` (a ``*ForCausalLM``, or a PEFT model around one) in place so that its loss is the
    fused masked CE; returns the model. ``check``: compare the head formula with the model's own logits on
    8 tokens first (one small forward). Calling it twice is harmless."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(causal, "_masked_ce_original_forward", None) is not None:
        return model
    _head(causal)  # refuse what the kernel cannot express, now rather than at the first step
    if check:
        _check_head(causal)
    original = causal.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        arguments = _named(signature, args, kwargs)
        if arguments.get("labels") is None:
            return original(*args, **kwargs)
        return _forward_with_loss(causal, arguments)

    causal._masked_ce_original_forward = original
    causal.forward = forward
    return model


def _named(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """Every argument by name, the ``**kwargs`` ones included."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    extra = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    if extra is not None:
        bound.update(bound.pop(extra, {}))
    return dict(bound)


def _head(causal) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """(weight [V, H], bias [V] or None, softcap or None), read from the model at call time."""
    head = causal.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"lm_head is a {type(head).__name__}, not nn.Linear; the fused loss cannot express it"
        )
    config = causal.config.get_text_config() if hasattr(causal.config, "get_text_config") else causal.config
    for name in LOGIT_SCALERS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{config.model_type}: config.{name}={value} rescales the logits; not supported")
    softcap = getattr(config, "final_logit_softcapping", None) or None
    return head.weight, head.bias, float(softcap) if softcap else None


def _decoder(causal) -> torch.nn.Module:
    if hasattr(causal, "get_decoder"):
        return causal.get_decoder()
    return getattr(causal, causal.base_model_prefix)


@torch.no_grad()
def _check_head(causal) -> None:
    """softcap(h @ W.T + b) of the decoder's hidden states against the model's own logits on 8 tokens."""
    weight, bias, softcap = _head(causal)
    was_training = causal.training
    causal.eval()
    try:
        ids = torch.randint(0, weight.shape[0], (1, 8), generator=torch.Generator().manual_seed(0))
        ids = ids.to(causal.get_input_embeddings().weight.device)
        hidden = _decoder(causal)(input_ids=ids, use_cache=False).last_hidden_state
        theirs = causal(input_ids=ids, use_cache=False).logits.float()
    finally:
        causal.train(was_training)
    mine = torch.nn.functional.linear(hidden.to(weight.device), weight, bias).float().to(theirs.device)
    if softcap is not None:
        mine = softcap * torch.tanh(mine / softcap)
    err = ((mine - theirs).abs().max() / theirs.abs().max().clamp_min(1e-6)).item()
    if not err <= 2e-2:  # bf16 rounding is ~4e-3; a real rescaling is far larger
        raise ValueError(
            f"{causal.config.model_type}: the logits are not lm_head(final hidden states) (max relative "
            f"difference {err:.3g}); the fused loss cannot express this head"
        )


def _forward_with_loss(causal, arguments: dict):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = arguments.pop("labels")
    loss_kwargs = {k: arguments.pop(k) for k in LOSS_KWARGS if k in arguments}
    arguments.pop("logits_to_keep", None)  # the loss needs every position
    return_dict = arguments.pop("return_dict", None)
    outputs = _decoder(causal)(**arguments)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    loss = causal_lm_loss(hidden, labels, *_head(causal), **loss_kwargs)
    fields = CausalLMOutputWithPast.__dataclass_fields__
    cache = "cache" if "cache" in fields else "past_key_values"  # renamed in transformers 5.2x
    result = CausalLMOutputWithPast(
        loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None), **{cache: getattr(outputs, cache, None)},
    )  # fmt: skip
    return result.to_tuple() if return_dict is False else result


def causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` from hidden states ``[B, T, H]`` and labels ``[B, T]``: position t
    predicts label t + 1 (or ``shift_labels[t]``); the mean over labelled positions, or their sum divided by
    ``num_items_in_batch``."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    # the head's dtype and device: bf16 activations under autocast with an fp32 head, a model split over GPUs
    hidden = hidden.to(weight.device, weight.dtype)
    shift_labels = shift_labels.to(weight.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = masked_linear_cross_entropy(
        hidden,
        weight,
        shift_labels,
        bias=bias,
        ignore_index=ignore_index,
        reduction=reduction,
        softcap=softcap,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
