import dataclasses
import json
import math
import os
import signal
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import trainer.train as train_module
from trainer.config import ConfigError, load_config
from trainer.data import DEMO_TRAIN_FILE, encode_file
from trainer.model import apply_lora, enable_varlen_attention, lm_head_spec, load_model
from trainer.packing import make_packed_batches
from trainer.train import TrainingError, _atomic_dir, forward_backward, step_flops, train
from tritrain_kernels import masked_linear_cross_entropy

CPU = torch.device("cpu")
# A short demo run: fp32 on CPU, tiny rows, a few steps.
FAST = ["--device", "cpu", "--max-tokens", "256", "--max-length", "256", "--log-every", "1", "--lr", "5e-3"]


def _cfg(tmp_path, *args):
    return load_config([*FAST, "--output-dir", str(tmp_path / "out"), *args])


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    cfg = _cfg(tmp, "--max-steps", "16", "--eval-every", "8", "--save-every", "8", "--save-merged", "true")
    return cfg, train(cfg)


def test_demo_loss_falls_and_outputs_exist(demo_run):
    cfg, result = demo_run
    assert result["steps"] == 16 and result["skipped_steps"] == 0
    losses = result["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    assert result["first_loss"] == losses[0]
    out = Path(cfg.output_dir)
    for name in ("final", "best", "checkpoint-000008", "checkpoint-000016"):
        assert (out / name / "adapter_model.safetensors").is_file(), name
        assert (out / name / "adapter_config.json").is_file(), name
    assert (out / "checkpoint-000016" / "trainer_state.pt").is_file()
    saved = load_config(["--config", str(out / "train_config.yaml")])
    assert saved == dataclasses.replace(cfg, template="glm4")  # the resolved config: auto is glm4 here
    records = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 17))
    assert [r["step"] for r in records if "val_loss" in r] == [8, 16]
    assert [r["loss"] for r in records if "loss" in r] == pytest.approx(losses)
    assert (out / "loss.png").stat().st_size > 1000
    assert not list(out.glob(".tmp-*"))


def test_adapter_loads_with_peft_and_transformers(demo_run):
    from peft import PeftModel

    cfg, _ = demo_run
    final = Path(cfg.output_dir) / "final"
    saved = load_file(final / "adapter_model.safetensors")
    base, _ = load_model(cfg)
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(base, final).eval()
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0
    for key, value in saved.items():
        match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(match[0], value), key
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    assert not torch.allclose(adapted, plain)

    hf, _ = load_model(cfg)
    hf.load_adapter(str(final))
    merged = AutoModelForCausalLM.from_pretrained(Path(cfg.output_dir) / "merged")
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, adapted)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)


def test_early_stopping_keeps_the_best_adapter(tmp_path):
    # lr 0: the validation loss never improves on the first evaluation, so patience 2 stops at step 3
    cfg = _cfg(tmp_path, "--max-steps", "10", "--lr", "0", "--eval-every", "1", "--patience", "2")
    result = train(cfg)
    assert result["steps"] == 3 and result["stop_reason"].startswith("early stop")
    assert (Path(cfg.output_dir) / "best" / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in _lines(Path(cfg.output_dir) / "metrics.jsonl") if "val_loss" in r] == [1, 2, 3]


def test_z_loss_adds_its_logged_term_to_the_training_loss_only(tmp_path):
    """z_loss: the training loss is cross-entropy + the logged z term, which is coefficient x the mean squared
    log-sum-exp of the trained rows' logits (the float64 reference's, on the step's rows); validation
    losses stay cross-entropy. lr 0 keeps the weights, so both runs see the same logits."""
    args = ["--max-steps", "2", "--lr", "0", "--log-every", "1", "--eval-every", "0", "--save-every", "0"]
    plain = _lines(Path(train(_cfg(tmp_path / "a", *args))["output_dir"]) / "metrics.jsonl")
    coefficient = 1e-2
    result = train(_cfg(tmp_path / "b", *args, "--z-loss", str(coefficient)))
    z = _lines(Path(result["output_dir"]) / "metrics.jsonl")
    steps = [(p, q) for p, q in zip(plain, z, strict=True) if "loss" in p]
    assert len(steps) == 2
    for p, q in steps:
        assert q["z_loss"] > 0.1  # log-sum-exp ~ log V ~ 8 here: z ~ 0.01 * 64
        assert q["loss"] == pytest.approx(p["loss"] + q["z_loss"], rel=1e-5)
        assert "z_loss" not in p
    vals = [(p["val_loss"], q["val_loss"]) for p, q in zip(plain, z, strict=True) if "val_loss" in p]
    assert vals and all(a == pytest.approx(b, rel=1e-6) for a, b in vals)


