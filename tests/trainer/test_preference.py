"""Preference fine-tuning (trainer/preference.py): DPO, SimPO and ORPO on packed pairs.

The losses and LoRA gradients are compared with a plain float64 reimplementation on unpacked pairs through
the model's own Hugging Face attention and full logits; the normalisation across micro-batches, packings
and processes is checked against one step over every pair; records in the forms users bring read alike.
"""

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.test_templates import family_tokenizer
from trainer.check import _lora_grads, _randomize_lora_b
from trainer.config import ConfigError, TrainConfig, load_config, validate
from trainer.conversations import DataError
from trainer.data import DEMO_TRAIN_FILE, DEMO_VAL_FILE, encode_file, load_tokenizer
from trainer.model import hf_reference_attention, prepare_model
from trainer.parallel import Single
from trainer.preference import (
    PreferenceLoss,
    collate_pairs,
    demo_pairs,
    encode_pairs,
    log1mexp,
    pack_pairs,
    pair_losses,
)
from trainer.train import train
from tritrain_kernels import masked_linear_cross_entropy

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
FP32 = torch.autocast("cpu", enabled=False)
SETTINGS = dict(beta=0.3, label_smoothing=0.1, simpo_gamma=0.4)


# ------------------------------------------------------------------------------------------- the formulas


def _float64_pair_loss(kind, c, r, nc, nr, c0=None, r0=None, *, beta, label_smoothing, simpo_gamma):
    """One pair's loss, written out from the papers (DPO eq. 7 with cDPO's smoothing, SimPO eq. 6, ORPO
    eq. 7 without its NLL term) in float64 on Python scalars or 0-dim tensors."""
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    if kind == "orpo":
        pc, pr = torch.exp(c / nc), torch.exp(r / nr)
        odds = torch.log((pc / (1 - pc)) / (pr / (1 - pr)))
        return -beta * torch.log(sig(odds))
    z = beta * ((c - c0) - (r - r0)) if kind == "dpo" else beta * (c / nc - r / nr) - simpo_gamma
    return -(1 - label_smoothing) * torch.log(sig(z)) - label_smoothing * torch.log(sig(-z))


@pytest.mark.parametrize("kind", ["dpo", "simpo", "orpo"])
def test_pair_losses_match_the_papers(kind):
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 40, (9, 2), generator=g)
    policy = -torch.rand(9, 2, generator=g, dtype=torch.float64) * counts * 3  # mean log-prob in (-3, 0)
    reference = policy + torch.randn(9, 2, generator=g, dtype=torch.float64)
    got, chosen, rejected = pair_losses(kind, policy, counts, reference, **SETTINGS)
    for p in range(9):
        want = _float64_pair_loss(kind, *policy[p], *counts[p].double(), *reference[p], **SETTINGS)
        torch.testing.assert_close(got[p], want, rtol=1e-12, atol=0)
    assert (chosen > rejected).any() and (chosen < rejected).any()  # the case has both outcomes


