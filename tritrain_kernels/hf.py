"""One call to make a Hugging Face causal LM compute its loss with the fused masked cross-entropy.

    from tritrain_kernels.hf import use_masked_ce
    model = AutoModelForCausalLM.from_pretrained(name)      # or a PEFT model wrapping one
    use_masked_ce(model)                                     # patches this model instance only
    Trainer(model=model, args=args, train_dataset=data).train()

    trainer = SFTTrainer(model=model, args=args, train_dataset=data)    # TRL: patch after building it,
    use_masked_ce(trainer.model)                                        # over the fused head TRL adds
    trainer.train()

Afterwards ``model(input_ids, labels=labels, ...)`` runs the decoder, then
``masked_linear_cross_entropy`` on its final hidden states and the model's own ``lm_head`` weight: the
``[batch, seq, vocab]`` logits tensor is never made, and positions labelled ``ignore_index`` cost nothing.
The loss is the one transformers computes (``ForCausalLMLoss``): labels shifted left by one inside (or
``shift_labels`` taken as given), mean over the labelled positions, or their sum divided by
``num_items_in_batch`` when the Trainer passes it (gradient accumulation). Two differences, both by
design: the output's ``logits`` is None whenever ``labels`` is given (call without labels, as
``generate`` does, to get logits: that path is unchanged), and a batch with no labelled position has loss
0 with zero gradients instead of NaN.

TRL 1.x: ``SFTTrainer.__init__`` replaces the model's forward with its own fused LM head
(``trl.trainer.utils.add_fused_lm_head``) and computes the loss from ``model(..., fused_lm_head=True)``,
which would bypass a forward patched before it. So call ``use_masked_ce(trainer.model)`` after building
the trainer: the patch then sits over TRL's head and answers ``fused_lm_head=True`` itself, with what
SFTTrainer reads: per-token ``log_probs`` (the loss, with gradient) and ``label_mask``, and ``is_top1`` as
the count of labelled positions whose argmax is the label (a 0-d tensor: SFTTrainer only sums it, for
``mean_token_accuracy``). The kernel does not compute the entropy, so SFTTrainer's ``entropy`` metric
logs NaN (one warning at patch time). Patched the other way round, the first forward raises RuntimeError.
A fused head asked for more than that (DPO, KTO, GRPO, RLOO: per-token entropy, mean logits, a
temperature) is refused with ValueError at patch time. TRL 0.x's SFTTrainer computes its metrics from
``outputs.logits`` and fails on the missing logits. MoE models asked for their router load-balancing
loss (``output_router_logits``) are refused: the patch does not add it.

The head is read from the model itself, so one call serves every family: tied embeddings need nothing,
Gemma 2/3's ``final_logit_softcapping`` becomes the kernel's softcap. A head the kernel cannot express (a
non-Linear lm_head, a config that rescales the logits, anything else found by comparing with the model's
own logits on a few tokens) is refused with ValueError rather than trained on wrongly. The head weight is
read at every call, whole: sharding it (ZeRO-3, FSDP) is not supported.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref

import torch

from tritrain_kernels.masked_ce import masked_linear_cross_entropy

# Config attributes by which some families rescale the logits after lm_head (Cohere, Granite, MiniCPM, ...).
LOGIT_SCALERS = ("logit_scale", "logits_scaling", "scale_width", "output_multiplier_scale", "mup_width_scale")
# Keyword arguments of the loss only; the decoder does not need them.
LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
# What TRL's SFTTrainer asks of its fused LM head (add_fused_lm_head's `outputs`, TRL 1.16), all the patch serves.
SFT_FUSED_OUTPUTS = frozenset({"log_probs", "entropy", "is_top1"})
# The forwards use_masked_ce installed (by identity: wrappers copy a function's __dict__, so no attribute marker).
_PATCHES: weakref.WeakSet = weakref.WeakSet()


def use_masked_ce(model: torch.nn.Module, *, check: bool = True) -> torch.nn.Module:
    """Patch ``model`` (a ``*ForCausalLM``, or a PEFT model around one) in place so that its loss is the
    fused masked CE; returns the model. ``check``: compare the head formula with the model's own logits on
    8 tokens first (one small forward). Calling it twice is harmless. Under TRL, call it on
    ``trainer.model`` after building the trainer (see the module docstring)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    below = _loss_forward(causal.forward)
    if below in _PATCHES:
        return model  # already patched, and nothing computes a loss over the patch
    _head(causal)  # refuse what the kernel cannot express, now rather than at the first step
    _refuse_router_loss(causal, {})
    trl_head = below is not None and _check_trl_head(below)
    if check:
        causal._masked_ce_patching = True  # the guard below would take TRL's head over an earlier patch
        try:
            _check_head(causal)
        finally:
            causal._masked_ce_patching = False
    original = causal.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        arguments = _named(signature, args, kwargs)
        if arguments.pop("fused_lm_head", False):
            if not trl_head:
                raise ValueError(
                    "fused_lm_head=True, but use_masked_ce found no TRL fused LM head on this model when it "
                    "patched it; call use_masked_ce(trainer.model) after building the TRL trainer"
                )
            return _forward_fused(causal, arguments)
        if arguments.get("labels") is None:
            return original(*args, **kwargs)
        return _forward_with_loss(causal, arguments)

    _PATCHES.add(forward)
    causal.forward = forward
    if getattr(causal, "_masked_ce_guard", None) is None:
        causal._masked_ce_guard = decoder_of(causal).register_forward_pre_hook(
            _guard(causal), with_kwargs=True
        )
    if trl_head:
        warnings.warn(
            "use_masked_ce: under TRL's SFTTrainer the fused masked loss gives the loss and mean_token_accuracy "
            "but not the entropy metric, which logs as nan",
            stacklevel=2,
        )
    return model


