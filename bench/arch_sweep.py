"""Architecture sweep: `check` on a tiny random model of every family in the installed transformers'
``MODEL_FOR_CAUSAL_LM_MAPPING``, so that a new release's new families are tried without anyone listing them.

Each family is built from its own config class with the tiny sizes of ``tests/trainer/test_architectures.py``
(hidden 64, 2 layers, 4 heads, 2 key/value heads, head dim 16, 4 experts, the demo tokenizer's vocabulary)
and goes through the same ``run_check`` as ``python -m trainer check``: the packed/varlen/fused loss and LoRA
gradients against transformers' own padded path, fp32. One row per family:

- ``pass``: check passed;
- ``refused``: setup refused it in one line (the line is the reason);
- ``not built``: no tiny model could be made from its config alone (composite configs, encoder-decoder
  families, configs that need fields no other family has): the reason is kept;
- ``FAIL``: check ran and the losses or gradients differ, or setup raised something other than a one-line
  refusal: a defect.

    python bench/arch_sweep.py --markdown            # every family, a table (about 10 min on 2 CPU cores)
    python bench/arch_sweep.py llama exaone4 phimoe  # some families
    python bench/arch_sweep.py --readme --write      # README.md's table from bench/arch_sweep.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=1024, attention_dropout=0.0, initializer_range=0.1,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
    # MLA (DeepSeek-V3 and its descendants): q/k head dim 32 = 16 without rotary + 16 rotary, v head dim 16
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
    index_head_dim=32, index_n_heads=2, full_attention_interval=2,
)  # fmt: skip
ARGV = ["--device", "cpu", "--tokenizer", "demo", "--max-tokens", "320", "--max-length", "160",
        "--lora-dropout", "0"]  # fmt: skip


def families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def build(model_type: str, vocab: int):
    """A tiny random model of ``model_type``, or the reason there is none."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = dict(pad_token_id=0, eos_token_id=0, bos_token_id=0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab, **ids, **TINY)
    if hasattr(config, "kv_lora_rank"):  # MLA expands its latent kv to every head: no GQA
        config.num_key_value_heads = config.num_attention_heads
    if getattr(config, "is_encoder_decoder", False):
        raise LookupError("encoder-decoder: not a decoder-only causal LM")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config or getattr(text, "hidden_size", 64) > 256:
        raise LookupError("composite config (a nested text config): not built tiny from its config alone")
    with torch.device("meta"):  # sized before any memory is spent: some configs ignore the tiny sizes
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        _with_every_layer_kind(config, AutoModelForCausalLM.from_config(config))
    if size > 20_000_000:
        raise LookupError(f"its config ignores the tiny sizes ({size / 1e6:.0f}M parameters)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    try:
        with torch.no_grad():
            model(torch.arange(1, 9)[None])
    except Exception as e:  # noqa: BLE001  the family's own forward, before anything of ours is installed
        raise LookupError(f"its own forward fails at the tiny sizes ({_one_line(e)})") from None
    return model


ATTENTION_KINDS = ("full_attention", "sliding_attention")


# layer_types names of token mixers other than attention across transformers' families, tried when the
# family's sources do not name one on a line with `layer_types`
_MIXER_KINDS = ("conv", "linear_attention", "mamba", "hybrid", "recurrent")


def _with_every_layer_kind(config, model) -> None:
    """Make a hybrid's tiny config build its non-attention layers. A default config cut to 2 layers may build
    none: LFM2's default is all attention, so it passed as attention-only and its short convolutions, which
    mix tokens across packed conversations, were never tried. A family whose modeling module defines a
    token mixer other than attention (``trainer.model.is_other_mixer``) that the tiny model lacks gets 4
    layers alternating between a non-attention kind (one of its ``layer_types``, else one its sources
    compare ``layer_types`` with) and full attention; LookupError if none builds the mixer."""
    import inspect
    import re

    import torch
    from transformers import AutoModelForCausalLM

    from trainer.model import is_other_mixer

    module = inspect.getmodule(type(model))
    defined = {
        n
        for n, c in vars(module).items()
        if inspect.isclass(c) and issubclass(c, torch.nn.Module) and is_other_mixer(n)
    }
    if not defined or any(type(m).__name__ in defined for m in model.modules()):
        return
    others = sorted({k for k in getattr(config, "layer_types", None) or () if k not in ATTENTION_KINDS})
    if not others:
        sources = inspect.getsource(module) + inspect.getsource(inspect.getmodule(type(config)))
        quoted = (
            re.findall(r"[\"'](\w+)[\"']", line) for line in sources.splitlines() if "layer_types" in line
        )
        others = sorted({k for words in quoted for k in words if k not in ATTENTION_KINDS})
    others = others or list(_MIXER_KINDS)  # older sources spell it on another line (LFM2 in 5.21: "conv")
    per_layer = {
        k: v for k, v in vars(config).items() if isinstance(v, list) and len(v) == config.num_hidden_layers
    }
    for name, value in per_layer.items():  # other per-layer lists (Kimi Linear's mlp_layer_types): 4 long
        setattr(config, name, (value * 4)[:4])
    for kind in others:
        config.num_hidden_layers, config.layer_types = 4, [kind, "full_attention"] * 2
        if hasattr(config, "full_attn_idxs"):  # LFM2 derives layer_types from it, and keeps both
            config.full_attn_idxs = [1, 3]
        try:
            with torch.device("meta"):
                built = AutoModelForCausalLM.from_config(config)
        except Exception:  # noqa: BLE001  a string that is not a layer kind of this family
            continue
        if any(type(m).__name__ in defined for m in built.modules()):
            return
    raise LookupError(
        f"its tiny config builds no {', '.join(sorted(defined))} layer (tried layer_types {others})"
    )


def sweep_one(model_type: str) -> dict:
    import trainer.check as check_module
    import trainer.model as model_module
    from trainer.check import run_check
    from trainer.config import load_config
    from trainer.data import load_tokenizer

    start = time.perf_counter()
    row = dict(model_type=model_type)
    try:
        model = build(model_type, len(load_tokenizer("demo")))
    except Exception as e:  # noqa: BLE001  any reason a family cannot be built is reported, not raised
        return dict(row, outcome="not built", reason=_one_line(e), seconds=time.perf_counter() - start)
    saved, set_up = check_module.prepare_model, []

    def prepare_model(*args, **kwargs):  # notes that setup is over: a refusal after it is a runtime failure
        prepared = model_module.prepare_model(*args, model=model, **kwargs)
        set_up.append(True)
        return prepared

    check_module.prepare_model = prepare_model
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_check(load_config([*ARGV, "--model", f"tiny-{model_type}"]), num_batches=1)
        row["outcome"] = "pass" if result["passed"] else "FAIL"
        row["reason"] = "" if result["passed"] else f"loss rel {result['loss_rel_diff']:.2e}, grad rel " \
                                                    f"{result['grad_rel_diff']:.2e}"  # fmt: skip
        row["plan"] = "; ".join(line for line in out.getvalue().splitlines() if line.startswith("attention"))
    except ValueError as e:  # setup's refusals are ValueError (ConfigError included), one line, at start
        at_start = "\n" not in str(e) and not set_up
        row.update(outcome="refused" if at_start else "FAIL", reason=_one_line(e))
        if set_up:
            row["reason"] = f"refused only after setup, while running: {row['reason']}"
    except Exception as e:  # noqa: BLE001  a traceback a user would see: the defect this sweep looks for
        row.update(outcome="FAIL", reason=_one_line(e))
    finally:
        check_module.prepare_model = saved
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def markdown(rows: list[dict]) -> str:
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("pass", "refused", "not built", "FAIL")}
    lines = [", ".join(f"{v} {k}" for k, v in counts.items()), "", "| model_type | outcome | reason / plan |",
             "|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| `{r['model_type']}` | {r['outcome']} | {r.get('reason') or r.get('plan', '')} |")
    return "\n".join(lines)