def test_log1mexp_is_accurate_at_both_ends():
    from decimal import Decimal, getcontext

    getcontext().prec = 60  # exact enough: 1 - exp(x) for x = -1e-9 keeps 50 digits
    x = torch.tensor([-1e-9, -1e-4, -0.5, -0.7, -5.0, -40.0], dtype=torch.float64)
    want = torch.tensor([float((1 - Decimal(v).exp()).ln()) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), want, rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------------------- data


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _encode(path, tok, **settings):
    """``encode_pairs`` without the disk cache, its sequences as a list."""
    sequences, summary = encode_pairs(path, tok, cache_dir=False, progress=False, **settings)
    return list(sequences), summary


def test_the_forms_users_bring_encode_alike(tmp_path):
    tok = load_tokenizer("demo")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    question = {"role": "user", "content": "What is 2 plus 2?"}
    right, wrong = {"role": "assistant", "content": "4."}, {"role": "assistant", "content": "5."}
    forms = [
        {"prompt": [question], "chosen": [right], "rejected": [wrong]},
        {"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "5."},  # TRL's standard form
        {"chosen": [question, right], "rejected": [question, wrong]},  # TRL's implicit prompt
        {"prompt": [question], "chosen": right, "rejected": wrong},  # one message object
    ]
    encoded = [_encode(_write(tmp_path / f"{i}.jsonl", [f]), tok, template="glm4", max_length=256)[0]
               for i, f in enumerate(forms)]  # fmt: skip
    assert all(e == encoded[0] for e in encoded) and len(encoded[0]) == 2
    chosen, rejected = encoded[0]
    # the prompt is never scored: both sequences hold it, unlabelled, up to the answer, which is scored
    # from its first token (GLM-4's rule: the newline after <|assistant|>) to its end marker
    first = next(i for i, label in enumerate(chosen.labels) if label != -100)
    assert chosen.input_ids[:first] == rejected.input_ids[:first] and first > 8
    assert set(chosen.labels[:first] + rejected.labels[:first]) == {-100}
    assert (
        chosen.labels[first:] == chosen.input_ids[first:]
        and rejected.labels[first:] == rejected.input_ids[first:]
    )
    assert chosen.input_ids[first:] != rejected.input_ids[first:]
    # tools, also as TRL datasets keep them (JSON text), reach the template
    with_tools = [{**forms[0], "tools": tools}, {**forms[0], "tools": json.dumps(tools)}]
    a, b = (_encode(_write(tmp_path / f"t{i}.jsonl", [r]), tok, template="glm4", max_length=256)[0]
            for i, r in enumerate(with_tools))  # fmt: skip
    assert a == b and len(a[0].input_ids) > len(chosen.input_ids)


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"prompt": "hi", "chosen": "a"}, "missing 'rejected'"),
        ({"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
         "'chosen' has no assistant"),
        ({"prompt": "hi", "chosen": 3, "rejected": "b"}, "'chosen' must be a string or a list of messages"),
        ({"chosen": {"role": "assistant", "content": "a"}, "rejected": {"role": "assistant", "content": "b"}},
         "needs a prompt"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "missing 'chosen'"),
    ],
)  # fmt: skip
def test_a_bad_record_is_one_line_naming_file_and_line(tmp_path, record, problem):
    good = {"prompt": "hi", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path / "pairs.jsonl", [good, record])
    with pytest.raises(DataError) as e:
        encode_pairs(path, load_tokenizer("demo"), template="glm4", max_length=256)
    assert str(e.value).startswith(f"{path}:2: ") and problem in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("family", ["glm4", "qwen3", "llama3.1"])
def test_overlong_pairs_lose_their_prompts_oldest_turns_or_are_dropped(tmp_path, family):
    tok = load_tokenizer("demo") if family == "glm4" else family_tokenizer(family)
    template = "glm4" if family == "glm4" else "chat_template"
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    system = {"role": "system", "content": "You add numbers and answer briefly."}
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add",
            "arguments": {"a": 2, "b": 2}}}]}  # fmt: skip
    turns = [
        [
            {"role": "user", "content": "What is two plus two, and why is it so, in many words? " * 3},
            call,
            {"role": "tool", "content": "4"},
            {"role": "assistant", "content": "Four, as the tool says."},
        ],
        [
            {"role": "user", "content": "And three plus three, said slowly and at length? " * 3},
            {"role": "assistant", "content": "Six."},
        ],
        [{"role": "user", "content": "Now five plus five?"}],
    ]
    answers = {"chosen": [{"role": "assistant", "content": "Ten."}],
               "rejected": [{"role": "assistant", "content": "Eleven, I think."}]}  # fmt: skip

    def pair(kept_turns):
        return {"prompt": [system, *sum(kept_turns, [])], **answers, "tools": tools}

    short = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}

    def encode(records, max_length, overlong):
        path = _write(tmp_path / "pairs.jsonl", records)
        return _encode(path, tok, template=template, max_length=max_length, overlong=overlong)

    # the references: the same pair written by hand with its oldest turns left out
    whole, one_out, two_out = (encode([pair(turns[k:])], 4096, "drop")[0] for k in range(3))
    lengths = [max(len(e.input_ids) for e in p) for p in (whole, one_out, two_out)]
    assert lengths[0] > lengths[1] > lengths[2]
    alone = encode([short], 4096, "drop")[0]

    def counts(summary):
        return summary.kept, summary.truncated, summary.dropped_overlong

    for max_length, want in ((lengths[1], one_out), (lengths[1] - 1, two_out), (lengths[2], two_out)):
        got, summary = encode([short, pair(turns)], max_length, "truncate")
        assert got == alone + want and counts(summary) == (2, 1, 0)
        assert f"truncated 1 prompts to their latest turns to fit max_length={max_length}" in summary.format()
        got, summary = encode([short, pair(turns)], max_length, "drop")
        assert got == alone and counts(summary) == (1, 0, 1)
    # the last user turn alone does not fit: dropped, and counted as dropped
    got, summary = encode([short, pair(turns)], lengths[2] - 1, "truncate")
    assert got == alone and counts(summary) == (1, 0, 1)