def _loss_forward(forward):
    """Down the chain of wrappers around ``forward`` (``__wrapped__``: accelerate's autocast, ours), the first
    that computes a loss itself: a fused LM head (it takes ``fused_lm_head``, as TRL's does), a forward this
    module installed, or None when neither is found."""
    for _ in range(16):
        function = getattr(forward, "__func__", forward)
        if function is None:
            return None
        try:
            if "fused_lm_head" in inspect.signature(function, follow_wrapped=False).parameters:
                return function
        except (TypeError, ValueError):  # no signature to read
            return None
        if function in _PATCHES:
            return function
        forward = getattr(function, "__wrapped__", None)
    return None


def _check_trl_head(function) -> bool:
    """True if ``function`` is a fused LM head configured as TRL's SFTTrainer configures it; else ValueError."""
    settings = inspect.getclosurevars(function).nonlocals if inspect.isfunction(function) else {}
    outputs, temperature = settings.get("outputs"), settings.get("temperature")
    if outputs is None or temperature is None:
        raise ValueError(
            f"this model's forward ({function!r}) takes fused_lm_head but is not TRL 1.x's add_fused_lm_head "
            "as known (it has no `outputs` and `temperature` settings); use_masked_ce cannot stand in for it"
        )
    if set(outputs) != SFT_FUSED_OUTPUTS or temperature != 1.0:
        raise ValueError(
            f"TRL's fused LM head here computes {tuple(outputs)} at temperature {temperature}; use_masked_ce "
            f"stands in only for SFTTrainer's ({', '.join(sorted(SFT_FUSED_OUTPUTS))} at temperature 1): "
            "DPO, KTO, GRPO and RLOO need per-token entropy, mean logits or a temperature"
        )
    return True


def _guard(causal):
    """Forward pre-hook on the decoder: refuse to run under a fused LM head added over the patch (TRL's trainers
    add one in ``__init__``), whose own loss would silently replace the fused masked one."""

    def check(decoder, args, kwargs):
        state = causal.__dict__
        forward = state.get("forward")
        if state.get("_masked_ce_patching") or forward is state.get("_masked_ce_verified"):
            return
        owner = _loss_forward(forward)
        if owner is not None and owner not in _PATCHES:
            raise RuntimeError(
                "a fused LM head (TRL's trainers add one in __init__) was put over the forward use_masked_ce "
                "patched, so its loss would run instead of the fused masked one: call "
                "use_masked_ce(trainer.model) after building the trainer"
            )
        causal._masked_ce_verified = forward

    return check


def _refuse_router_loss(causal, arguments: dict) -> None:
    config = causal.config.get_text_config() if hasattr(causal.config, "get_text_config") else causal.config
    if arguments.get("output_router_logits", getattr(config, "output_router_logits", False)):
        raise ValueError(
            f"{config.model_type}: output_router_logits asks for the MoE load-balancing loss, which use_masked_ce "
            "does not add; set config.output_router_logits = False (or leave the model unpatched)"
        )


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


