"""Encoding throughput of trainer/data.py: first encode (parallel) and cached load.

    python bench/bench_data.py --n 100000

Generates a synthetic JSONL file (log-normal lengths, ~1k demo-tokenizer tokens on average, 30%
assistant text, tool calls, Chinese and English), encodes it with the demo tokenizer into a fresh
cache directory, then loads it again from the cache. Prints one summary block.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import git_commit  # noqa: E402
from trainer.assets.synthetic import generate_conversations, write_jsonl  # noqa: E402
from trainer.data import encode_file, load_tokenizer  # noqa: E402


def _cpu_seconds() -> tuple[float, float]:
    """(this process, its finished child processes): user + system CPU seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="conversations")
    parser.add_argument("--mean-tokens", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--keep", help="directory to keep the data file and cache in")
    args = parser.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"synthetic_{args.n}.jsonl"
    t0 = time.perf_counter()
    write_jsonl(generate_conversations(args.n, mean_tokens=args.mean_tokens, seed=0), path)
    gen_s = time.perf_counter() - t0

    tok = load_tokenizer("demo")
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # the first encode must not find an old entry
    common = dict(max_length=args.max_length, num_workers=args.workers, cache_dir=cache, progress=False)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    ds, first = encode_file(path, tok, **common)
    first_s = time.perf_counter() - t0
    cpu = [b - a for a, b in zip(cpu0, _cpu_seconds(), strict=True)]
    t0 = time.perf_counter()
    ds2, again = encode_file(path, tok, **common)
    cached_s = time.perf_counter() - t0
    assert again.from_cache and len(ds2) == len(ds) and ds2[len(ds) // 2] == ds[len(ds) // 2]

    commit = git_commit()
    import tokenizers
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    versions = f"tokenizers {tokenizers.__version__}, transformers {transformers.__version__}"
    print(first.format())
    print(f"file {path.stat().st_size / 1e6:.0f} MB, generated in {gen_s:.1f}s")
    print(
        f"first encode {first_s:.1f}s ({first.tokens / first_s / 1e6:.2f} M tokens/s, "
        f"{first.conversations / first_s:.0f} conv/s); cached load {cached_s:.2f}s"
    )
    print(
        f"CPU time of the first encode: main process {cpu[0]:.1f}s, workers {cpu[1]:.1f}s; "
        f"on {os.cpu_count()} idle cores at least {(cpu[0] + cpu[1]) / os.cpu_count():.1f}s of wall time"
    )
    print(
        f"cpus {os.cpu_count()}, load average {load}, python {platform.python_version()}, "
        f"{versions}, commit {commit.strip()}"
    )


if __name__ == "__main__":
    main()
