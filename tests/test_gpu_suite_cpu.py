"""The GPU suite's CPU dry run (``bench/gpu_suite.py --device cpu --tiny``): every section runs and passes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_tiny_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "gpu_suite.py"),
        "--device",
        "cpu",
        "--tiny",
        "--out",
        str(tmp_path),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    sections = json.loads((tmp_path / "gpu_suite.json").read_text())
    status = {s["name"]: (s["status"], s["notes"]) for s in sections}
    assert res.returncode == 0, (status, res.stdout[-3000:], res.stderr[-3000:])
    names = " | ".join(status)
    expected = ("environment", "correctness: masked CE", "correctness: attention", "sync-free",
                "masked CE fwd+bwd", "attention fwd+bwd", "LoRA step", "short training run", "FSDP2 step",
                "QLoRA step")  # fmt: skip
    for part in expected:
        assert part in names, names
    assert all(s["status"] == "ok" for s in sections), status
    rows = {s["name"].split(",")[0]: s["rows"] for s in sections}
    providers = {r["provider"] for r in rows["masked CE fwd+bwd"]}
    assert {"ours", "reference (full fp32 logits)"} <= providers
    assert all(r["ms"] > 0 for r in rows["masked CE fwd+bwd"])
    assert rows["sync-free step"][0]["syncs"] == 0
    assert {"ours", "hf_padded"} <= {r["provider"] for r in rows["LoRA step"]}
    assert (
        "gpu_suite" in (tmp_path / "gpu_suite.md").name
        and "| provider |" in (tmp_path / "gpu_suite.md").read_text()
    )
