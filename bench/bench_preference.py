"""DPO step throughput: this project's preference step against TRL's ``DPOTrainer``, same model and pairs.

    python bench/bench_preference.py               # CPU: the small GLM-4-style model, fp32
    python bench/bench_preference.py --quick       # fewer, shorter pairs
    python bench/bench_preference.py --shape qwen2.5-1.5b --layers 8    # CUDA, bf16

One step = the policy's forward and backward, the reference's forward (the same model with its LoRA adapter
switched off, no gradients), the gradient-norm clip at 1.0 and an AdamW step, over ``pairs_per_step`` pairs:

- ``ours``: the step's pairs in one packed row, chosen and rejected back to back (``trainer.preference``:
  ``collate_pairs``), varlen attention, the fused masked loss on the answers' rows only
  (``PreferenceLoss.forward_backward``, what training runs);
- ``trl``: ``trl.DPOTrainer`` with its defaults (padded batches of chosen and rejected rows, sdpa with an
  attention mask, its chunked log-prob head, gradient checkpointing on), timed inside ``trainer.train()``
  from ``on_step_begin`` to ``on_step_end`` (its ``training_step``, the clip, the optimizer step). Changed
  from its defaults only so that both see the same data: ``max_length=None`` (its 1024 would truncate),
  sequential sampling (the same pairs in each step), fp32 on CPU (its default is bf16 autocast);
- ``trl_no_gc``: the same with ``gradient_checkpointing=False`` (ours does not checkpoint by default);
- TRL's ``padding_free=True`` is tried at construction: TRL 1.16 warns and falls back to padding for DPO.

Each provider runs in a fresh subprocess. Peak memory, from the warm-up step to the last step: on CPU the
peak RSS (VmHWM, reset before the warm-up step through /proc/self/clear_refs; else ``resource.getrusage``'s
maximum RSS) less the RSS then; on CUDA ``torch.cuda.max_memory_allocated`` above the live memory then.
Throughput counts real (non-pad) tokens of both conversations of every pair.

Data: ``trainer.assets.synthetic.generate_conversations`` (plain chat ones, no tool calls): the prompt is a
conversation up to its last answer, chosen that answer, rejected the last answer of the next conversation.
The LoRA weights start from the same seeded random values in every provider (not B = 0), so that the
policy differs from the reference and the step-0 losses compared in the table are not all log 2.
Our template scores each answer's end-of-turn token (GLM-4: the next ``<|user|>``), TRL's completion stops
before it: the step-0 check also computes our loss on TRL's exact tokens (that token dropped).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench_train import SHAPES, build_model  # noqa: E402

from benchutil import git_commit  # noqa: E402
from trainer.assets.synthetic import generate_conversations  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.data import Encoded, load_tokenizer  # noqa: E402

LORA = TrainConfig(lora_r=16, lora_alpha=32.0, lora_dropout=0.0)
BETA = 0.1
LR = 1e-6  # TRL's DPO default; the same in every provider
# Per shape: pairs per step, timed steps (after one warm-up step), the conversations' mean length.
SETTINGS = {
    "cpu-small": dict(pairs_per_step=4, steps=2, mean_tokens=500),
    "qwen2.5-1.5b": dict(pairs_per_step=8, steps=5, mean_tokens=700),
    "llama3-8b": dict(pairs_per_step=8, steps=5, mean_tokens=700),
    "tiny": dict(pairs_per_step=2, steps=1, mean_tokens=80),
}
QUICK = {"cpu-small": dict(pairs_per_step=2, steps=2, mean_tokens=300), "qwen2.5-1.5b": dict(steps=3)}
PROVIDERS = ("ours", "trl", "trl_no_gc", "trl_padding_free")


# ------------------------------------------------------------------------------------------------- data


def preference_records(n: int, mean_tokens: int, seed: int = 0) -> list[dict]:
    """``n`` preference records from plain synthetic chats (no tool calls, whose optional keys a datasets
    table would fill with None): prompt = a conversation up to its last answer, chosen = that answer,
    rejected = the last answer of the next conversation."""
    convs, batch = [], 0
    while len(convs) < n + 1:
        more = generate_conversations(2 * n + 2, mean_tokens=mean_tokens, seed=seed + 1000 * batch)
        convs += [c["messages"] for c in more if all(set(m) == {"role", "content"} for m in c["messages"])]
        batch += 1
    convs = [m for m in convs if m[-1]["role"] == "assistant"][: n + 1]
    return [
        {"prompt": m[:-1], "chosen": m[-1:], "rejected": convs[i + 1][-1:]} for i, m in enumerate(convs[:n])
    ]


def encode(records, tokenizer):
    from trainer.preference import encode_pairs

    return encode_pairs("synthetic", tokenizer, template="auto", max_length=1 << 20, records=records)


def trimmed(sequences) -> list[Encoded]:
    """The sequences without their last token (our template's end-of-turn marker after each answer): the
    tokens TRL's completion scores."""
    return [Encoded(s.input_ids[:-1], s.labels[:-1]) for s in sequences]


def init_adapter(model, seed: int = 0, b_std: float = 0.02) -> None:
    """Every LoRA matrix from one seeded generator, in name order: A uniform in +-1/sqrt(fan_in) (PEFT's
    range), B normal with ``b_std`` (PEFT starts it at 0: the policy would equal the reference)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name:
                bound = 1.0 / p.shape[1] ** 0.5
                p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * b_std)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=LORA.lora_r,
        lora_alpha=LORA.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _Memory:
    """Peak memory of what runs inside: CUDA allocator above the live memory at entry; CPU: the peak RSS
    (VmHWM, reset at entry through /proc/self/clear_refs) less the RSS at entry. Where the reset is not
    allowed, the process's maximum RSS (``resource.getrusage``, since the process began) less the RSS at
    entry: only meaningful in a fresh process whose set-up peaked lower."""

    def __init__(self, device):
        self.device, self.peak_mib = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
                self.reset = True
            except OSError:
                self.reset = False
            self.base = _status_mib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            peak = _status_mib("VmHWM") if self.reset else _maxrss_mib()
            self.peak_mib = peak - self.base


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status in MiB (Linux); elsewhere the maximum RSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return _maxrss_mib()


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ------------------------------------------------------------------------------------------------- ours


def run_ours(shape: str, settings: dict, device, *, layers=None) -> dict:
    """Our DPO step over ``1 + steps`` steps of ``pairs_per_step`` pairs each (the first a warm-up)."""
    from trainer.model import prepare_model
    from trainer.preference import PreferenceLoss, collate_pairs, pair_losses
    from tritrain_kernels import masked_linear_cross_entropy

    P, steps = settings["pairs_per_step"], settings["steps"]
    dtype = _dtype(device)
    tokenizer = load_tokenizer("demo")
    records = preference_records(P * (1 + steps), settings["mean_tokens"])
    sequences, summary = encode(records, tokenizer)
    assert summary.kept == len(records), summary.format()
    model, _, head = prepare_model(LORA, device=str(device), model=build_model(shape, device, dtype, layers))
    init_adapter(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    loss_fn = partial(masked_linear_cross_entropy, assume_valid=True)
    pref = PreferenceLoss("dpo", loss_fn, device, beta=BETA)
    rows = [list(range(k * P, (k + 1) * P)) for k in range(1 + steps)]
    batches = [collate_pairs(sequences, row).to(device) for row in rows]
    out = dict(provider="ours", pairs_per_step=P, steps=steps)

    def step(b):
        loss = pref.forward_backward(model, [(b, 1.0)], [b], head, device, autocast)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    times, cpu_times = [], []
    with _Memory(device) as mem:  # from the warm-up step on, as for TRL: AdamW's state is made in it
        out["step0_loss"] = step(batches[0]).item()  # the warm-up step
        for b in batches[1:]:
            t0, c0 = time.perf_counter(), time.process_time()
            step(b)
            _sync(device)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    out.update(
        times=times, cpu_times=cpu_times, peak_mib=mem.peak_mib, tokens=sum(b.num_tokens for b in batches[1:])
    )
    out["slots"] = out["tokens"]
    out["scored"] = sum(int(b.counts.sum()) for b in batches[1:])
    # step 0 (the adapter set back to its start; after the steps, so as not to count in their memory): our
    # loss on the first step's pairs, on our tokens and on TRL's (the end-of-turn token dropped)
    init_adapter(model)
    with torch.no_grad(), autocast:
        for name, seqs in (("", sequences), ("_trl_tokens", trimmed(sequences))):
            b = collate_pairs(seqs, rows[0]).to(device)
            policy, _ = pref.logps(model, b, head)
            reference = pref.reference(model, b, head)
            loss, chosen, rejected = pair_losses("dpo", policy, b.counts, reference, beta=BETA)
            out[f"loss0{name}"] = loss.mean().item()
            out[f"logps_chosen0{name}"] = policy[:, 0].mean().item()
            out[f"margin0{name}"] = (chosen - rejected).mean().item()
            out[f"scored0{name}"] = int(b.counts.sum())
    return out


# -------------------------------------------------------------------------------------------------- TRL


def run_trl(shape: str, settings: dict, device, variant: str = "trl", *, layers=None) -> dict:
    """TRL's ``DPOTrainer.train()`` over the same ``1 + steps`` steps (``variant``: trl, trl_no_gc,
    trl_padding_free); each step timed between its ``on_step_begin`` and ``on_step_end`` callbacks."""
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    P, steps = settings["pairs_per_step"], settings["steps"]
    dtype = _dtype(device)
    tokenizer = load_tokenizer("demo")
    records = preference_records(P * (1 + steps), settings["mean_tokens"])
    out = dict(provider=variant, pairs_per_step=P, steps=steps)

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.cpu_times, self.mem = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:  # from the warm-up step on (AdamW's state is made in it)
                self.mem = _Memory(device).__enter__()
            _sync(device)
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.times.append(time.perf_counter() - self.t0)
            self.cpu_times.append(time.process_time() - self.c0)

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=P, max_steps=1 + steps, learning_rate=LR, beta=BETA,
            max_length=None, train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
            report_to=[], disable_tqdm=True, bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu",
            gradient_checkpointing=variant != "trl_no_gc", padding_free=variant == "trl_padding_free",
            dataloader_num_workers=0, seed=0,
        )  # fmt: skip
        model = build_model(shape, device, dtype, layers)
        timer = Timer()
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
            peft_config=lora_config(), callbacks=[timer],
        )  # fmt: skip
        trainer.remove_callback(transformers.PrinterCallback)  # its per-step log lines
        if variant == "trl_padding_free" and not trainer.padding_free:
            out["note"] = (
                "padding_free=True: TRL falls back to padding for DPO (trainer.padding_free is False)"
            )
            return out
        init_adapter(trainer.model)
        data = trainer.train_dataset
        ids = list(zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True))
        lengths = [(len(p), len(c), len(r)) for p, c, r in ids]
        ours, _ = encode(records, tokenizer)
        same = sum(
            list(p) + list(x) == ours[2 * i + j].input_ids[:-1]
            for i, (p, c, r) in enumerate(ids)
            for j, x in enumerate((c, r))
        )
        out["same_tokens_as_ours_trimmed"] = f"{same}/{2 * len(lengths)}"
        trainer.train()
    log = trainer.state.log_history[0]
    out.update(
        step0_loss=log["loss"], logps_chosen0=log.get("logps/chosen"), margin0=log.get("rewards/margins")
    )
    timed = [lengths[k * P : (k + 1) * P] for k in range(1, 1 + steps)]
    out["tokens"] = sum(2 * p + c + r for step in timed for p, c, r in step)
    out["slots"] = sum(2 * P * max(p + max(c, r) for p, c, r in step) for step in timed)
    out["scored"] = sum(c + r for step in timed for _, c, r in step)
    out["scored0"] = sum(c + r for _, c, r in lengths[:P])
    if timer.mem is not None:
        timer.mem.__exit__(None, None, None)
    out.update(
        times=timer.times[1:],
        cpu_times=timer.cpu_times[1:],
        peak_mib=timer.mem.peak_mib if timer.mem else float("nan"),
    )
    return out


def run_provider(provider: str, shape: str, settings: dict, device, *, layers=None) -> dict:
    if provider == "ours":
        return run_ours(shape, settings, device, layers=layers)
    return run_trl(shape, settings, device, provider, layers=layers)


def summarise(r: dict) -> dict:
    """ms per step (mean and best of the timed steps), real tokens per second, process CPU s per step (all
    threads: less disturbed by other processes than wall time on shared cores)."""
    times, cpu = r.get("times") or [], r.get("cpu_times") or []
    if not times:
        return dict(ms_per_step=float("nan"), best_ms=float("nan"), tokens_per_s=float("nan"),
                    cpu_s_per_step=float("nan"))  # fmt: skip
    return dict(ms_per_step=1e3 * sum(times) / len(times), best_ms=1e3 * min(times),
                tokens_per_s=r["tokens"] / sum(times),
                cpu_s_per_step=sum(cpu) / len(cpu) if cpu else float("nan"))  # fmt: skip


# ----------------------------------------------------------------------------------------------- script


def environment(device) -> dict:
    import peft
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "absent"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return dict(
        device=name, torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
        trl=trl_version, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=git_commit(("tritrain_kernels", "trainer", "bench/bench_preference.py")),
        cpu_threads=torch.get_num_threads(), load_average=" ".join(f"{x:.2f}" for x in os.getloadavg()),
    )  # fmt: skip


def _child(provider: str, args) -> dict:
    """One provider in a fresh process (its own peak RSS); its result is the last line of its stdout."""
    cmd = [sys.executable, __file__, "--provider", provider, "--device", args.device, "--shape", args.shape]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--layers", str(args.layers)] if args.layers else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--steps", str(args.steps)] if args.steps else []
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-1:])[:300]
        return dict(provider=provider, note=f"failed (exit {done.returncode}): {tail}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default=None,
                   help="model shape (default: cpu-small on CPU, qwen2.5-1.5b on CUDA)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--quick", action="store_true", help="fewer and shorter pairs")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: the shape's)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--provider", choices=PROVIDERS, help=argparse.SUPPRESS)  # one provider, JSON out (child)
    args = p.parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    args.device = device.type
    args.shape = args.shape or ("qwen2.5-1.5b" if device.type == "cuda" else "cpu-small")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(SETTINGS[args.shape], **(QUICK.get(args.shape, {}) if args.quick else {}))
    settings["steps"] = args.steps or settings["steps"]
    if args.provider:
        result = run_provider(args.provider, args.shape, settings, device, layers=args.layers)
        print(json.dumps(result))
        return 0

    env = environment(device)
    results = [_child(provider, args) for provider in args.providers]
    env["load_average_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(report(results, args, settings, env))
    return 0 if all("failed" not in r.get("note", "") for r in results) else 1


def report(results: list[dict], args, settings: dict, env: dict) -> str:
    dtype = str(_dtype(torch.device(args.device))).removeprefix("torch.")
    layers = f" ({args.layers} layers)" if args.layers else ""
    P, steps = settings["pairs_per_step"], settings["steps"]
    lines = [
        f"shape {args.shape}{layers}, {dtype}, LoRA r={LORA.lora_r} all-linear, DPO beta={BETA}; {P} pairs "
        f"per step, {steps} timed steps after one warm-up step (conversations' mean length "
        f"{settings['mean_tokens']})",
        "",
        "| provider | real tokens (timed) | token slots | scored tokens | ms/step (mean) | ms/step (best) "
        "| real tokens/s | process CPU s/step | peak memory MiB | step-0 loss | step-0 mean chosen log-prob "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mem = "RSS delta" if args.device == "cpu" else "CUDA peak"
    for r in results:
        s = summarise(r)
        note = r.get("note", "")
        if "same_tokens_as_ours_trimmed" in r:
            note = (note + "; " if note else "") + f"sequences equal to ours minus the end-of-turn token: " \
                   f"{r['same_tokens_as_ours_trimmed']}"  # fmt: skip
        lines.append(
            f"| {r['provider']} | {r.get('tokens', '')} | {r.get('slots', '')} | {r.get('scored', '')} "
            f"| {s['ms_per_step']:.0f} | {s['best_ms']:.0f} | {s['tokens_per_s']:.0f} "
            f"| {_num(s['cpu_s_per_step'], 1)} | {_num(r.get('peak_mib'))} "
            f"| {_num(r.get('step0_loss'), 6)} | {_num(r.get('logps_chosen0'), 3)} | {note} |"
        )
    ours = next((r for r in results if r["provider"] == "ours" and "times" in r), None)
    if ours:
        lines += [
            "",
            f"peak memory: {mem} from the warm-up step to the last step, each provider in a fresh process",
        ]
        lines.append(
            f"step-0 check (the first step's pairs, before any update): ours {ours['loss0']:.6f} on its "
            f"{ours['scored0']} scored tokens; ours {ours['loss0_trl_tokens']:.6f} on TRL's tokens "
            f"({ours['scored0_trl_tokens']} scored: the end-of-turn token after each answer dropped; "
            f"mean chosen log-prob {ours['logps_chosen0_trl_tokens']:.3f}, "
            f"margin {ours['margin0_trl_tokens']:.5f})"
        )
        for r in results:
            if r["provider"].startswith("trl") and "step0_loss" in r:
                diff = abs(r["step0_loss"] - ours["loss0_trl_tokens"]) / abs(ours["loss0_trl_tokens"])
                lines.append(
                    f"  {r['provider']}: {r['step0_loss']:.6f} on {r['scored0']} scored tokens, margin "
                    f"{r['margin0']:.5f}; relative difference to ours on the same tokens {diff:.1e}"
                )
        for r in results:
            if r["provider"].startswith("trl") and "times" in r:
                ratio = summarise(ours)["tokens_per_s"] / summarise(r)["tokens_per_s"]
                cpu = summarise(r)["cpu_s_per_step"] / summarise(ours)["cpu_s_per_step"]
                lines.append(
                    f"ratio ours / {r['provider']}: real tokens/s {ratio:.2f}x; process CPU s per step "
                    f"{r['provider']} / ours {cpu:.2f}x (token counts differ by under 1%)"
                )
    for r in results:
        if r.get("times"):
            lines.append(f"{r['provider']}: timed steps, s: {[round(t, 2) for t in r['times']]}, "
                         f"process wall {r.get('process_s', float('nan')):.0f} s")  # fmt: skip
    lines += [""] + [f"{k}: {v}" for k, v in env.items()]
    return "\n".join(lines)


def _num(v, digits=0) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return f"{v:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
