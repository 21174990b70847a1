"""QLoRA on CPU: the decoder's linear layers in NF4 (bitsandbytes), the head untouched, training runs."""

import math

import pytest
import torch

from trainer.config import load_config
from trainer.model import apply_lora, load_model
from trainer.quantize import quantize_nf4
from trainer.train import FlopCounter, train

bnb = pytest.importorskip("bitsandbytes")


def test_nf4_keeps_the_weights_and_the_head():
    cfg = load_config(["--device", "cpu"])
    model, _ = load_model(cfg)
    linears = {
        n: m.weight.detach().clone()
        for n, m in model.get_decoder().named_modules()
        if type(m) is torch.nn.Linear
    }
    head = model.lm_head.weight.detach().clone()
    size = FlopCounter(model).total
    quantize_nf4(model)
    assert FlopCounter(model).total == size  # MFU counts the model's weights, not its packed bytes
    assert len(linears) == 4 * 6  # q, k, v, o, gate_up, down per layer
    for name, module in model.get_decoder().named_modules():
        if name not in linears:
            continue
        assert isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_type == "nf4", name
        assert module.weight.data.numel() * 2 == linears[name].numel()  # two 4-bit codes per byte
        restored = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        # NF4 rounds each weight to one of 16 levels scaled by its 64-block's absmax: for Gaussian
        # weights the error is about 9% of their norm, never more than half the widest gap (0.14 absmax)
        original = linears[name]
        assert (restored - original).norm() / original.norm() < 0.12, name
        assert (restored - original).abs().max() <= 0.15 * original.abs().max(), name
    assert type(model.lm_head) is torch.nn.Linear and torch.equal(model.lm_head.weight, head)
    lora = apply_lora(model, cfg)
    adapted = lora.get_base_model().model.layers[0].self_attn.q_proj
    assert type(adapted).__module__ == "peft.tuners.lora.bnb"  # PEFT's 4-bit LoRA layer
    assert all(p.dtype == torch.float32 for n, p in lora.named_parameters() if p.requires_grad)


def test_qlora_trains_on_cpu(tmp_path):
    args = ["--device", "cpu", "--max-tokens", "128", "--max-length", "128", "--max-steps", "3",
            "--warmup", "0", "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--val-file", "",
            "--lr", "5e-3"]  # fmt: skip
    plain = train(load_config([*args, "--output-dir", str(tmp_path / "plain")]))
    qlora = train(load_config([*args, "--quantize", "nf4", "--output-dir", str(tmp_path / "qlora")]))
    assert all(math.isfinite(x) for x in qlora["losses"]) and qlora["skipped_steps"] == 0
    # the same model within NF4's rounding: the first loss (before any update) differs by a few percent
    assert qlora["losses"][0] == pytest.approx(plain["losses"][0], rel=0.05)
    assert qlora["losses"] != plain["losses"]
    assert (tmp_path / "qlora" / "final" / "adapter_model.safetensors").is_file()


def test_a_qlora_run_says_4_bit_at_start(tmp_path, capsys):
    args = ["--device", "cpu", "--max-tokens", "128", "--max-length", "128", "--max-steps", "1",
            "--eval-every", "0", "--save-every", "0", "--val-file", "",
            "--output-dir", str(tmp_path)]  # fmt: skip
    train(load_config([*args, "--quantize", "nf4"]))
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model demo:")]
    assert len(summary) == 1 and "(base weights frozen in 4-bit NF4: QLoRA)" in summary[0], summary


@pytest.mark.parametrize("trust", [False, True])
def test_a_model_directory_loads_with_trust_remote_code_as_set(monkeypatch, trust):
    """load_nf4 passes cfg.trust_remote_code to from_pretrained, as load_model does (issue 25 item 8)."""
    import transformers

    from trainer import quantize

    seen = {}

    def from_pretrained(name, **kwargs):
        seen.update(kwargs, name=name)
        return torch.nn.Linear(2, 2)  # any module: _no_cpu_repacking only walks its modules

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    cfg = load_config(["--model", "some-org/some-model", "--trust-remote-code", str(trust).lower()])
    quantize.load_nf4(cfg, torch.device("cpu"), tokenizer=object())  # a tokenizer given: none is loaded
    assert seen["name"] == "some-org/some-model" and seen["trust_remote_code"] is trust
    assert seen["quantization_config"].bnb_4bit_quant_type == "nf4"
