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
KNOWN_FAIL: dict[str, str] = {}
DEFAULT = {
    "llama": "pass",
    "lfm2": "refused",  # built with its short-convolution layers (the default config has none)
    "doge": "refused",  # at start: its attention builds its own mask
    "qwen3_next": "pass",  # Gated DeltaNet layers packed (trainer.model.enable_packed_linear_attention)
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


def test_a_hybrid_is_built_with_its_other_layers():
    """LFM2's default config is all attention: cut to 2 layers it passed as attention-only. The sweep builds
    it with its short convolutions, which convolve across packed conversations and are refused."""
    model = arch_sweep.build("lfm2", 64)
    assert {"Lfm2ShortConv", "Lfm2Attention"} <= {type(m).__name__ for m in model.modules()}


def test_a_refusal_after_setup_is_a_failure(monkeypatch):
    """Refusals count only at start: one raised while check runs (Doge and Nemotron before) is a defect."""
    import trainer.check as check_module

    def refuse(*args, **kwargs):
        raise ValueError("refused while running")

    monkeypatch.setattr(check_module, "forward_backward", refuse)
    row = arch_sweep.sweep_one("llama")
    assert row["outcome"] == "FAIL" and "refused only after setup" in row["reason"], row


def test_the_readme_table_is_the_recorded_sweep():
    """README.md's architecture table is generated (`python bench/arch_sweep.py --readme --write`)."""
    rows = json.loads((BENCH / "arch_sweep.json").read_text())
    assert arch_sweep.readme_section(arch_sweep.README.read_text()) == arch_sweep.readme_table(rows)