def decoder_of(causal, needs: str = "use_masked_ce needs the final hidden states") -> torch.nn.Module:
    """The module that maps ``input_ids`` to the final hidden states: ``get_decoder()``, unless that is not
    one (ModernBERT-decoder's ``self.decoder`` is its vocabulary projection), then the base model.
    ValueError, in one line ending with ``needs``, when neither takes ``input_ids``."""
    candidates = [causal.get_decoder() if hasattr(causal, "get_decoder") else None]
    candidates.append(getattr(causal, causal.base_model_prefix, None))
    for module in candidates:
        if module is not None and module is not causal and _takes_input_ids(module):
            return module
    raise ValueError(
        f"{type(causal).__name__}: found no decoder module that takes input_ids (get_decoder() is a "
        f"{type(candidates[0]).__name__}); {needs}"
    )


def _takes_input_ids(module: torch.nn.Module) -> bool:
    try:
        return "input_ids" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


@torch.no_grad()
def _check_head(causal) -> None:
    """softcap(h @ W.T + b) of the decoder's hidden states against the model's own logits on 8 tokens."""
    weight, bias, softcap = _head(causal)
    was_training = causal.training
    causal.eval()
    embeddings = causal.get_input_embeddings().weight
    try:
        vocab = min(weight.shape[0], embeddings.shape[0])  # Inkling 2: more head rows than input tokens
        ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
        hidden = decoder_of(causal)(input_ids=ids.to(embeddings.device), use_cache=False).last_hidden_state
        if hidden.shape[-1] != weight.shape[1]:  # ELECTRA, RemBERT: a projection between decoder and head
            raise ValueError(
                f"{causal.config.model_type}: the logits are not lm_head(final hidden states): lm_head takes "
                f"{weight.shape[1]} features, the decoder's final hidden states have {hidden.shape[-1]}; the "
                "fused loss cannot express this head"
            )
        theirs = causal(input_ids=ids.to(embeddings.device), use_cache=False).logits.float()
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

    _refuse_router_loss(causal, arguments)
    labels = arguments.pop("labels")
    loss_kwargs = {k: arguments.pop(k) for k in LOSS_KWARGS if k in arguments}
    arguments.pop("logits_to_keep", None)  # the loss needs every position
    return_dict = arguments.pop("return_dict", None)
    outputs = decoder_of(causal)(**arguments)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    loss = causal_lm_loss(hidden, labels, *_head(causal), **loss_kwargs)
    fields = CausalLMOutputWithPast.__dataclass_fields__
    cache = "cache" if "cache" in fields else "past_key_values"  # renamed in transformers 5.2x
    result = CausalLMOutputWithPast(
        loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None), **{cache: getattr(outputs, cache, None)},
    )  # fmt: skip
    return result.to_tuple() if return_dict is False else result


def _forward_fused(causal, arguments: dict):
    """TRL's ``model(..., labels=labels, fused_lm_head=True)`` as SFTTrainer reads it (TRL 1.16's
    ``FusedCausalLMOutput``): ``log_probs`` ``[B, T - 1]`` (``[B, T]`` with ``shift_labels``), 0 where the label
    is -100, and the mean NLL ``loss``, both by the fused masked CE; ``label_mask``; ``is_top1`` as a 0-d count;
    ``entropy`` NaN, not computed."""
    from trl.trainer.utils import FusedCausalLMOutput

    _refuse_router_loss(causal, arguments)
    labels, shift_labels = arguments.pop("labels"), arguments.pop("shift_labels", None)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    for name in ("logits_to_keep", "return_dict", "ignore_index"):
        arguments.pop(name, None)
    arguments["use_cache"] = False
    outputs = decoder_of(causal)(**arguments)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    weight, bias, softcap = _head(causal)
    shifted = shift_labels is None
    if shifted:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    shift_labels = shift_labels.to(weight.device)
    correct = torch.zeros((), dtype=torch.long, device=weight.device)
    nll = masked_linear_cross_entropy(
        hidden.to(weight.device, weight.dtype), weight, shift_labels,
        bias=bias, reduction="none", softcap=softcap, correct=correct,
    )  # fmt: skip
    mask = shift_labels != -100
    if shifted:  # TRL scores positions 0 .. T-2; the last one has no next label
        nll, mask = nll[..., :-1], mask[..., :-1]
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(count):
        count = count.to(nll.device)
    return FusedCausalLMOutput(
        loss=nll.sum() / count, log_probs=-nll, entropy=nll.new_full((), float("nan")).expand(nll.shape),
        is_top1=correct, label_mask=mask,
    )  # fmt: skip


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
