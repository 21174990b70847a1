"""Encoding throughput of trainer/data.py against the plain loop, on real tokenizers.

    python bench/bench_data.py                       # Tekken and SentencePiece (mistral-common), demo
    python bench/bench_data.py --n 100000 --tokenizers demo

For each tokenizer: the same synthetic multi-turn conversations (OpenAI layout: record-level
tools, tool calls, tool results; English, Chinese and code) encoded by ``encode_file`` (template
``chat_template``, its worker processes, a fresh cache) and by the plain single-process loop
``tokenizer.apply_chat_template(messages, tools=..., tokenize=True)``; tokens/s of both side by
side, then the cached second run. Then conversations of 2, 8 and 32 turns of the same total size,
encoded in one process: tokens/s that does not fall with the number of turns means the work per
conversation is linear in its length. The Tekken and SentencePiece tokenizers are the ones
``mistral-common`` ships (``pip install -e .[bench]``), with Mistral-Nemo's chat template; the demo
tokenizer (GLM-4 vocabulary and template) runs ``template: glm4`` and needs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import git_commit  # noqa: E402
from trainer.data import encode_file, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = {"demo": "glm4"}  # template rule per tokenizer; the others: chat_template
NEMO_TEMPLATE = ROOT / "tests" / "fixtures" / "templates" / "mistralai-Mistral-Nemo-Instruct-2407.jinja"
_EN = (
    "the model reads each token once and the loss falls when the data is clean and the batches are "
    "packed so that no compute goes to padding while the learning rate warms up over the first steps"
).split()
_ZH = "我们 模型 数据 训练 结果 问题 回答 时间 城市 天气 函数 文件 速度 内存 例如 因为 所以 但是 然后".split()
_CODE = [
    "def f(x):\n    return x * 2\n",
    "for i in range(10):\n    total += i\n",
    "if (n > 0) { n--; }\n",
    "import numpy as np\narr = np.zeros((4, 4))\n",
]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _text(rng: np.random.Generator, n_words: int) -> str:
    kind = rng.random()
    n_words = max(1, int(n_words))
    if kind < 0.2:
        clauses = ("".join(rng.choice(_ZH, size=int(rng.integers(2, 7)))) for _ in range(n_words // 4 + 1))
        return "，".join(clauses)
    if kind < 0.35:
        return "".join(rng.choice(_CODE, size=n_words // 6 + 1))
    return " ".join(rng.choice(_EN, size=n_words)) + "."


def conversations(n: int, *, words: int, turns: int | None, seed: int) -> list[dict]:
    """``n`` conversations of about ``words`` words (log-normal), ``turns`` user/assistant pairs
    (None: 1 to 8); a fifth with a tool, a call and its result."""
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(np.log(words) - 0.18, 0.6, n) if turns is None else np.full(n, float(words))
    out = []
    for k, size in enumerate(sizes):
        t = int(rng.integers(1, 9)) if turns is None else turns
        rec: dict = {"messages": []}
        if rng.random() < 0.2:
            rec["tools"] = [TOOL]
            call = {"id": f"c{k:08d}"[-9:], "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}  # fmt: skip
            rec["messages"] += [
                {"role": "user", "content": _text(rng, 8)},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 21}'},
                {"role": "assistant", "content": _text(rng, 10)},
            ]
        for _ in range(t):
            rec["messages"].append({"role": "user", "content": _text(rng, size / t * 0.6)})
            rec["messages"].append({"role": "assistant", "content": _text(rng, size / t * 0.4)})
        out.append(rec)
    return out


def mistral_tokenizers() -> dict:
    """Mistral's Tekken (131k, tiktoken-style BPE) and SentencePiece (v3, 32k) tokenizers from the
    files mistral-common ships, as Hugging Face fast tokenizers with the Mistral-Nemo template."""
    import mistral_common
    from transformers import AutoTokenizer
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    data = Path(mistral_common.__file__).parent / "data"
    template = NEMO_TEMPLATE.read_text()
    tekken = convert_tekken_tokenizer(str(data / "tekken_240718.json"), chat_template=template)
    spm_dir = Path(tempfile.mkdtemp(prefix="spm_"))
    shutil.copy(data / "mistral_instruct_tokenizer_240323.model.v3", spm_dir / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "legacy": False}
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({**config, "unk_token": "<unk>"}))
    spm = AutoTokenizer.from_pretrained(str(spm_dir))
    spm.chat_template = template
    return {"tekken": tekken, "sentencepiece": spm}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def plain_loop(tok, records) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for r in records:
        ids = tok.apply_chat_template(r["messages"], tools=r.get("tools"), tokenize=True, return_dict=False)
        n += len(ids)
    return n, time.perf_counter() - t0


def ours(tok, path, cache, workers, template) -> tuple[object, float, float]:
    shutil.rmtree(cache, ignore_errors=True)  # the first encode must not find an old entry
    common = dict(template=template, max_length=1 << 20, num_workers=workers, cache_dir=cache)
    common["progress"] = False
    t0 = time.perf_counter()
    _, summary = encode_file(path, tok, **common)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, again = encode_file(path, tok, **common)
    assert again.from_cache and again.tokens == summary.tokens
    return summary, first, time.perf_counter() - t0


def write(records, path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6000, help="conversations")
    parser.add_argument("--words", type=int, default=700, help="mean words a conversation")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizers", default="tekken,sentencepiece,demo")
    parser.add_argument("--turns-n", type=int, default=400, help="conversations per turn count (0: skip)")
    parser.add_argument("--passes", type=int, default=2, help="alternating passes; the best of each is shown")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    records = conversations(args.n, words=args.words, turns=None, seed=0)
    path = write(records, work / "conversations.jsonl")
    toks = {}
    names = args.tokenizers.split(",")
    if {"tekken", "sentencepiece"} & set(names):
        toks.update(mistral_tokenizers())
    if "demo" in names:
        toks["demo"] = load_tokenizer("demo")  # its own GLM-4 template and rule (template: glm4)
    print(f"{args.n} conversations, {path.stat().st_size / 1e6:.1f} MB; {args.workers} workers\n")
    print(f"best of {args.passes} alternating passes. tokens/s: wall clock; tokens/CPU-s: per CPU second,")
    print("all processes (what a busy machine")
    print("distorts least). 2-core estimate: ours at its tokens/CPU-s on both cores, the loop on one.\n")
    head = f"{'tokenizer':14} {'tokens':>10} {'plain loop':>12} {'ours':>12} {'speed-up':>9} {'cached':>8}"
    print(f"{head}   {'loop/CPU-s':>11} {'ours/CPU-s':>11} {'2-core est.':>11}")
    for name in names:
        tok = toks[name]
        template = TEMPLATE.get(name, "chat_template")
        best = {"ours": (0.0, 0.0), "loop": (0.0, 0.0)}  # (tokens/s, tokens/CPU-s), best of the passes
        for _ in range(args.passes):  # providers alternate, so both meet the same machine
            c0 = cpu_seconds()
            summary, first, cached = ours(tok, path, work / "cache", args.workers, template)
            c1 = cpu_seconds()
            n_plain, plain_s = plain_loop(tok, records)
            c2 = cpu_seconds()
            if template == "chat_template":  # the same rendering: the same tokens (+ an eos at most)
                assert summary.tokens >= n_plain * 0.99, (summary.tokens, n_plain)
            run = {
                "ours": (summary.tokens / first, summary.tokens / (c1 - c0 - cached)),
                "loop": (n_plain / plain_s, n_plain / (c2 - c1)),
            }
            best = {k: (max(best[k][0], run[k][0]), max(best[k][1], run[k][1])) for k in best}
        (ours_tps, ours_cpu), (plain_tps, plain_cpu) = best["ours"], best["loop"]
        estimate = min(args.workers, os.cpu_count() or 1) * ours_cpu / plain_cpu
        print(
            f"{name:14} {summary.tokens:>10,} {plain_tps / 1e3:>9.0f}k/s {ours_tps / 1e3:>9.0f}k/s "
            f"{ours_tps / plain_tps:>8.2f}x {cached:>7.2f}s   "
            f"{plain_cpu / 1e3:>9.0f}k {ours_cpu / 1e3:>10.0f}k "
            f"{estimate:>10.2f}x"
        )
    if args.turns_n:
        size = f"{args.turns_n} conversations of ~2000 words"
        print(f"\nsame total size, more turns ({size}; one process; tokens/CPU-s):")
        for name in names:
            row = []
            for turns in (2, 8, 32):
                recs = conversations(args.turns_n, words=2000, turns=turns, seed=1)
                p = write(recs, work / f"turns{turns}.jsonl")
                c0 = cpu_seconds()
                s, first, cached = ours(toks[name], p, work / "cache", 1, TEMPLATE.get(name, "chat_template"))
                c1 = cpu_seconds()
                n_plain, _ = plain_loop(toks[name], recs)
                c2 = cpu_seconds()
                row.append(
                    f"{turns:>2} turns: ours {s.tokens / (c1 - c0 - cached) / 1e3:>4.0f}k, "
                    f"loop {n_plain / (c2 - c1) / 1e3:>4.0f}k"
                )
            print(f"{name:14} " + "   ".join(row))

    import tokenizers
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(
        f"\ncpus {os.cpu_count()}, load average {tuple(round(x, 1) for x in load)}, python "
        f"{platform.python_version()}, tokenizers {tokenizers.__version__}, transformers "
        f"{transformers.__version__}, commit {git_commit().strip()}"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