def test_pairs_encode_in_parallel_and_come_back_from_the_cache(tmp_path):
    tok = load_tokenizer("demo")
    path = _write(tmp_path / "pairs.jsonl", demo_pairs(DEMO_TRAIN_FILE)[:300])  # two worker tasks
    common = dict(template="glm4", max_length=256, overlong="truncate", pairs=True, progress=False)
    one, s1 = encode_file(path, tok, num_workers=1, cache_dir=False, **common)
    two, s2 = encode_file(path, tok, num_workers=2, cache_dir=tmp_path / "cache", **common)
    again, s3 = encode_file(path, tok, cache_dir=tmp_path / "cache", **common)
    assert list(one) == list(two) == list(again) and len(one) == 2 * s1.kept
    assert not s2.from_cache and s3.from_cache and s1.dropped_overlong > 0 and s1.truncated > 0
    counts = ("conversations", "kept", "dropped_overlong", "truncated", "tokens", "label_tokens", "unit")
    assert all([getattr(s, k) for k in counts] == [getattr(s1, k) for k in counts] for s in (s2, s3))
    assert s3.format().startswith(f"data {path}: {s1.kept}/300 preference pairs kept (cache")
    # the same file read as SFT data is another cache entry: the prompt and the chosen answer
    _, s4 = encode_file(path, tok, template="glm4", max_length=256, cache_dir=tmp_path / "cache",
                        progress=False)  # fmt: skip
    assert not s4.from_cache and s4.unit == "conversations" and s4.conversations == 300


def test_sft_and_eval_generate_read_a_preference_file_as_prompt_and_chosen(tmp_path):
    records = demo_pairs(DEMO_VAL_FILE)[:3]
    path = _write(tmp_path / "pairs.jsonl", records)
    tok = load_tokenizer("demo")
    sft, _ = encode_file(path, tok, max_length=2048, progress=False, cache_dir=tmp_path / "cache")
    pairs, _ = encode_pairs(path, tok, template="glm4", max_length=2048)
    assert [e.input_ids for e in sft] == [e.input_ids for e in pairs[0::2]]
    assert [e.labels for e in sft] == [e.labels for e in pairs[0::2]]


# ------------------------------------------------------------------------------------------- the loss


@pytest.fixture(scope="module")
def tiny():
    """The demo model with LoRA (B random, so every adapter gradient is exercised) and 6 short pairs."""
    torch.manual_seed(0)
    tok = load_tokenizer("demo")
    records = [r for r in demo_pairs(DEMO_TRAIN_FILE) if len(json.dumps(r)) < 900][:6]
    sequences, summary = encode_pairs("demo", tok, template="glm4", max_length=512, records=records)
    assert summary.kept == 6
    cfg = validate(TrainConfig(max_length=512, max_tokens=1024, lora_dropout=0.0))
    model, _, head = prepare_model(cfg, tokenizer=tok)
    _randomize_lora_b(model, 0)
    model.eval()
    return model, head, sequences


def _ours(model, head, sequences, kind, max_tokens, ranks=1):
    """Loss and LoRA gradients of one step over every pair, packed into rows of ``max_tokens``, each row
    a micro-batch, the rows dealt to ``ranks`` ranks (their gradients added up, as the all-reduce does)."""
    loss_fn = functools.partial(masked_linear_cross_entropy, assume_valid=True)
    objective = PreferenceLoss(kind, loss_fn, CPU, **SETTINGS)
    group = [collate_pairs(sequences, row) for row in pack_pairs(sequences, max_tokens)]
    model.zero_grad(set_to_none=True)
    shares = [[(b, 1.0) for b in group[rank::ranks]] for rank in range(ranks)]
    loss = sum(objective.forward_backward(model, share, group, head, CPU, FP32) for share in shares)
    grads = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, len(group), objective.take(Single())


def _logp_sum(model, seq):
    """Float64 log-prob sum, count and NLL sum of a sequence's scored tokens: unpacked, full logits."""
    logits = model(input_ids=torch.tensor([seq.input_ids])).logits[0, :-1].double()
    labels = torch.tensor(seq.labels[1:])
    scored = labels != -100
    logp = torch.log_softmax(logits[scored], -1).gather(1, labels[scored, None]).sum()
    return logp, scored.sum().double()


