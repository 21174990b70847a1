"""tritrain_kernels.hf.use_masked_ce: the same loss and gradients as an unpatched Hugging Face causal LM, less
memory, and the same training under transformers' Trainer (and TRL's SFTTrainer when installed)."""

import copy
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from tritrain_kernels.hf import use_masked_ce  # noqa: E402

V = 301  # not a multiple of any block size


def _tiny(kind: str, vocab: int = V):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common, tie_word_embeddings=False),
        "qwen2-tied": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True),
        "gemma2-softcap": lambda: transformers.Gemma2Config(
            **common, head_dim=8, final_logit_softcapping=2.0
        ),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[kind](), attn_implementation="eager")
    return model.float()


def _batch(B=3, T=17, masked=0.6, seed=1, vocab=V):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[torch.rand(B, T, generator=g) < masked] = -100
    return ids, labels


def _loss_and_grads(model, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(ours, theirs, rtol=2e-5):
    (out_a, grads_a), (out_b, grads_b) = ours, theirs
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=rtol, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        scale = grads_b[name].abs().max().clamp_min(1e-8)
        assert (grads_a[name] - grads_b[name]).abs().max() / scale < 1e-4, name


@pytest.mark.parametrize("kind", ["llama", "qwen2-tied", "gemma2-softcap"])
@pytest.mark.parametrize("loss_kwargs", [{}, {"num_items_in_batch": 7}], ids=["mean", "num_items"])
def test_same_loss_and_gradients_as_unpatched(kind, loss_kwargs):
    plain = _tiny(kind)
    patched = use_masked_ce(copy.deepcopy(plain))
    ids, labels = _batch()
    kwargs = dict(input_ids=ids, labels=labels, **loss_kwargs)
    ours, theirs = _loss_and_grads(patched, **kwargs), _loss_and_grads(plain, **kwargs)
    _assert_same(ours, theirs)
    assert ours[0].logits is None  # documented: no logits when the loss is asked for
    torch.testing.assert_close(patched(input_ids=ids).logits, plain(input_ids=ids).logits)  # unchanged


def test_positional_arguments_shift_labels_and_attention_mask():
    plain = _tiny("llama")
    patched = use_masked_ce(copy.deepcopy(plain))
    ids, labels = _batch(masked=0.3)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    for kwargs in ({"attention_mask": mask, "labels": labels}, {"labels": labels, "shift_labels": shift}):
        ours = patched(ids, **kwargs).loss
        torch.testing.assert_close(ours, plain(ids, **kwargs).loss, rtol=2e-5, atol=1e-6)


def test_peft_model_is_patched_through_its_wrapper():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    plain = peft.get_peft_model(_tiny("llama"), config)
    patched = use_masked_ce(copy.deepcopy(plain))
    ids, labels = _batch()
    _assert_same(_loss_and_grads(patched, input_ids=ids, labels=labels),
                 _loss_and_grads(plain, input_ids=ids, labels=labels))  # fmt: skip


def test_heads_it_cannot_express_are_refused():
    model = _tiny("llama")
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale=0.5 rescales the logits"):
        use_masked_ce(model)
    model = _tiny("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="lm_head is a Sequential"):
        use_masked_ce(model)
    model = _tiny("llama")
    real = model.forward
    model.forward = lambda *a, **k: (lambda out: setattr(out, "logits", out.logits * 3) or out)(real(*a, **k))
    with pytest.raises(ValueError, match="the logits are not lm_head"):
        use_masked_ce(model)


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created by aten ops and still alive (views share their base's)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.sizes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.sizes:
                    self.sizes[key] = size
                    self.live += size
                    self.peak, self.largest = max(self.peak, self.live), max(self.largest, size)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.live -= self.sizes.pop(key)


def _peak(model, ids, labels):
    with _LiveBytes() as mode:
        model(input_ids=ids, labels=labels).loss.backward()
    return mode


def test_lower_peak_memory_and_no_logits_tensor():
    vocab = 4099
    plain = _tiny("qwen2-tied", vocab)
    patched = use_masked_ce(copy.deepcopy(plain))
    ids, labels = _batch(B=4, T=64, masked=0.7, vocab=vocab)
    theirs, ours = _peak(plain, ids, labels), _peak(patched, ids, labels)
    logits_bytes = ids.numel() * vocab * 4
    assert theirs.largest >= logits_bytes  # the unpatched model makes [B, T, V] logits
    assert ours.largest < logits_bytes / 2, (ours.largest, logits_bytes)  # at most the labelled rows'
    assert ours.peak < theirs.peak - logits_bytes, (ours.peak, theirs.peak)


def _train_with(trainer_cls, model, tmp_path, **extra):
    ids, labels = _batch(B=8, T=16, masked=0.5, seed=3)
    labels[:4, :12] = -100  # micro-batches with very different label counts: num_items_in_batch matters
    data = [
        {"input_ids": i, "labels": y, "attention_mask": torch.ones_like(i)}
        for i, y in zip(ids, labels, strict=True)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        optim="sgd", **extra,
    )  # fmt: skip
    before = _weights(model)
    trainer = trainer_cls(model=model, args=args, train_dataset=data)
    trainer.train()
    return _losses(trainer), _updates(before, model)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _losses(trainer):
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def _updates(before, model):
    return {n: w - before[n] for n, w in _weights(model).items()}


def _assert_same_updates(ours, theirs):
    """Plain SGD makes each update lr x the gradient, so this compares gradients at fp32 rounding, where
    Adam's m / sqrt(v) turns a near-zero gradient's rounding noise into a full learning-rate step."""
    for name, update in theirs.items():
        scale = update.abs().max().item()
        torch.testing.assert_close(
            ours[name], update, rtol=1e-3, atol=1e-4 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_transformers_trainer_trains_the_same(tmp_path, monkeypatch):
    import tritrain_kernels.hf

    plain = _tiny("llama")
    patched = use_masked_ce(copy.deepcopy(plain))
    calls = []
    real = tritrain_kernels.hf.masked_linear_cross_entropy
    monkeypatch.setattr(
        tritrain_kernels.hf, "masked_linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    losses_a, updates_a = _train_with(transformers.Trainer, plain, tmp_path / "a")
    losses_b, updates_b = _train_with(transformers.Trainer, patched, tmp_path / "b")
    assert len(losses_a) == 2
    assert losses_b == pytest.approx(losses_a, rel=1e-4)
    _assert_same_updates(updates_b, updates_a)
    assert len(calls) == 4  # 2 steps of 2 micro-batches, each through the fused loss


def _count_fused_calls(monkeypatch):
    """Calls of the kernel entry point, as ``tritrain_kernels.hf`` makes them."""
    import tritrain_kernels.hf

    calls = []
    real = tritrain_kernels.hf.masked_linear_cross_entropy
    monkeypatch.setattr(
        tritrain_kernels.hf, "masked_linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    return calls


def _trl_utils():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(trl_utils, "add_fused_lm_head"):  # documented in tritrain_kernels/hf.py
        pytest.skip("TRL 0.x: no fused LM head; its SFTTrainer computes its metrics from outputs.logits")
    return trl_utils


def _sft_trainer(model, tmp_path):
    _trl_utils()
    import trl

    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(V)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")), pad_token="t0", eos_token="t1"
    )
    ids, _ = _batch(B=8, T=16, seed=3)
    data = datasets.Dataset.from_list([{"input_ids": row[: 8 + i].tolist()} for i, row in enumerate(ids)])
    # bf16=False: SFTConfig defaults to bf16 autocast, even on CPU, under which TRL's head multiplies in bf16
    # and the fused loss in fp32 (about 2e-5 apart in the loss); in fp32 both are exact to rounding.
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        optim="sgd", bf16=False,
    )  # fmt: skip
    return trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def _train_sft(trainer):
    before = _weights(trainer.model)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return logs, _updates(before, trainer.model)


def _trl_fused_head(model):
    """The fused LM head TRL's SFTTrainer puts on the model in ``__init__`` (TRL 1.16)."""
    _trl_utils().add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    return model


def test_trl_sft_trainer_runs_the_fused_loss_and_trains_the_same(tmp_path, monkeypatch):
    """The issue-24 regression: TRL 1.x's SFTTrainer computes its loss through its own fused LM head, so a
    forward patched before it never ran. Patched after the trainer is built, every micro-batch's loss is the
    fused masked CE's, with the same losses and updates as TRL's own head."""
    plain = _tiny("llama")
    other = copy.deepcopy(plain)
    calls = _count_fused_calls(monkeypatch)
    logs_a, updates_a = _train_sft(_sft_trainer(plain, tmp_path / "a"))
    assert not calls
    trainer = _sft_trainer(other, tmp_path / "b")
    with pytest.warns(UserWarning, match="entropy metric, which logs as nan"):
        use_masked_ce(trainer.model)
    logs_b, updates_b = _train_sft(trainer)
    assert len(calls) == 4  # 2 steps of 2 micro-batches, each through the fused loss
    assert len(logs_a) == 2
    # fp32 logits and log-sum-exp in both heads, summed in different orders: the per-token log-probs differ
    # by a few ulps (~5e-7 at a loss of 5.7), their mean by less; 1e-6 is a few ulps of the loss.
    assert [r["loss"] for r in logs_b] == pytest.approx([r["loss"] for r in logs_a], rel=1e-6)
    _assert_same_updates(updates_b, updates_a)
    # 0 for this random model; test_fused_head_outputs_match_trls compares non-zero top-1 counts
    assert [r["mean_token_accuracy"] for r in logs_b] == [r["mean_token_accuracy"] for r in logs_a]
    assert all(math.isnan(r["entropy"]) for r in logs_b)  # documented: not computed, logged as nan


def test_trl_sft_trainer_refuses_a_patch_made_before_it(tmp_path, monkeypatch):
    """Patched before SFTTrainer, the loss would silently be TRL's own: the first step raises instead, and a
    second use_masked_ce on trainer.model (now over TRL's head) makes the fused loss run."""
    model = use_masked_ce(_tiny("llama"))
    calls = _count_fused_calls(monkeypatch)
    trainer = _sft_trainer(model, tmp_path)
    with pytest.raises(RuntimeError, match=r"call use_masked_ce\(trainer.model\) after building the trainer"):
        trainer.train()
    assert not calls
    with pytest.warns(UserWarning, match="entropy metric"):
        use_masked_ce(trainer.model)
    trainer.train()
    assert len(calls) == 4


@pytest.mark.parametrize("loss_kwargs", [{}, {"num_items_in_batch": 7}, "shift_labels"])
def test_fused_head_outputs_match_trls(loss_kwargs):
    """What SFTTrainer reads from ``model(..., fused_lm_head=True)``, against TRL's head on the same model."""
    plain = _tiny("llama")  # a head each: a deep copy's TRL head would still call the original's forward
    theirs = _trl_fused_head(copy.deepcopy(plain))
    with pytest.warns(UserWarning, match="entropy metric"):
        ours = use_masked_ce(_trl_fused_head(plain))
    ids, labels = _batch(masked=0.3)
    with torch.no_grad():  # every third label the model's argmax, so that the top-1 count is not 0
        top = theirs(input_ids=ids).logits.argmax(-1)
    labels[:, 1::3] = top[:, 0:-1:3]  # position t predicts label t + 1
    if loss_kwargs == "shift_labels":
        loss_kwargs = {"shift_labels": torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]}
    kwargs = dict(input_ids=ids, labels=labels, fused_lm_head=True, **loss_kwargs)
    (out_a, grads_a), (out_b, grads_b) = _loss_and_grads(ours, **kwargs), _loss_and_grads(theirs, **kwargs)
    _assert_same((out_a, grads_a), (out_b, grads_b))
    torch.testing.assert_close(out_a.log_probs, out_b.log_probs)  # fp32 defaults: a few ulps of ~5.7
    assert torch.equal(out_a.label_mask, out_b.label_mask)
    assert 0 < out_a.is_top1.item() == out_b.is_top1.sum().item()  # a count: SFTTrainer only sums it
    assert out_a.entropy.shape == out_b.entropy.shape and out_a.entropy.isnan().all()


def test_fused_head_makes_no_logits_tensor():
    """Peak memory under TRL's fused-head call: TRL's head on CPU scores every position (it compacts the
    labelled ones only on Triton devices), ours only the labelled rows, and never the [B, T, V] logits."""
    vocab = 4099
    plain = _tiny("qwen2-tied", vocab)
    theirs = _trl_fused_head(copy.deepcopy(plain))
    with pytest.warns(UserWarning, match="entropy metric"):
        ours = use_masked_ce(_trl_fused_head(plain))
    ids, labels = _batch(B=4, T=64, masked=0.7, vocab=vocab)
    peaks = []
    for model in (ours, theirs):
        with _LiveBytes() as mode:
            model(input_ids=ids, labels=labels, fused_lm_head=True).loss.backward()
        peaks.append(mode)
    logits_bytes = ids.numel() * vocab * 4
    assert peaks[0].largest < logits_bytes / 2, (peaks[0].largest, logits_bytes)  # at most the labelled rows'
    assert peaks[0].peak < peaks[1].peak, (peaks[0].peak, peaks[1].peak)


def test_trl_heads_it_cannot_stand_in_for_are_refused():
    trl_utils = _trl_utils()
    dpo = _tiny("llama")
    trl_utils.add_fused_lm_head(dpo, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    with pytest.raises(ValueError, match="stands in only for SFTTrainer's"):
        use_masked_ce(dpo)
    hot = _tiny("llama")
    trl_utils.add_fused_lm_head(hot, temperature=0.7, outputs=("log_probs", "entropy", "is_top1"))
    with pytest.raises(ValueError, match="at temperature 0.7"):
        use_masked_ce(hot)
    plain = use_masked_ce(_tiny("llama"))
    ids, labels = _batch()
    with pytest.raises(ValueError, match="found no TRL fused LM head"):
        plain(input_ids=ids, labels=labels, fused_lm_head=True)
