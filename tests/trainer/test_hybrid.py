"""Hybrid decoders packed: Qwen3.5 / Qwen3.5-MoE / Qwen3-Next's Gated DeltaNet layers restart their short
convolution and recurrent state at every conversation of a packed row. ``check`` (packed vs transformers'
padded path, one conversation per row) passes on tiny random models, and fails by far more than its
tolerance when either reset is dropped."""

import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import arch_sweep  # noqa: E402

import trainer.check as check_module  # noqa: E402
import trainer.model as model_module  # noqa: E402
from tritrain_kernels import linear_attention  # noqa: E402

FAMILIES = ["qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"]


def _check(model_type, monkeypatch, lines=None):
    lines = [] if lines is None else lines
    from trainer.config import load_config
    from trainer.data import load_tokenizer

    model = arch_sweep.build(model_type, len(load_tokenizer("demo")))

    def prepare_model(*args, **kwargs):
        return model_module.prepare_model(*args, model=model, log=lines.append, **kwargs)

    monkeypatch.setattr(check_module, "prepare_model", prepare_model)
    cfg = load_config([*arch_sweep.ARGV, "--model", f"tiny-{model_type}"])
    return check_module.run_check(cfg, num_batches=1), model


@pytest.mark.parametrize("model_type", FAMILIES)
def test_check_passes_packed(model_type, monkeypatch):
    lines = []
    result, model = _check(model_type, monkeypatch, lines)
    print(model_type, result["loss_rel_diff"], result["grad_rel_diff"], result["conversations"])
    assert result["conversations"] > 1  # a packed row: boundaries inside it
    assert result["passed"], result
    assert result["loss_rel_diff"] < 1e-5 and result["grad_rel_diff"] < 1e-4, result
    assert any("linear (" in line and "restarted at each conversation" in line for line in lines), lines
    # LoRA on the linear attention's in/out projections; conv, A_log, dt_bias and the norms stay frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".linear_attn." in n}
    assert "out_proj" in adapted and any(a.startswith("in_proj") for a in adapted), adapted
    assert not [n for n in trainable if any(w in n for w in ("conv1d", "A_log", "dt_bias", "norm"))]


def _no_conv_reset(monkeypatch):
    monkeypatch.setattr(
        linear_attention, "positions_in_sequence", lambda cu, total: torch.arange(total, device=cu.device)
    )


def _no_state_reset(monkeypatch):
    chunk = linear_attention.chunk_gated_delta_rule_varlen

    def one_sequence(*args, cu_seqlens=None, **kwargs):
        return chunk(*args, cu_seqlens=None, **kwargs)

    monkeypatch.setattr(linear_attention, "chunk_gated_delta_rule_varlen", one_sequence)


@pytest.mark.parametrize("drop", [_no_conv_reset, _no_state_reset], ids=["conv", "recurrence"])
def test_check_catches_a_missing_reset(drop, monkeypatch):
    drop(monkeypatch)
    result, _ = _check("qwen3_5_text", monkeypatch)
    print(drop.__name__, result["loss_rel_diff"], result["grad_rel_diff"])
    assert not result["passed"]
    assert max(result["loss_rel_diff"], result["grad_rel_diff"]) > 10 * result["tolerance"], result


def test_other_hybrid_kinds_refused_in_one_line():
    from trainer.data import load_tokenizer

    model = arch_sweep.build("lfm2", len(load_tokenizer("demo")))
    with pytest.raises(ValueError, match="Lfm2ShortConv") as e:
        model_module.enable_varlen_attention(model)
    assert "\n" not in str(e.value) and "Gated DeltaNet" in str(e.value)


def test_unpacked_forward_is_transformers_own(monkeypatch):
    """Without cu_seq_lens (generation, check's padded path) the layer runs transformers' own code, and
    generation with its recurrent cache works after packing was installed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_5_text", vocab_size=64, **arch_sweep.TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    ids = torch.randint(1, 64, (1, 12))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        greedy = model.generate(ids, max_new_tokens=5, do_sample=False)
    model_module.enable_varlen_attention(model)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, before)
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), greedy)


def test_a_saved_hybrid_trains_packed_from_its_directory(tmp_path):
    """Loaded with from_pretrained as users load it: transformers 5.25 kernelizes such a model by default
    (``use_kernels``), which sent the Gated DeltaNet past the packed functions into a refusal; the trainer
    loads without hub kernels, and two steps with generation eval run."""
    from trainer.config import load_config
    from trainer.data import DEMO_TRAIN_FILE, DEMO_VAL_FILE, load_tokenizer
    from trainer.train import train

    tokenizer = load_tokenizer("demo")
    model = arch_sweep.build("qwen3_5_text", len(tokenizer))
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    for name, source, n in (("train", DEMO_TRAIN_FILE, 8), ("val", DEMO_VAL_FILE, 4)):
        (tmp_path / f"{name}.jsonl").write_text("".join(source.open().readlines()[:n]))
    args = ["--model", str(tmp_path / "model"), "--max-steps", "2", "--eval-every", "2",
            "--eval-generate", "2",
            "--eval-max-new-tokens", "4", "--max-length", "1024", "--max-tokens", "1024",
            "--train-file", str(tmp_path / "train.jsonl"), "--val-file", str(tmp_path / "val.jsonl"),
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    result = train(load_config(args))
    assert result["steps"] == 2 and all(math.isfinite(x) for x in result["losses"])