def test_z_loss_term_is_its_coefficient_times_the_squared_log_sum_exp():
    from trainer.distributed import ONE_PROCESS
    from trainer.reporting import ZLoss

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(9, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.tensor([3, -100, 7, 49, -100, 0, 11, -100, 2])
    z = ZLoss(0.1, masked_linear_cross_entropy, torch.device("cpu"))
    loss = z.wrap(masked_linear_cross_entropy)(hidden, weight, labels, reduction="sum")
    logits, valid = (hidden.double() @ weight.double().T), labels != -100
    lse = torch.logsumexp(logits[valid], dim=-1)
    ce = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")
    assert float(loss) == pytest.approx(float(ce + 0.1 * (lse**2).sum()), rel=1e-5)
    assert z.take(ONE_PROCESS)["z_loss"] == pytest.approx(float(0.1 * (lse**2).mean()), rel=1e-5)
    with torch.no_grad():  # validation: cross-entropy alone, nothing counted
        assert float(z.wrap(masked_linear_cross_entropy)(hidden, weight, labels, reduction="sum")) == (
            pytest.approx(float(ce), rel=1e-5)
        )
    assert z.take(ONE_PROCESS)["z_loss"] == 0.0


# ------------------------------------------------------------------------------- loss normalisation


def test_gradients_do_not_depend_on_packing_or_accumulation_split():
    cfg = load_config(["--device", "cpu", "--lora-dropout", "0"])
    model, tokenizer = load_model(cfg)
    head = lm_head_spec(model)
    enable_varlen_attention(model, "reference")
    model = apply_lora(model, cfg)
    with torch.no_grad():  # B starts at zero; make it nonzero so every LoRA weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    data, _ = encode_file(DEMO_TRAIN_FILE, tokenizer, max_length=512, progress=False)
    data = [data[i] for i in range(10)]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    # reference: every conversation alone, plain transformers forward with full logits and shifted labels
    for p in params.values():
        p.grad = None
    total_tokens = sum(sum(t != -100 for t in e.labels[1:]) for e in data)
    base = model.get_base_model()
    base.set_attn_implementation("sdpa")
    reference_loss = torch.zeros(())
    for e in data:
        logits = base(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        targets = torch.tensor(e.labels[1:])
        loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        (loss / total_tokens).backward()
        reference_loss += loss.detach() / total_tokens
    reference = {n: p.grad.clone() for n, p in params.items()}
    enable_varlen_attention(model, "reference")

    # one optimizer step over all conversations, packed into 1 row, a few rows, or one row each
    # (several rows = micro-batches whose gradients accumulate inside forward_backward)
    longest = max(len(e.input_ids) for e in data)
    row_counts = set()
    for max_tokens in (sum(len(e.input_ids) for e in data), 1000, longest):
        rows = make_packed_batches(data, max_tokens, seed=3)
        row_counts.add(len(rows))
        assert sum(b.num_loss_tokens for b in rows) == total_tokens
        for p in params.values():
            p.grad = None
        loss = forward_backward(model, rows, head, masked_linear_cross_entropy, CPU, nullcontext())
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=0)
        for n, p in params.items():
            torch.testing.assert_close(p.grad, reference[n], rtol=1e-4, atol=1e-7, msg=f"{max_tokens} {n}")
    assert len(row_counts) == 3 and 1 in row_counts
    # MFU's FLOP count: 4 per frozen weight per token (head: per target token), plus some attention
    head_weights = base.lm_head.weight.numel()
    body = sum(p.numel() for p in base.parameters()) - 2 * head_weights
    matmuls = 4 * body * sum(len(e.input_ids) for e in data) + 4 * head_weights * total_tokens
    assert matmuls < step_flops(model, make_packed_batches(data, longest)) < 1.5 * matmuls


# ------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("how", ["ctrl-c", "second ctrl-c"])
def test_resume_after_interrupt_gives_identical_losses(tmp_path, monkeypatch, how):
    args = ["--max-steps", "8", "--save-every", "3", "--eval-every", "0", "--lora-dropout", "0.1",
            "--val-file", ""]  # fmt: skip
    full = train(_cfg(tmp_path / "a", *args))["losses"]

    real = train_module.micro_batch_loss_sum
    calls = {"n": 0}

    def interrupt_in_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5 and how == "ctrl-c":
            os.kill(os.getpid(), signal.SIGINT)  # the trainer finishes step 5, saves, then stops
        if calls["n"] == 5 and how == "second ctrl-c":
            raise KeyboardInterrupt  # stops mid-step: the weights are still those of step 4
        return real(*a, **k)

    monkeypatch.setattr(train_module, "micro_batch_loss_sum", interrupt_in_step_5)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run in a background job
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "b", *args))
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is gone, the caller's is back
    done = 5 if how == "ctrl-c" else 4
    out = tmp_path / "b" / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000003", f"checkpoint-{done:06d}"]
    monkeypatch.setattr(train_module, "micro_batch_loss_sum", real)
    real_load = torch.load

    def load_onto_cpu(*a, **k):  # every rank would otherwise load onto the GPU the state was saved from
        assert k.get("map_location") == "cpu", k
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", load_onto_cpu)
    resumed = train(_cfg(tmp_path / "b", *args, "--resume", "auto"))["losses"]
    assert resumed == full[done:]  # fp32 on CPU: bit-identical
    logged = [r["loss"] for r in _lines(out / "metrics.jsonl") if "loss" in r]
    assert logged == pytest.approx(full)

    with pytest.raises(ConfigError, match=r"made with other settings: max_tokens 256 -> 512"):
        train(_cfg(tmp_path / "b", *args, "--resume", "auto", "--max-tokens", "512"))
    with pytest.raises(TrainingError, match="already holds checkpoints .newest checkpoint-000008.: continue"):
        train(_cfg(tmp_path / "b", *args))


