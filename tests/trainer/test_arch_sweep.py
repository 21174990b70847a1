"""`check` over every causal-LM family of the installed transformers (bench/arch_sweep.py): no family may
FAIL (a traceback, or losses/gradients that differ); it passes, is refused at start in one line, or cannot
be built tiny. The whole mapping is slow; one family per outcome runs by default, and so does every family
the recorded sweep (bench/arch_sweep.json) has not seen: a new transformers release's new families."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import arch_sweep  # noqa: E402

RECORDED = {r["model_type"]: r for r in json.loads((BENCH / "arch_sweep.json").read_text())}
# Defects found by the sweep, not fixed yet (bench/RESULTS.md): xfail(strict) so a fix is noticed.
KNOWN_FAIL = {
    "electra": "its head projects from the embedding size, not hidden_size",
    "rembert": "its head projects from the output embedding size, not hidden_size",
    "inkling2_text": "index out of range in the probe forward",
    "inkling2_loop_text": "index out of range in the probe forward",
    "modernbert-decoder": "its decoder is called with input_ids by keyword",
}
DEFAULT = {
    "llama": "pass",
    "qwen3_next": "refused",
    "bloom": "refused",
    "blt": "not built",
    "t5": "not built",
}
NEW = sorted(set(arch_sweep.families()) - set(RECORDED))


def _param(model_type: str):
    marks = [] if model_type in DEFAULT or model_type in NEW else [pytest.mark.slow]
    if model_type in KNOWN_FAIL:
        marks.append(pytest.mark.xfail(reason=KNOWN_FAIL[model_type], strict=True))
    return pytest.param(model_type, marks=marks)


@pytest.mark.parametrize("model_type", [_param(t) for t in arch_sweep.families()])
def test_no_family_fails(model_type):
    row = arch_sweep.sweep_one(model_type)
    assert row["outcome"] != "FAIL", row
    if model_type in DEFAULT:
        assert row["outcome"] == DEFAULT[model_type], row
    if row["outcome"] == "refused":
        assert "\n" not in row["reason"], row