def _float64(model, sequences, kind):
    """The step's loss and LoRA gradients from the written-out formulas, pair by pair, in float64 through
    the model's own attention and logits (a copy of the model)."""
    import copy

    model = copy.deepcopy(model).double()
    model.get_base_model().set_attn_implementation(hf_reference_attention(model))
    pairs, losses, nll, tokens = len(sequences) // 2, [], 0.0, 0.0
    for p in range(pairs):
        (c, nc), (r, nr) = _logp_sum(model, sequences[2 * p]), _logp_sum(model, sequences[2 * p + 1])
        with torch.no_grad(), model.disable_adapter():
            c0, r0 = _logp_sum(model, sequences[2 * p])[0], _logp_sum(model, sequences[2 * p + 1])[0]
        losses.append(_float64_pair_loss(kind, c, r, nc, nr, c0, r0, **SETTINGS))
        nll, tokens = nll - c, tokens + nc
    loss = sum(losses) / pairs + (nll / tokens if kind == "orpo" else 0.0)
    loss.backward()
    return loss.item(), _lora_grads(model)


def _assert_grads_close(got: dict, want: dict, rtol: float) -> None:
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        scale = want[name].abs().max()
        assert scale > 0, name
        err = ((got[name] - want[name]).abs().max() / scale).item()
        assert err < rtol, (name, err)


@pytest.mark.parametrize("kind", ["dpo", "simpo", "orpo"])
def test_packed_loss_and_gradients_match_float64_on_unpacked_pairs(tiny, kind):
    model, head, sequences = tiny
    loss, grads, rows, stats = _ours(model, head, sequences, kind, max_tokens=1024)
    assert rows > 1  # several micro-batches share the step's normalisation
    want_loss, want_grads = _float64(model, sequences, kind)
    assert abs(loss - want_loss) <= 2e-6 * abs(want_loss), (loss, want_loss)
    _assert_grads_close(grads, want_grads, rtol=1e-4)  # fp32 against fp64; a wrong term is O(1)
    assert 0 <= stats["rewards/accuracies"] <= 1
    assert stats["rewards/margins"] == pytest.approx(stats["rewards/chosen"] - stats["rewards/rejected"])


@pytest.mark.parametrize("kind", ["dpo", "orpo"])
def test_the_step_does_not_depend_on_packing_micro_batches_or_ranks(tiny, kind):
    model, head, sequences = tiny
    one_row, grads_one, rows_one, _ = _ours(model, head, sequences, kind, max_tokens=8192)
    many, grads_many, rows_many, _ = _ours(model, head, sequences, kind, max_tokens=1024, ranks=2)
    assert rows_one == 1 and rows_many >= 2
    assert abs(one_row - many) <= 1e-6 * abs(one_row)
    _assert_grads_close(grads_many, grads_one, rtol=1e-5)


