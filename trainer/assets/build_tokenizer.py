"""Rebuild the built-in demo assets: sample conversations and a small GLM-4-style tokenizer.

    python -m trainer.assets.build_tokenizer

Deterministic: fixed seeds, a single-threaded BPE trainer on a fixed corpus. Writes
``demo_train.jsonl``, ``demo_val.jsonl`` and ``tokenizer/`` next to this file.

The tokenizer is byte-level BPE (any text, Chinese included, round-trips) with GLM-4's
special tokens and a GLM-4-style chat template: ``[gMASK]<sop>`` once, then per message
``<|role|>{metadata}\\n{content}`` (nothing when the content is empty), a system message's
``tools`` rendered as a tool list block, ``<|assistant|>`` as the generation prompt.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 8000
N_TRAIN, N_VAL = 400, 40

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]

# GLM-4's chat template structure (glm-4-9b-chat), with a shorter tool preamble of our own.
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}"
    "{% if item['tools'] is defined %}<|system|>\n你是一个人工智能助手，可以调用下列工具来回答用户的问题。"
    "\n\n# 可用工具{% set tools = item['tools'] %}{% for tool in tools %}"
    "{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}\n\n"
    "{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_demo_files() -> tuple[list[dict], list[dict]]:
    from trainer.assets.synthetic import demo_conversations, write_jsonl

    train = demo_conversations(N_TRAIN, seed=1234)
    val = demo_conversations(N_VAL, seed=5678)
    write_jsonl(train, HERE / "demo_train.jsonl")
    write_jsonl(val, HERE / "demo_val.jsonl")
    return train, val


def _filler_conversations(n: int = 300, mean_tokens: int = 300, seed: int = 99) -> list[dict]:
    """Synthetic filler text for the BPE corpus, frozen here so the tokenizer stays reproducible
    when ``synthetic.generate_conversations`` changes (this is its first version)."""
    import math

    import numpy as np

    from trainer.assets.synthetic import _WORDS_EN, _WORDS_ZH, WEATHER_TOOL

    def text(rng, n_words, zh_share):
        n_words = max(1, int(n_words))
        if rng.random() < zh_share:
            return "".join(_WORDS_ZH[i] for i in rng.integers(0, len(_WORDS_ZH), n_words)) + "。"
        return " ".join(_WORDS_EN[i] for i in rng.integers(0, len(_WORDS_EN), n_words)) + "."

    rng = np.random.default_rng(seed)
    sigma, labelled = 0.8, 0.3
    lengths = np.clip(rng.lognormal(math.log(mean_tokens) - sigma**2 / 2, sigma, n), 24, 32 * mean_tokens)
    out = []
    for total in lengths:
        words = total / 1.25
        n_turns = int(rng.integers(1, 7))
        zh = 1.0 if rng.random() < 0.2 else 0.0
        messages: list[dict] = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": text(rng, 12, zh), "tools": [WEATHER_TOOL]})
            messages.append({"role": "user", "content": text(rng, 8, zh)})
            messages.append({"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'})
            messages.append({"role": "observation", "content": '{"temperature": 21, "condition": "sunny"}'})
            words = max(words - 150, 8)
        elif rng.random() < 0.5:
            messages.append({"role": "system", "content": text(rng, 16, zh)})
        per_turn = words / n_turns
        for _ in range(n_turns):
            messages.append({"role": "user", "content": text(rng, per_turn * (1 - labelled), zh)})
            messages.append({"role": "assistant", "content": text(rng, per_turn * labelled, zh)})
        out.append({"messages": messages})
    return out


def corpus(conversations: list[dict]) -> list[str]:
    texts = []
    for conv in conversations + _filler_conversations():
        for m in conv["messages"]:
            texts.append(f"{m.get('metadata', '')}\n{m['content']}")
            for tool in m.get("tools") or []:
                texts.append(json.dumps(tool["function"], ensure_ascii=False, indent=4))
    texts.append("你是一个人工智能助手，可以调用下列工具来回答用户的问题。\n\n# 可用工具")
    texts.append("在调用上述函数时，请使用 Json 格式表示调用的参数。")
    # Digits and common punctuation alone, so numbers never fall back to odd merges only.
    rng = random.Random(0)
    texts += [" ".join(str(rng.randint(0, 100000)) for _ in range(50)) for _ in range(50)]
    return texts


def build_tokenizer(texts: list[str], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    os.environ["RAYON_NUM_THREADS"] = "1"  # single-threaded training: the merges are reproducible
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    # Written by hand rather than by save_pretrained, so that transformers 4.x and 5.x both load it
    # (5.x writes "TokenizersBackend" and a separate chat_template.jinja that 4.x ignores).
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    for stale in ("chat_template.jinja", "special_tokens_map.json"):
        (out_dir / stale).unlink(missing_ok=True)


def main() -> None:
    train, val = write_demo_files()
    build_tokenizer(corpus(train + val), HERE / "tokenizer")
    print(f"wrote {HERE / 'tokenizer'}, demo_train.jsonl ({len(train)}), demo_val.jsonl ({len(val)})")


if __name__ == "__main__":
    main()
