"""FSDP loading (trainer/sharded_load.py): no rank but rank 0 ever holds the whole model, and only on the
host; the skeleton every rank builds on the meta device plans attention exactly as the probed model does.

The multi-process test runs this file as the torchrun script: each rank reports its peak resident memory
above what it held before setup began."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _worker(out: Path, args: list[str]) -> int:
    """One torchrun rank: the trainer's main, recording this rank's peak resident memory from the start of
    the model's setup to its shards filled, above what it held before (Linux's VmHWM, reset there)."""
    import peft  # noqa: F401  what the setup imports, imported before the baseline
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.glm4.modeling_glm4  # noqa: F401

    import trainer.train as train
    from trainer.__main__ import main

    seen = {}
    setup_model, fill_shards = train.setup_model, train.fill_shards

    def measured_setup_model(*a, **kw):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        seen["before"] = _status("VmRSS")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        done = setup_model(*a, **kw)
        _peaks()
        return done

    def _peaks():
        seen["peak"] = _status("VmHWM")
        if torch.cuda.is_available():
            seen["device_peak"] = torch.cuda.max_memory_allocated()

    def measured_fill_shards(*a, **kw):
        fill_shards(*a, **kw)
        _peaks()

    train.setup_model, train.fill_shards = measured_setup_model, measured_fill_shards
    code = main(args)
    (out / f"rss-rank{os.environ['RANK']}.json").write_text(json.dumps({**seen, "code": code}))
    return code


def _tiny_model_dir(path: Path, layers: int = 10) -> int:
    """A random GLM-4 of ~140 MB (fp32, 10 layers) with the demo tokenizer, saved as a model directory (also
    bench/gpu_suite.py's FSDP load on two GPUs); its bytes."""
    from transformers import Glm4Config, Glm4ForCausalLM

    from trainer.data import load_tokenizer

    tokenizer = load_tokenizer("demo")
    spec = json.loads((ROOT / "trainer" / "assets" / "demo_model.json").read_text())
    spec.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64, vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = Glm4ForCausalLM(Glm4Config(**spec))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun ranks training a 160 MB model one step (~40 s on 2 CPU cores)
def test_fsdp_ranks_never_hold_the_whole_model(tmp_path):
    size = _tiny_model_dir(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join((ROOT / "trainer" / "assets" / "demo_train.jsonl").open().readlines()[:8]))
    args = ["--model", str(tmp_path / "model"), "--device", "cpu", "--parallel", "fsdp", "--max-steps", "1",
            "--max-tokens", "256", "--max-length", "256", "--train-file", str(data), "--output-dir",
            str(tmp_path / "out"), "--save-every", "0"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), __file__, str(tmp_path), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    grown = {}
    for rank in (0, 1):
        rss = json.loads((tmp_path / f"rss-rank{rank}.json").read_text())
        grown[rank] = rss["peak"] - rss["before"]
    # rank 1 holds its half of the weights (and LoRA, the bookkeeping), never the whole model; rank 0
    # holds the host copy it sends from, once
    assert grown[1] < 0.85 * size, (grown, size)
    assert grown[0] < 2.0 * size, (grown, size)


def _exaone4(layer_types: list[str]):
    """A tiny EXAONE 4: a window on every layer's module, its forward deciding per layer (``is_sliding``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "exaone4", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16, layer_types=layer_types,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _plan(model) -> list:
    from trainer.model import _NEEDS_ATTR

    return [getattr(m, _NEEDS_ATTR) for m in model.modules() if hasattr(m, _NEEDS_ATTR)]


@pytest.mark.parametrize("with_record", [True, False])
def test_a_skeleton_plans_as_the_probed_model(with_record):
    """A meta-device copy marked with the probed model's record gets its per-layer plan; without the record
    it would read the modules' attributes and plan a window on every layer."""
    from transformers import AutoModelForCausalLM

    from trainer.model import enable_varlen_attention, probe_record, set_probe_record

    real = _exaone4(["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(real.config)
    enable_varlen_attention(real)
    if with_record:
        set_probe_record(skeleton, probe_record(real))
    enable_varlen_attention(skeleton, device=torch.device("cpu"))
    windows = [needs.window for needs in _plan(real)]
    assert windows == [16, None, 16, None]
    assert (_plan(skeleton) == _plan(real)) is with_record


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1]), sys.argv[2:]))
