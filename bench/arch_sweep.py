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
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
    saved = check_module.prepare_model
    check_module.prepare_model = functools.partial(model_module.prepare_model, model=model)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_check(load_config([*ARGV, "--model", f"tiny-{model_type}"]), num_batches=1)
        row["outcome"] = "pass" if result["passed"] else "FAIL"
        row["reason"] = "" if result["passed"] else f"loss rel {result['loss_rel_diff']:.2e}, grad rel " \
                                                    f"{result['grad_rel_diff']:.2e}"  # fmt: skip
        row["plan"] = "; ".join(line for line in out.getvalue().splitlines() if line.startswith("attention"))
    except ValueError as e:  # setup's refusals are ValueError (ConfigError included), one line
        one_line = "\n" not in str(e)
        row.update(outcome="refused" if one_line else "FAIL", reason=_one_line(e))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", help="model_type values (default: the whole mapping)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
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