# Refusal reasons grouped for the README: (a phrase of the one-line reason, the group's name).
REFUSAL_GROUPS = (
    ("besides attention", "other layer kinds besides attention"),
    ("not lm_head(final hidden states)", "logits are not lm_head(final hidden states)"),
    ("not a plain nn.Linear", "lm_head is not a plain `nn.Linear`"),
    ("rescales the logits", "logits rescaled by the config"),
    ("through transformers.AttentionInterface", "attention not dispatched through `AttentionInterface`"),
    ("handed neither cu_seq_lens_q/k nor position_ids", "attention is told no conversation boundaries"),
    ("builds its own attention mask", "attention builds its own mask"),
    ("attention_chunk_size", "chunked local attention (`attention_chunk_size`)"),
    ("ALiBi", "ALiBi position biases"),
)
README = Path(__file__).resolve().parents[1] / "README.md"
README_BEGIN = "<!-- begin: generated by `python bench/arch_sweep.py --readme` from bench/arch_sweep.json -->"
README_END = "<!-- end: generated -->"


def _refusal_group(reason: str) -> str:
    return next((group for phrase, group in REFUSAL_GROUPS if phrase in reason), reason.split(": ", 1)[-1])


def readme_table(rows: list[dict]) -> str:
    """The README's architecture sweep table (between :data:`README_BEGIN` and :data:`README_END`), from the
    recorded rows: one line of totals, then the families by outcome, refusals grouped by reason."""
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("pass", "refused", "not built", "FAIL")}
    groups: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: r["model_type"]):
        outcome = r["outcome"]
        if outcome == "refused":
            outcome = f"refused: {_refusal_group(r['reason'])}"
        elif outcome == "not built":
            outcome = "not built tiny (reasons in `bench/arch_sweep.json`)"
        groups.setdefault(outcome, []).append(f"`{r['model_type']}`")
    order = ["pass", *sorted(g for g in groups if g.startswith("refused")), *sorted(g for g in groups if
             g.startswith("not built")), "FAIL"]  # fmt: skip
    lines = [
        README_BEGIN,
        f"{len(rows)} families: {counts['pass']} pass, {counts['refused']} refused at start in one line, "
        f"{counts['not built']} not built tiny, {counts['FAIL']} FAIL.",
        "",
        "| outcome | families |",
        "|---|---|",
        *(f"| {g} ({len(groups[g])}) | {', '.join(groups[g])} |" for g in order if g in groups),
        README_END,
    ]
    return "\n".join(lines)


def readme_section(text: str) -> str:
    """The generated part of the README ``text``, markers included ('' when it has none)."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    return text[start : end + len(README_END)] if 0 <= start < end else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", help="model_type values (default: the whole mapping)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--readme", action="store_true", help="print README.md's table from the rows")
    parser.add_argument("--write", action="store_true", help="with --readme: write the table into README.md")
    args = parser.parse_args(argv)
    if args.readme:
        recorded = Path(args.json) if args.json else Path(__file__).with_name("arch_sweep.json")
        table = readme_table(json.loads(recorded.read_text()))
        if not args.write:
            print(table)
            return 0
        text = README.read_text()
        if not readme_section(text):
            print(
                f"error: {README} has no {README_BEGIN} ... {README_END} section to replace", file=sys.stderr
            )
            return 2
        README.write_text(text.replace(readme_section(text), table))
        return 0
    rows = []
    for model_type in args.families or families():
        rows.append(sweep_one(model_type))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        print(markdown(rows))
    return 1 if any(r["outcome"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
