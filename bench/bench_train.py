"""Training-step throughput: this project's path against the padded Hugging Face path, same model and data.

    python bench/bench_train.py                                  # CPU: small GLM-4-style model, fp32
    python bench/bench_train.py --shape qwen2.5-1.5b             # CUDA: Qwen2.5-1.5B's shape, bf16
    python -m pytest bench/bench_train.py --benchmark-only

One step = forward + backward + AdamW step on a LoRA adapter (r=16, every attention and MLP projection):

- ``ours``: one packed row (``trainer.packing``), varlen attention, fused masked loss on the decoder's
  hidden states (``trainer.train.forward_backward``, what training runs);
- ``hf_padded``: the same conversations right-padded to the longest (``pad_collate``), sdpa with an
  ``attention_mask``, the head and an fp32 cross-entropy on every position (``check.padded_loss_sum``):
  as ``model(..., labels=...)`` computes it, but over checkpointed chunks of positions, so that the
  ``[B, L, V]`` logits and their fp32 copy (~217 GB at 24 x 5943 positions, V=151,936) never exist.

Data: ``trainer.assets.synthetic.generate_conversations`` (log-normal lengths, ~30% of tokens assistant
text, a fifth with a tool call, a fifth in Chinese) encoded with the demo tokenizer (GLM-4 labels). Its
ids fit any vocabulary of 32k or more, so the models are built from configs with random weights.
Throughput is real (non-pad) tokens per second of wall time, the same token count for both paths.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/bench_train.py` from anywhere

from benchutil import git_commit  # noqa: E402
from trainer.assets.synthetic import generate_conversations, write_jsonl  # noqa: E402
from trainer.check import HF_LOSS_NOTE, hf_loss_chunk_rows, padded_loss_sum  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.data import encode_file, load_tokenizer  # noqa: E402
from trainer.model import enable_varlen_attention, prepare_model  # noqa: E402
from trainer.packing import make_packed_batches, pad_collate  # noqa: E402
from trainer.train import forward_backward  # noqa: E402
from tritrain_kernels import masked_linear_cross_entropy  # noqa: E402

# Model shapes. "cpu-small": hidden 384, vocab 32000: small enough for 2 CPU cores, with a vocabulary
# large enough that the head weighs as it does in real models. "qwen2.5-1.5b": Qwen2.5-1.5B's config
# (random weights), for a GPU.
SHAPES = {
    "cpu-small": dict(
        model_type="glm4", vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, head_dim=64, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
    ),
    "llama3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "tiny": dict(  # the GPU suite's CPU dry run: the same code paths at toy size
        model_type="qwen2", vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False,
    ),
}  # fmt: skip
# Per shape: conversations in the timed set, their mean length, tokens per packed row (ours), and
# conversations per padded batch (HF: about the same real tokens per step, in shuffled data order).
SETTINGS = {
    "cpu-small": dict(conversations=24, mean_tokens=700, max_tokens=4096, batch_size=6),
    "qwen2.5-1.5b": dict(conversations=256, mean_tokens=700, max_tokens=16384, batch_size=24),
    "llama3-8b": dict(conversations=256, mean_tokens=700, max_tokens=16384, batch_size=24),
    "tiny": dict(conversations=4, mean_tokens=80, max_tokens=1024, batch_size=2),
}
LORA = TrainConfig(lora_r=16, lora_alpha=32.0, lora_dropout=0.0)
PROVIDERS = ("ours", "hf_padded")


def build_model(shape: str, device: torch.device, dtype: torch.dtype, num_layers: int | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    if num_layers:
        spec["num_hidden_layers"] = num_layers
    config = AutoConfig.for_model(**spec, use_cache=False, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def build_batches(settings: dict, seed: int = 0):
    """The same conversations two ways: packed rows (best-fit-decreasing, as training packs them) and
    padded batches of ``batch_size`` conversations in shuffled order, each padded to its longest."""
    tokenizer = load_tokenizer("demo")
    convs = generate_conversations(settings["conversations"], mean_tokens=settings["mean_tokens"], seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        write_jsonl(convs, path)
        data, summary = encode_file(
            path, tokenizer, max_length=settings["max_tokens"], num_workers=1, cache_dir=False, progress=False
        )
    packed = make_packed_batches(data, settings["max_tokens"], seed=seed)
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    bs = settings["batch_size"]
    padded = [
        pad_collate([data[i] for i in order[j : j + bs]], tokenizer.pad_token_id)
        for j in range(0, len(order), bs)
    ]
    return packed, padded, summary


class Bench:
    """One model with a LoRA adapter and the timed set of conversations, packed and padded."""

    def __init__(self, shape: str, device: torch.device, *, num_layers: int | None = None,
                 conversations: int | None = None):  # fmt: skip
        self.device = device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.settings = dict(SETTINGS[shape], **({"conversations": conversations} if conversations else {}))
        model = build_model(shape, device, self.dtype, num_layers)
        self.model, _, self.head = prepare_model(LORA, device=str(device), model=model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, fused=device.type == "cuda")
        amp = self.dtype != torch.float32
        self.autocast = torch.autocast(device.type, dtype=self.dtype) if amp else nullcontext()
        packed, padded, self.summary = build_batches(self.settings)
        self.batches = {"ours": [b.to(device) for b in packed], "hf_padded": [b.to(device) for b in padded]}
        self.tokens = sum(b.num_tokens for b in packed)
        assert self.tokens == sum(b.num_tokens for b in padded)  # same conversations both ways
        self.base = self.model.get_base_model()
        self.default_attn = "sdpa"  # transformers' default; prepare_model installed varlen attention

    def use(self, provider: str) -> None:
        if provider == "ours":
            enable_varlen_attention(self.model)
        else:
            self.base.set_attn_implementation(self.default_attn)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, provider: str, b) -> None:
        """One optimizer step on one packed row (ours) or one padded batch (hf_padded)."""
        if provider == "ours":
            forward_backward(
                self.model, [b], self.head, masked_linear_cross_entropy, self.device, self.autocast
            )
        else:
            loss = padded_loss_sum(self.model, b, self.head, self.autocast) / max(1, b.num_loss_tokens)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def epoch(self, provider: str) -> None:
        """Every conversation of the timed set once; synchronised at the end."""
        for b in self.batches[provider]:
            self.step(provider, b)
        self.sync()

    def run(self, repeats: int = 2) -> dict:
        """Warm up each provider on one step, then time ``repeats`` passes over the set, alternating the
        providers so that both see the same background load; per provider, the best pass counts. Also
        records process CPU seconds (all threads), which background load disturbs less than wall time."""
        for provider in PROVIDERS:
            self.use(provider)
            self.step(provider, self.batches[provider][0])
            self.sync()
        results = {p: dict(times=[], cpu_times=[]) for p in PROVIDERS}
        for _ in range(repeats):
            for provider in PROVIDERS:
                self.use(provider)
                t0, c0 = time.perf_counter(), time.process_time()
                self.epoch(provider)
                results[provider]["times"].append(time.perf_counter() - t0)
                results[provider]["cpu_times"].append(time.process_time() - c0)
        for r in results.values():
            r["seconds"], r["cpu_seconds"] = min(r["times"]), min(r["cpu_times"])
            r["tokens_per_s"] = self.tokens / r["seconds"]
        return results

    def slots(self, provider: str) -> int:
        return sum(b.input_ids.numel() for b in self.batches[provider])


def environment(device: torch.device) -> dict:
    import transformers

    commit = git_commit(("tritrain_kernels", "trainer", "bench/bench_train.py"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return dict(
        device=name,
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=commit,
        load_average=" ".join(f"{x:.2f}" for x in os.getloadavg()),
    )


# ------------------------------------------------------------------------------------ pytest-benchmark

try:
    import pytest
except ImportError:  # the script does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def bench():
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            return Bench("qwen2.5-1.5b", device)
        return Bench("cpu-small", device, conversations=12)  # half the script's set: a quicker CPU run

    @pytest.mark.parametrize("provider", PROVIDERS)
    def test_train_step(benchmark, bench, provider):
        bench.use(provider)
        rounds = 3 if bench.device.type == "cuda" else 1
        benchmark.pedantic(bench.epoch, args=(provider,), rounds=rounds, iterations=1, warmup_rounds=1)
        benchmark.extra_info["real_tokens"] = bench.tokens
        benchmark.extra_info["computed_slots"] = bench.slots(provider)
        benchmark.extra_info["steps"] = len(bench.batches[provider])
        if benchmark.stats is not None:  # None under --benchmark-disable
            benchmark.extra_info["tokens_per_s"] = bench.tokens / benchmark.stats.stats.min


# ------------------------------------------------------------------------------------------------ script


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default=None,
                   help="model shape (default: cpu-small on CPU, qwen2.5-1.5b on CUDA)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--conversations", type=int, default=None, help="size of the timed set of conversations")
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the set; the best counts")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (smoke tests)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch's); 1 is steadier on shared cores",
    )
    args = p.parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    shape = args.shape or ("qwen2.5-1.5b" if device.type == "cuda" else "cpu-small")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    env["cpu_threads"] = torch.get_num_threads()
    bench = Bench(shape, device, num_layers=args.layers, conversations=args.conversations)
    results = bench.run(args.repeats)
    env["load_average_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    s = bench.settings
    layers = f" ({args.layers} layers)" if args.layers else ""
    print(f"shape {shape}{layers}, {str(bench.dtype).removeprefix('torch.')}, LoRA r={LORA.lora_r}, "
          f"{s['conversations']} conversations, {bench.tokens} real tokens, "
          f"{100 * bench.summary.label_fraction:.1f}% labelled")  # fmt: skip
    print("| provider | steps | computed token slots | wall s (best pass) | real tokens/s | process CPU s |")
    print("|---|---|---|---|---|---|")
    for provider, r in results.items():
        print(f"| {provider} | {len(bench.batches[provider])} | {bench.slots(provider)} | {r['seconds']:.2f} "
              f"| {r['tokens_per_s']:.0f} | {r['cpu_seconds']:.1f} |")  # fmt: skip
    print(f"hf_padded {HF_LOSS_NOTE.format(chunk=hf_loss_chunk_rows(bench.head[0].shape[0]))}")
    ratio = results["ours"]["tokens_per_s"] / results["hf_padded"]["tokens_per_s"]
    print(f"ratio ours / hf_padded: {ratio:.2f}x")
    cpu_ratio = results["hf_padded"]["cpu_seconds"] / results["ours"]["cpu_seconds"]
    print(f"ratio of process CPU seconds hf_padded / ours: {cpu_ratio:.2f}x")
    passes = ", ".join(f"{p} {[round(t, 2) for t in r['times']]}" for p, r in results.items())
    print(f"all passes, wall s: {passes}")
    for key, value in env.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
