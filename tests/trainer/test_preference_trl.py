"""Our DPO (trainer/preference.py through the real ``train()``) against TRL's ``DPOTrainer``.

Both train the same demo model from the same weights on the same 8 pairs, token for token:

* data: ``encode_pairs`` encodes the pairs once; TRL gets them pre-tokenized, ``prompt_ids`` the shared
  prefix up to the first scored token and ``chosen_ids`` / ``rejected_ids`` the rest, so TRL's completion
  tokens are exactly our scored tokens (asserted: with the GLM-4 rule the labels are a contiguous suffix).
  TRL 1.16's ``_prepare_dataset`` always re-tokenizes (it reads ``prompt`` / ``chosen`` / ``rejected`` text
  or messages and has no switch for a dataset that already has ``*_ids`` columns), so a minimal subclass
  returns the dataset as given; everything after it (the collator, ``_compute_loss``) is TRL's own.
* weights: ``train()`` builds its model as usual; ``setup_model`` is wrapped to give LoRA B small random
  values (PEFT's zero B would make every reward 0 at the start) and to keep a copy of that starting model
  for TRL, with transformers' own attention restored. TRL's reference is an explicit plain copy of the base
  model (ours is the same model with the adapter off); without it TRL would copy the random adapter into a
  "ref" adapter and start from zero rewards.
* optimisation: fp32, one step over all 8 pairs, AdamW (fused on both sides) with the same lr, betas, eps,
  no weight decay, no warmup, a constant schedule and the same clipping at norm 1; no dropout.

Compared, per step as each trainer logs it: loss, gradient norm, rewards/chosen, rewards/rejected,
rewards/margins and rewards/accuracies; step 1 is computed before any update (float32 round-off only),
steps 2 and 3 after 1 and 2 updates. Our side is the whole ``train()`` path (setup, packing into rows of
pairs, ``PreferenceLoss`` in ``parallel_step``, clipping, fused AdamW, the reward log in metrics.jsonl):
with ``loss_backend: reference`` in the default run (the fused kernel runs in Triton's interpreter on a
CPU, slowly) and with the fused loss in the ``slow`` variant, against the same TRL run.
"""

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

import trainer.train as train_module  # noqa: E402
from trainer.check import _randomize_lora_b  # noqa: E402
from trainer.config import TrainConfig, validate  # noqa: E402
from trainer.data import DEMO_TRAIN_FILE, load_tokenizer  # noqa: E402
from trainer.model import hf_reference_attention, load_model  # noqa: E402
from trainer.preference import demo_pairs, encode_pairs  # noqa: E402

PAIRS = 8
STEPS = 3
BETA = 0.1
LR = 2e-3

# Tolerances, float32 on both sides. Before any update the two compute the same function from the same
# weights, only with other reductions (packed varlen attention and a fused or plain masked loss against
# padded sdpa and TRL's chunked head): the loss and gradient norm agree to ~1e-7 relative (measured at
# most 2.5e-7), a reward, beta * (a sum of 4-15 log-probs of about -8 each, minus the reference's), to
# float32 round-off of those sums, ~1e-6 absolute (measured at most 3e-7). After updates the round-off
# in the gradients goes through AdamW's normalised update (~lr * dg / |g| per element) twice: measured at
# most 1.5e-6 on the rewards and 1.5e-6 relative on the loss and norm, so 10x that. A wrong term is far
# outside: beta 0.11 on TRL's side moves the first loss by 3.7e-3 (500x its tolerance) and every reward
# by 10%, and the steps move the margins by ~1.3, so the later steps are not compared at their start.
BEFORE = dict(loss_rtol=1e-5, reward_atol=2e-6)
AFTER = dict(loss_rtol=2e-5, reward_atol=2e-5)
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")


def _short_pairs(tmp_path: Path, tok) -> Path:
    """The 8 demo pairs with the shortest conversations, as a JSONL file."""
    records = demo_pairs(DEMO_TRAIN_FILE)
    sequences, _ = encode_pairs("demo", tok, template="glm4", max_length=4096, records=records)
    longest = [
        max(len(sequences[2 * p].input_ids), len(sequences[2 * p + 1].input_ids)) for p in range(len(records))
    ]
    chosen = sorted(range(len(records)), key=lambda p: (longest[p], p))[:PAIRS]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(records[p]) + "\n" for p in sorted(chosen)))
    return path


