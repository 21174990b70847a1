"""Conversation generators for the built-in demo and for benchmarks.

Two kinds of data, both in GLM-4's fine-tuning format (``{"messages": [...]}``):

- ``demo_conversations``: small, learnable conversations (templated weather tool calls,
  arithmetic, capitals, counting; English and Chinese) for the demo files under
  ``trainer/assets``. A tiny random model's loss falls visibly on them within a minute.
- ``generate_conversations``: arbitrarily many synthetic conversations with a log-normal
  (long-tailed) length distribution and a chosen share of assistant (labelled) text,
  for encoding and throughput benchmarks.

CLI: ``python -m trainer.assets.synthetic --n 100000 --out file.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# Demo conversations: templated and repetitive so that a tiny model can learn them.

CITIES = [
    ("Beijing", "北京"),
    ("Shanghai", "上海"),
    ("Paris", "巴黎"),
    ("London", "伦敦"),
    ("Tokyo", "东京"),
    ("Berlin", "柏林"),
    ("Madrid", "马德里"),
    ("Rome", "罗马"),
    ("Cairo", "开罗"),
    ("Sydney", "悉尼"),
    ("Moscow", "莫斯科"),
    ("Toronto", "多伦多"),
]
CONDITIONS = [("sunny", "晴"), ("cloudy", "多云"), ("rainy", "有雨"), ("windy", "有风"), ("snowy", "有雪")]
CAPITALS = [
    ("France", "Paris", "法国", "巴黎"),
    ("China", "Beijing", "中国", "北京"),
    ("Japan", "Tokyo", "日本", "东京"),
    ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"),
    ("Spain", "Madrid", "西班牙", "马德里"),
    ("Egypt", "Cairo", "埃及", "开罗"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉"),
]
SYSTEM_EN = [
    "You are a helpful assistant. Answer briefly and exactly.",
    "You are a friendly assistant that answers questions about weather, numbers and geography.",
    "You are a careful assistant. Use the tools when they help, and answer in one sentence.",
]
SYSTEM_ZH = [
    "你是一个乐于助人的助手，请简洁准确地回答。",
    "你是一个友好的助手，可以回答天气、数字和地理问题。",
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "Name of the city"},
                "unit": {"type": "string", "description": "celsius or fahrenheit"},
            },
            "required": ["city"],
        },
    },
}
CALC_TOOL = {
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "The expression"}},
            "required": ["expression"],
        },
    },
}


def _weather_turns(rng: random.Random, zh: bool) -> list[dict]:
    city_en, city_zh = rng.choice(CITIES)
    cond_en, cond_zh = rng.choice(CONDITIONS)
    temp = rng.randint(-5, 35)
    city = city_zh if zh else city_en
    user = f"{city}今天的天气怎么样？" if zh else f"What is the weather like in {city} today?"
    answer = (
        f"{city}今天{cond_zh}，气温{temp}摄氏度。"
        if zh
        else f"It is {cond_en} in {city} today, and the temperature is {temp} degrees Celsius."
    )
    call = json.dumps({"city": city}, ensure_ascii=False)
    result = {"city": city, "temperature": temp, "condition": cond_zh if zh else cond_en}
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "metadata": "get_weather", "content": call},
        {"role": "observation", "content": json.dumps(result, ensure_ascii=False)},
        {"role": "assistant", "content": answer},
    ]


def _calc_turns(rng: random.Random, zh: bool) -> list[dict]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    expr = f"{a} * {b}"
    user = f"请计算{a}乘以{b}。" if zh else f"Please compute {a} times {b}."
    answer = f"{a}乘以{b}等于{a * b}。" if zh else f"{a} times {b} is {a * b}."
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "metadata": "calculate", "content": json.dumps({"expression": expr})},
        {"role": "observation", "content": json.dumps({"result": a * b})},
        {"role": "assistant", "content": answer},
    ]


def _plain_turn(rng: random.Random, zh: bool) -> list[dict]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if zh:
            return [
                {"role": "user", "content": f"{a}加{b}等于多少？"},
                {"role": "assistant", "content": f"{a}加{b}等于{a + b}。"},
            ]
        return [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
    if kind == 1:
        country_en, capital_en, country_zh, capital_zh = rng.choice(CAPITALS)
        if zh:
            return [
                {"role": "user", "content": f"{country_zh}的首都是哪里？"},
                {"role": "assistant", "content": f"{country_zh}的首都是{capital_zh}。"},
            ]
        return [
            {"role": "user", "content": f"What is the capital of {country_en}?"},
            {"role": "assistant", "content": f"The capital of {country_en} is {capital_en}."},
        ]
    start = rng.randint(1, 50)
    stop = start + rng.randint(3, 12)
    numbers = ", ".join(str(i) for i in range(start, stop + 1))
    if zh:
        return [
            {"role": "user", "content": f"请从{start}数到{stop}。"},
            {"role": "assistant", "content": f"好的：{numbers}。"},
        ]
    return [
        {"role": "user", "content": f"Count from {start} to {stop}."},
        {"role": "assistant", "content": f"Sure: {numbers}."},
    ]


def demo_conversation(rng: random.Random) -> dict:
    """One learnable demo conversation: 3-16 turns, with or without tools, English or Chinese."""
    zh = rng.random() < 0.35
    messages: list[dict] = []
    with_tools = rng.random() < 0.4
    system = rng.choice(SYSTEM_ZH if zh else SYSTEM_EN)
    if with_tools:
        tools = [WEATHER_TOOL, CALC_TOOL] if rng.random() < 0.5 else [WEATHER_TOOL]
        messages.append({"role": "system", "content": system, "tools": tools})
    else:
        messages.append({"role": "system", "content": system})
    for _ in range(rng.randint(3, 9) if with_tools else rng.randint(4, 16)):
        r = rng.random()
        if with_tools and r < 0.35:
            messages += _weather_turns(rng, zh)
        elif with_tools and r < 0.5 and len(messages[0]["tools"]) == 2:
            messages += _calc_turns(rng, zh)
        else:
            messages += _plain_turn(rng, zh)
    return {"messages": messages}


def demo_conversations(n: int, *, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [demo_conversation(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Synthetic benchmark conversations: realistic length distribution, chosen labelled share.

_WORDS_EN = (
    "the of and to in is that for it as with was on be by this are from at or an have not which one "
    "model data train token loss batch layer value system user answer question result number city "
    "weather function return call write read file table column row value error time memory speed "
    "example simple small large first second third next last before after because however therefore"
).split()
_WORDS_ZH = (
    "我们 模型 数据 训练 结果 问题 回答 时间 城市 天气 函数 文件 速度 内存 例如 因为 所以 但是 然后"
).split()
_TOKENS_PER_WORD = 1.0  # measured on the demo tokenizer, rough; lengths are approximate by design


def _text(rng: np.random.Generator, n_words: int, zh_share: float) -> str:
    n_words = max(1, int(n_words))
    if rng.random() < zh_share:
        # Clauses of 2-7 words separated by punctuation, as in real Chinese text (one unbroken run
        # of thousands of characters would be a single pre-token and an unrealistic BPE workload).
        idx = rng.integers(0, len(_WORDS_ZH), n_words)
        marks = rng.integers(2, 8, n_words)
        return (
            "".join(
                _WORDS_ZH[i] + ("，" if j % m == m - 1 else "")
                for j, (i, m) in enumerate(zip(idx, marks, strict=True))
            )
            + "。"
        )
    idx = rng.integers(0, len(_WORDS_EN), n_words)
    return " ".join(_WORDS_EN[i] for i in idx) + "."


def generate_conversations(
    n: int, *, mean_tokens: int = 700, labelled_fraction: float = 0.3, seed: int = 0
) -> list[dict]:
    """``n`` synthetic conversations for benchmarks.

    Total lengths are log-normal (sigma 0.8, long right tail) with mean ``mean_tokens``
    (approximately, in demo-tokenizer tokens); assistant text is about ``labelled_fraction``
    of each conversation. A fifth of the conversations carry a tool, a tool call and an
    observation; a fifth are in Chinese.
    """
    if not 0.0 < labelled_fraction < 1.0:
        raise ValueError(f"labelled_fraction must be in (0, 1), got {labelled_fraction}")
    rng = np.random.default_rng(seed)
    sigma = 0.8
    mu = math.log(mean_tokens) - sigma**2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
    lengths = np.clip(rng.lognormal(mu, sigma, n), 24, 32 * mean_tokens)
    out = []
    for total in lengths:
        words = total / _TOKENS_PER_WORD
        n_turns = int(rng.integers(1, 7))
        zh = 1.0 if rng.random() < 0.2 else 0.0
        messages: list[dict] = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": _text(rng, 12, zh), "tools": [WEATHER_TOOL]})
            messages.append({"role": "user", "content": _text(rng, 8, zh)})
            messages.append({"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'})
            messages.append({"role": "observation", "content": '{"temperature": 21, "condition": "sunny"}'})
            words = max(words - 150, 8)  # the tool block costs about this many tokens
        elif rng.random() < 0.5:
            messages.append({"role": "system", "content": _text(rng, 16, zh)})
        per_turn = words / n_turns
        for _ in range(n_turns):
            messages.append({"role": "user", "content": _text(rng, per_turn * (1 - labelled_fraction), zh)})
            messages.append({"role": "assistant", "content": _text(rng, per_turn * labelled_fraction, zh)})
        out.append({"messages": messages})
    return out


def write_jsonl(conversations: list[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps(conv, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic conversations as JSONL.")
    parser.add_argument("--n", type=int, required=True, help="number of conversations")
    parser.add_argument("--out", required=True, help="output .jsonl path")
    parser.add_argument("--mean-tokens", type=int, default=700)
    parser.add_argument("--labelled-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo", action="store_true", help="write learnable demo conversations instead")
    args = parser.parse_args(argv)
    if args.demo:
        convs = demo_conversations(args.n, seed=args.seed)
    else:
        convs = generate_conversations(
            args.n, mean_tokens=args.mean_tokens, labelled_fraction=args.labelled_fraction, seed=args.seed
        )
    write_jsonl(convs, args.out)
    print(f"wrote {len(convs)} conversations to {args.out}")


if __name__ == "__main__":
    main()
