import dataclasses

import pytest
import torch

import trainer.check as check_module
import trainer.train as train_module
from trainer.__main__ import main as trainer_main
from trainer.check import run_check
from trainer.config import load_config
from trainer.packing import collate_packed

# Small rows so that each run takes a few seconds on CPU; fp32, so the tolerance is the fp32 one.
FAST = ["--device", "cpu", "--max-tokens", "384", "--max-length", "384"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(FAST)


def test_correct_path_matches_hugging_face(cfg):
    r = run_check(cfg, num_batches=2)
    assert r["passed"], r
    assert r["num_batches"] == 2 and r["conversations"] >= 2
    assert r["loss_tokens"] == r["hf_loss_tokens"] > 0
    assert r["padded_slots"] >= r["tokens"]
    assert r["loss_ours"] == pytest.approx(r["loss_hf"], rel=1e-5)
    assert r["grad_rel_diff"] < 1e-4 and r["worst_param"]
    assert r["tolerance"] == check_module.TOLERANCE[torch.float32]


def _shifted_targets(encoded, row):
    """A real mislabel: every target is the token one position later than it should be."""
    b = collate_packed(encoded, row)
    ids = b.input_ids[0]
    b.loss_targets = ids[(b.loss_index + 2).clamp_max(ids.numel() - 1)]
    return b


def _leaky_attention(monkeypatch):
    """Packed conversations attending to each other: one varlen segment for the whole row."""
    real = train_module.decoder_hidden_states

    def leaky(model, batch):
        whole = torch.tensor([0, batch.num_tokens], dtype=torch.int32)
        return real(model, dataclasses.replace(batch, cu_seqlens=whole, max_seqlen=batch.num_tokens))

    monkeypatch.setattr(train_module, "decoder_hidden_states", leaky)


def _shifted_labels(monkeypatch):
    monkeypatch.setattr(check_module, "collate_packed", _shifted_targets)  # the rows the check trains on


@pytest.mark.parametrize("broken", [_shifted_labels, _leaky_attention], ids=["shifted_labels", "leak"])
def test_wrong_packed_path_fails(cfg, monkeypatch, broken):
    broken(monkeypatch)
    r = run_check(cfg, num_batches=2)
    assert not r["passed"], r
    assert max(r["loss_rel_diff"], r["grad_rel_diff"]) > 10 * r["tolerance"]


def test_broken_loss_fails(cfg, monkeypatch):
    real = check_module.masked_linear_cross_entropy

    def smoothed(*args, **kwargs):  # a loss that is close to, but not, cross-entropy
        return real(*args, **{**kwargs, "label_smoothing": 0.01})

    monkeypatch.setattr(check_module, "masked_linear_cross_entropy", smoothed)
    r = run_check(cfg, num_batches=1)
    assert not r["passed"], r


def test_cli(capsys, monkeypatch):
    assert trainer_main(["check", *FAST, "--num-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "| ours: packed" in out and "Hugging Face" in out

    monkeypatch.setattr(check_module, "collate_packed", _shifted_targets)
    assert trainer_main(["check", *FAST, "--num-batches=1"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-batches", "two"], "--num-batches: expected int"),
        (["--num-batches", "0"], "num_batches must be at least 1"),
        (["--no-such-key", "1"], "unknown key"),
    ],
)
def test_cli_errors(capsys, argv, message):
    assert check_module.main([*FAST, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_tolerance_override(cfg):
    r = run_check(dataclasses.replace(cfg), num_batches=1, tolerance=1e-12)
    assert r["tolerance"] == 1e-12 and not r["passed"]


def test_cli_says_how_many_conversations_the_template_rejected(tmp_path, capsys):
    """Conversations the template cannot render are neither trained nor checked: the report says how many
    of how many (it used to be silent about them). The demo's template drops tool calls."""
    import json

    user = {"role": "user", "content": "Count from 3 to 7."}
    good = {"messages": [user, {"role": "assistant", "content": "Sure: 3, 4, 5, 6, 7."}]}
    tool_call = {"function": {"name": "get_weather", "arguments": "{}"}}
    call = {"messages": [user, {"role": "assistant", "content": "", "tool_calls": [tool_call]}]}
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, call, good, call, good]))
    argv = [*FAST, "--template", "chat_template", "--train-file", str(data), "--num-batches", "1"]
    assert trainer_main(["check", *argv]) == 0
    out = capsys.readouterr().out
    assert "template: chat_template" in out and f"data {data}: 3/5 conversations kept" in out
    assert "the template rejected 2 of 5 conversations" in out and f"e.g. {data}:2: message 2" in out