def _trl_rows(sequences) -> list[dict]:
    """TRL's pre-tokenized rows: the prompt is the shared prefix up to the first scored token, chosen and
    rejected the rest; asserts that the rest is exactly what our labels score."""
    rows = []
    for p in range(len(sequences) // 2):
        chosen, rejected = sequences[2 * p], sequences[2 * p + 1]
        firsts = [next(i for i, label in enumerate(s.labels) if label != -100) for s in (chosen, rejected)]
        first = firsts[0]
        assert firsts == [first, first] and chosen.input_ids[:first] == rejected.input_ids[:first]
        for s in (chosen, rejected):  # the labels: nothing before `first`, every token from it on
            assert set(s.labels[:first]) == {-100} and s.labels[first:] == s.input_ids[first:]
        rows.append({"prompt_ids": chosen.input_ids[:first], "chosen_ids": chosen.input_ids[first:],
                     "rejected_ids": rejected.input_ids[first:]})  # fmt: skip
    return rows


def _ours(out: Path, train_file: Path, loss_backend: str, beta: float = BETA):
    """The real ``train()`` on the pairs with LoRA B random at the start; returns its config, its per-step
    metrics and a copy of the model it started from."""
    start = {}
    original = train_module.setup_model

    def setup_model(cfg, *args, **kwargs):
        model, tokenizer, softcap, host = original(cfg, *args, **kwargs)
        _randomize_lora_b(model, cfg.seed)
        start["model"] = copy.deepcopy(model)
        return model, tokenizer, softcap, host

    cfg = validate(TrainConfig(
        model="demo", objective="dpo", train_file=str(train_file), val_file="", device="cpu", dtype="fp32",
        loss_backend=loss_backend, max_length=256, max_tokens=4096, grad_accum=1, max_steps=STEPS, lr=LR,
        warmup=0, schedule="constant", weight_decay=0.0, max_grad_norm=1.0, beta=beta, lora_dropout=0.0,
        log_every=1, eval_every=0, save_every=0, eval_generate=0, output_dir=str(out),
    ))  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "setup_model", setup_model)
        train_module.train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return cfg, [r for r in records if "loss" in r], start["model"]


def _lora(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def _trl(out: Path, cfg, tok, rows: list[dict], policy, beta: float = BETA) -> list[dict]:
    """TRL's DPOTrainer from ``policy`` (our starting PEFT model, here with HF attention) and the plain base
    model as its reference; returns its per-step metrics."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids (see the module's docstring)

    policy.get_base_model().set_attn_implementation(hf_reference_attention(policy))
    reference, _ = load_model(cfg, tokenizer=tok)  # the same seeded demo weights, without an adapter
    base = {k: v for k, v in policy.get_base_model().state_dict().items() if "lora_" not in k}
    for name, value in reference.state_dict().items():  # PEFT keeps an adapted layer's own as base_layer.*
        layer, _, kind = name.rpartition(".")
        assert torch.equal(base.get(name, base.get(f"{layer}.base_layer.{kind}")), value), name
    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=len(rows), gradient_accumulation_steps=1,
        max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch_fused", max_grad_norm=1.0,
        beta=beta, loss_type=["sigmoid"], label_smoothing=0.0, max_length=None, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, logging_steps=1, save_strategy="no", report_to="none",
        disable_dropout=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    dataset = Dataset.from_list(rows)
    trainer = PreTokenized(
        model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tok
    )
    trainer.train()
    logged = [r for r in trainer.state.log_history if "rewards/margins" in r]  # one a step: logging_steps=1
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    return logged


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Our run (plain torch loss, which is fast on CPU) and TRL's, from the same start on the same pairs."""
    tmp = tmp_path_factory.mktemp("trl")
    tok = load_tokenizer("demo")
    train_file = _short_pairs(tmp, tok)
    cfg, ours, start = _ours(tmp / "ours", train_file, "reference")
    sequences, summary = encode_pairs(train_file, tok, template="glm4", max_length=cfg.max_length)
    assert summary.kept == PAIRS
    lora = _lora(start)
    theirs = _trl(tmp / "theirs", cfg, tok, _trl_rows(sequences), start)
    return dict(train_file=train_file, ours=ours, theirs=theirs, lora=lora)


def _assert_steps_match(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        tol = BEFORE if step == 0 else AFTER
        where = f"step {step + 1}"
        for key in ("loss", "grad_norm"):
            msg = (where, key, a[key], b[key])
            assert a[key] == pytest.approx(b[key], rel=tol["loss_rtol"], abs=0), msg
        for key in REWARDS:
            msg = (where, key, a[key], b[key])
            assert a[key] == pytest.approx(b[key], rel=0, abs=tol["reward_atol"]), msg
        assert a["rewards/accuracies"] == b["rewards/accuracies"], where
    # the random adapter gives non-zero rewards from the start, and the steps move them far
    assert min(abs(ours[0][key]) for key in REWARDS) > 1e-3
    assert ours[-1]["rewards/margins"] - ours[0]["rewards/margins"] > 0.5
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.2


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_dpo_matches_trl_dpo_trainer(runs):
    """Steps 1-3 of ``train()`` (``loss_backend: reference``) against TRL's: step 1 before any update."""
    _assert_steps_match(runs["ours"], runs["theirs"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_dpo_with_the_fused_loss_matches_trl_dpo_trainer(runs, tmp_path):
    """The same with the fused masked cross-entropy (the default; slow on CPU: Triton's interpreter)."""
    _, ours, start = _ours(tmp_path / "ours", runs["train_file"], "fused")
    lora = _lora(start)
    assert lora.keys() == runs["lora"].keys()
    assert all(torch.equal(lora[k], runs["lora"][k]) for k in lora)  # the start TRL trained from
    _assert_steps_match(ours, runs["theirs"])