def test_crash_during_save_keeps_the_last_good_directory(tmp_path):
    target = tmp_path / "checkpoint-000001"
    _atomic_dir(target, lambda tmp: (tmp / "a.txt").write_text("good"))

    def crash(tmp):
        (tmp / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        _atomic_dir(target, crash)
    assert (target / "a.txt").read_text() == "good"
    _atomic_dir(target, lambda tmp: (tmp / "a.txt").write_text("new"))
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001"]


# ------------------------------------------------------------------------------- non-finite steps


def _nan_on(steps, monkeypatch):
    real = train_module.micro_batch_loss_sum
    calls = {"n": 0}

    def loss(*a, **k):
        calls["n"] += 1
        value = real(*a, **k)
        return value * float("nan") if calls["n"] in steps else value

    monkeypatch.setattr(train_module, "micro_batch_loss_sum", loss)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    args = ["--max-steps", "5", "--save-every", "0", "--eval-every", "0", "--val-file", ""]
    clean = train(_cfg(tmp_path / "a", *args))["losses"]
    _nan_on({2, 3}, monkeypatch)
    updates = []  # per step: the AdamW step counter after it, and whether the weights moved
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        params = [p for group in self.param_groups for p in group["params"]]
        before = [p.detach().clone() for p in params]
        real_step(self)
        moved = any(not torch.equal(x, p) for x, p in zip(before, params, strict=True))
        updates.append((int(self.state[params[0]]["step"]), moved))

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    result = train(_cfg(tmp_path / "b", *args))
    # the non-finite steps 2 and 3 are skipped on the device: no weight moves, AdamW's counter stays
    assert result["skipped_steps"] == 2
    assert updates == [(1, True), (1, False), (1, False), (2, True), (3, True)]
    losses = result["losses"]
    assert losses[0] == clean[0] and math.isnan(losses[1]) and math.isnan(losses[2])
    assert all(math.isfinite(x) for x in losses[3:])
    assert _lines(tmp_path / "b" / "out" / "metrics.jsonl")[-1]["skipped"] == 2


def test_too_many_non_finite_steps_stop_the_run(tmp_path, monkeypatch):
    _nan_on(set(range(2, 100)), monkeypatch)
    cfg = _cfg(tmp_path, "--max-steps", "10", "--max-bad-steps", "3", "--eval-every", "0", "--val-file", "")
    with pytest.raises(TrainingError, match="3 non-finite steps in a row at step 4"):
        train(cfg)


def test_cli_prints_one_line_errors(capsys):
    from trainer.__main__ import main

    assert main(["--lr", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: lr: expected float, got 'x' (str)"
    assert main(["--train-file", "/nonexistent.jsonl", "--device", "cpu"]) == 2
    assert "/nonexistent.jsonl" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["--model", "/nonexistent/model", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: model /nonexistent/model: ")