def test_cached_reference_equals_the_reference_of_each_step(tiny):
    model, head, sequences = tiny
    loss_fn = functools.partial(masked_linear_cross_entropy, assume_valid=True)
    rows = pack_pairs(sequences, 1024)
    batches = [collate_pairs(sequences, row) for row in rows]
    step = PreferenceLoss("dpo", loss_fn, CPU, **SETTINGS)
    cached = PreferenceLoss("dpo", loss_fn, CPU, **SETTINGS)
    cached.cache_reference(model, sequences, rows, head, Single(), FP32, "train")
    assert cached.cache["train"].shape == (len(sequences) // 2, 2)
    for batch in batches:
        torch.testing.assert_close(cached.reference(model, batch, head), step.reference(model, batch, head),
                                   rtol=1e-6, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("kind", ["dpo", "simpo", "orpo"])
def test_check_covers_the_preference_objectives(kind, monkeypatch):
    from trainer import check, preference

    cfg = validate(TrainConfig(objective=kind, max_length=512, max_tokens=1024))
    result = check.run_check(cfg, num_batches=1, tolerance=1e-4)
    assert result["passed"] and result["loss_rel_diff"] < 1e-5 and result["conversations"] >= 2
    assert "mean per pair" in check.format_report(result)
    if kind == "dpo":  # a wrong beta on the training path alone is caught
        wrong = functools.partial(pair_losses, beta=0.31)
        monkeypatch.setattr(preference, "pair_losses", lambda *a, beta, **k: wrong(*a, **k))
        assert not check.run_check(cfg, num_batches=1, tolerance=1e-4)["passed"]


# ------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--objective", "kto"], "objective: 'kto' is not one of sft, dpo, simpo, orpo"),
        (["--objective", "dpo", "--max-length", "1024", "--max-tokens", "1500"], "less than twice"),
        (["--objective", "dpo", "--label-smoothing", "0.5"], "label_smoothing in [0, 0.5)"),
        (["--objective", "simpo", "--beta", "0"], "beta must be positive"),
        (["--objective", "orpo", "--z-loss", "1e-4"], "z_loss applies to objective sft"),
        (["--objective", "dpo", "--ref-logps", "never"], "ref_logps: 'never' is not one of step, cached"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line(args, problem):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(args)
    assert problem in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- whole runs


def _pair_files(tmp_path: Path, train: int = 8, val: int = 3) -> tuple[Path, Path]:
    short = [r for r in demo_pairs(DEMO_TRAIN_FILE) if len(json.dumps(r)) < 900]
    return (_write(tmp_path / "train.jsonl", short[:train]),
            _write(tmp_path / "val.jsonl", short[train : train + val]))  # fmt: skip


def _args(train_file: Path, val_file: Path, out: Path, *extra: str) -> list[str]:
    return ["--objective", "dpo", "--train-file", str(train_file), "--val-file", str(val_file),
            "--max-length", "256", "--max-tokens", "512", "--lr", "5e-3", "--lora-dropout", "0",
            "--max-steps", "4", "--warmup", "0", "--log-every", "1", "--eval-every", "2",
            "--save-every", "2", "--eval-generate", "2", "--eval-max-new-tokens", "4",
            "--output-dir", str(out), *extra]  # fmt: skip


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_dpo_run_logs_rewards_evaluates_and_caches_the_reference_on_request(tmp_path):
    train_file, val_file = _pair_files(tmp_path)
    result = train(load_config(_args(train_file, val_file, tmp_path / "step")))
    train(load_config([*_args(train_file, val_file, tmp_path / "cached"), "--ref-logps", "cached"]))
    step_records, cached_records = _metrics(tmp_path / "step"), _metrics(tmp_path / "cached")
    train_records = [r for r in step_records if "loss" in r]
    assert len(train_records) == 4 and result["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: B = 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(key in r for r in train_records)
    evals = [r for r in step_records if "val_loss" in r]
    assert len(evals) == 2 and all("val_rewards/accuracies" in r and "exact_match" in r for r in evals)
    assert train_records[-1]["rewards/margins"] > 0  # the demo's chosen answers are learnt
    for a, b in zip(step_records, cached_records, strict=True):  # the same numbers, one reference pass
        for key in ("loss", "val_loss", "rewards/margins"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert (tmp_path / "step" / "final" / "adapter_model.safetensors").is_file()


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", port, "-m", "trainer", *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_match_one(tmp_path, parallel):
    """8 pairs pack into rows of 2 or 3 pairs; one process with 2 rows a step against 2 processes with 1
    row each (the last step of each epoch leaves rank 1 without a row)."""
    train_file, val_file = _pair_files(tmp_path)
    common = ["--device", "cpu", "--epochs", "2", "--max-steps", "0", "--eval-generate", "0"]
    train(load_config([*_args(train_file, val_file, tmp_path / "one"), *common, "--grad-accum", "2"]))
    _torchrun([*_args(train_file, val_file, tmp_path / "two"), *common, "--parallel", parallel])
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [sorted(r) for r in one] == [sorted(r) for r in two]
    for key in (
        "loss",
        "grad_norm",
        "val_loss",
        "rewards/margins",
        "rewards/accuracies",
        "val_rewards/margins",
    ):
        a, b = [r[key] for r in one if key in r], [r[key] for r in two if key in r]
        assert len(a) > 0
        torch.testing.assert_close(torch.tensor(b, dtype=torch.float64), torch.tensor(a, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6, msg=key)  # fmt: skip


def test_a_resumed_dpo_run_continues_with_the_same_losses(tmp_path):
    """Checkpoints hold the position in the rows of pairs; the cached reference is computed again."""
    train_file, val_file = _pair_files(tmp_path)
    common = ["--val-file", "", "--eval-generate", "0", "--schedule", "constant", "--ref-logps", "cached"]
    whole = train(load_config([*_args(train_file, val_file, tmp_path / "whole"), *common]))
    half = load_config([*_args(train_file, val_file, tmp_path / "half"), *common, "--max-steps", "2"])
    train(half)
    resumed = train(load_config([*_args(train_file, val_file, tmp_path / "half"), *common, "--resume", "auto",
                                 "--resume-override", "max_steps"]))  # fmt: skip
    assert len(resumed["losses"]) == 2
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(whole["losses"][2:]), rtol=1e-6, atol=0
    )
