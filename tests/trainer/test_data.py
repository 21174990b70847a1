"""trainer/data.py against independent references of GLM-4's rule and of chat-template spans."""

import copy
import json

import pytest
from transformers import AutoTokenizer

from trainer import data
from trainer.assets.synthetic import demo_conversations, generate_conversations, write_jsonl
from trainer.data import (
    DEMO_TRAIN_FILE,
    DEMO_VAL_FILE,
    DataError,
    encode_conversation,
    encode_file,
    load_conversations,
    load_tokenizer,
)
from trainer.fasttok import PieceEncoder

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("demo")


# ---------------------------------------------------------------------------------------------
# Reference: GLM-4's finetune_demo process_message / process_batch, written out plainly.


def ref_process_message(message):
    message = copy.deepcopy(message)
    if "tools" in message and message["role"] == "system":
        for tool in message["tools"]:
            props = tool["function"]["parameters"]["properties"]
            tool["function"]["parameters"]["properties"] = {k: v for k, v in props.items() if v is not None}
    elif "tools" in message:
        del message["tools"]
    return message


def ref_glm4(conv, tokenizer, end_id, trained=None):
    """GLM-4's per-message rule; ``trained[i]`` says whether assistant message i is trained."""
    gmask, sop = tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    input_ids, loss_masks = [gmask, sop], [False, False]
    for i, message in enumerate(conv):
        message = ref_process_message(message)
        mask_val = message["role"] not in ("system", "user", "observation")
        if trained is not None:
            mask_val = mask_val and trained[i]
        new_ids = tokenizer.apply_chat_template([message], tokenize=True, return_dict=False)[2:]
        input_ids += new_ids
        loss_masks += [mask_val] * len(new_ids)
    input_ids.append(end_id)
    loss_masks = [False, *loss_masks]
    labels = [t if m else IGNORE for t, m in zip(input_ids, loss_masks, strict=False)]  # drops the extra mask
    return input_ids, labels


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "查询天气 / get the weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": None, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]


def rich_conversations():
    return [
        [
            {"role": "system", "content": "You are helpful.", "tools": TOOLS},
            {"role": "user", "content": "北京今天天气怎么样？"},
            {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
            {"role": "observation", "content": '{"temperature": 21, "condition": "晴"}'},
            {"role": "assistant", "content": "北京今天晴，21度。"},
            {"role": "user", "content": "And in Paris?", "tools": TOOLS},
            {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
            {"role": "observation", "content": '{"temperature": 15}'},
            {"role": "assistant", "content": "It is 15 degrees in Paris."},
        ],
        [
            {"role": "system", "content": "", "tools": TOOLS},  # tools block only
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": ""},  # empty content renders nothing
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi!\n\n  with spaces  "},
        ],
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        [  # special-token text inside content, whitespace-only content, metadata on a plain answer
            {"role": "user", "content": "Repeat: <|assistant|> and [gMASK]"},
            {"role": "assistant", "metadata": "note", "content": "<|assistant|> and [gMASK] \t"},
            {"role": "user", "content": "   "},
            {"role": "assistant", "content": "\n\n"},
        ],
    ]


@pytest.mark.parametrize("end_token", [None, "eos"])
def test_glm4_matches_reference_on_rich_conversations(tok, end_token):
    end_id = tok.eos_token_id if end_token == "eos" else tok.convert_tokens_to_ids("<|user|>")
    for conv in rich_conversations():
        got = encode_conversation(conv, tok, end_token=end_token)
        ids, labels = ref_glm4(conv, tok, end_id)
        assert got.input_ids == ids
        assert got.labels == labels
        assert any(label != IGNORE for label in got.labels)


def test_glm4_matches_reference_on_demo_files(tok):
    end_id = tok.convert_tokens_to_ids("<|user|>")
    convs = load_conversations(DEMO_TRAIN_FILE)[:120] + load_conversations(DEMO_VAL_FILE)
    for rec in convs:
        got = encode_conversation(rec["messages"], tok)
        assert (got.input_ids, got.labels) == ref_glm4(rec["messages"], tok, end_id)


def test_glm4_fast_path_equals_template_path(tok, monkeypatch):
    convs = [r["messages"] for r in load_conversations(DEMO_TRAIN_FILE)[:60]] + rich_conversations()
    convs += [c["messages"] for c in generate_conversations(20, mean_tokens=300, seed=5)]
    fast = [encode_conversation(c, tok) for c in convs]
    encoder = data._template_for(tok, "glm4", "all", None)
    assert encoder.fast and encoder.pieces is not None, "the demo tokenizer should take the direct path"
    monkeypatch.setattr(encoder, "fast", False)  # every message through apply_chat_template
    slow = [encode_conversation(c, tok) for c in convs]
    assert fast == slow


def test_piece_encoder_equals_backend_on_random_text(tok):
    import random

    pieces = PieceEncoder.for_backend(tok.backend_tokenizer)
    alphabet = "ab Zz09 \t\n\r,.!?'\"{}[]:-_北京你好，。！？é½²🙂\u00a0\u3000" + "<|user|>"
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        text += rng.choice(["", "'s", "'ll", " 123", "  ", "\n\n"])
        assert pieces.encode(text) == tok.backend_tokenizer.encode(text, add_special_tokens=False).ids, text


def test_glm4_label_semantics(tok):
    conv = rich_conversations()[2]
    e = encode_conversation(conv, tok)
    toks = tok.convert_ids_to_tokens(e.input_ids)
    labelled = [t for t, label in zip(toks, e.labels, strict=True) if label != IGNORE]
    assert toks[:2] == ["[gMASK]", "<sop>"] and toks[-1] == "<|user|>"
    assert "<|assistant|>" not in labelled  # the role token is never a target
    assert labelled[-1] == "<|user|>"  # the token after the turn is: GLM-4 learns to stop
    assert tok.decode([t for t in e.labels if t != IGNORE][:-1]) == "\n4"


def test_loss_on_last_and_loss_false(tok):
    conv = rich_conversations()[0]
    end_id = tok.convert_tokens_to_ids("<|user|>")
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    got = encode_conversation(conv, tok, loss_on="last")
    assert (got.input_ids, got.labels) == ref_glm4(conv, tok, end_id, [i == last for i in range(len(conv))])

    conv2 = copy.deepcopy(conv)
    conv2[2]["loss"] = False
    got = encode_conversation(conv2, tok)
    expect = ref_glm4(conv, tok, end_id, [i != 2 for i in range(len(conv))])
    assert (got.input_ids, got.labels) == expect
    assert got.labels != encode_conversation(conv, tok).labels


def test_openai_aliases(tok):
    openai = [
        {"role": "system", "content": "sys", "tools": TOOLS},
        {"role": "user", "content": "weather?", "tools": None},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}
            ],
        },
        {"role": "tool", "content": '{"temperature": 30}'},
        {"role": "assistant", "content": "30 degrees."},
    ]
    glm = [
        {"role": "system", "content": "sys", "tools": TOOLS},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Rome"}'},
        {"role": "observation", "content": '{"temperature": 30}'},
        {"role": "assistant", "content": "30 degrees."},
    ]
    assert encode_conversation(openai, tok) == encode_conversation(glm, tok)
    assert openai[2]["content"] is None  # the caller's data is not modified


def test_tools_null_tolerated(tok):
    conv = [
        {"role": "system", "content": "s", "tools": None},
        {"role": "user", "content": "u", "tools": None},
    ]
    conv += [{"role": "assistant", "content": "a", "tools": None, "metadata": None}]
    plain = [{k: v for k, v in m.items() if k not in ("tools", "metadata")} for m in conv]
    assert encode_conversation(conv, tok) == encode_conversation(plain, tok)


# ---------------------------------------------------------------------------------------------
# chat_template path


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def _variant(template, specials, bos=None):
    t = AutoTokenizer.from_pretrained(str(data.DEMO_TOKENIZER_DIR))
    t.add_special_tokens({"additional_special_tokens": specials})
    if bos:
        t.add_special_tokens({"bos_token": bos})
    t.chat_template = template
    return t


@pytest.fixture(scope="module")
def chatml():
    return _variant(CHATML, ["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def llama3():
    return _variant(
        LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], bos="<|begin_of_text|>"
    )


PLAIN = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hello 你好"},
    {"role": "assistant", "content": "Hi! 你好！"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4, of course."},
]


def labelled_text(tokenizer, e):
    return tokenizer.decode([t for t in e.labels if t != IGNORE])


def test_chatml_spans(chatml):
    e = encode_conversation(PLAIN, chatml, template="chat_template")
    full = chatml.apply_chat_template(PLAIN, tokenize=False)
    assert e.input_ids == chatml(full, add_special_tokens=False)["input_ids"]
    assert labelled_text(chatml, e) == "Hi! 你好！<|im_end|>4, of course.<|im_end|>"
    e_last = encode_conversation(PLAIN, chatml, template="chat_template", loss_on="last")
    assert labelled_text(chatml, e_last) == "4, of course.<|im_end|>"


def test_llama3_spans(llama3):
    e = encode_conversation(PLAIN, llama3, template="chat_template")
    assert llama3.convert_ids_to_tokens(e.input_ids[0]) == "<|begin_of_text|>"
    assert labelled_text(llama3, e) == "Hi! 你好！<|eot_id|>4, of course.<|eot_id|>"


def test_chat_template_with_glm4_tokenizer_equals_glm4_rule(tok):
    for conv in rich_conversations() + [PLAIN]:
        a = encode_conversation(conv, tok, template="chat_template", end_token="<|user|>")
        assert a == encode_conversation(conv, tok)


QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_qwen2_default_system_prompt():
    qwen = _variant(QWEN2, ["<|im_start|>", "<|im_end|>"])
    conv = PLAIN[1:]  # no system message: the template injects its default one
    e = encode_conversation(conv, qwen, template="chat_template")
    assert qwen.decode(e.input_ids).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert labelled_text(qwen, e) == "Hi! 你好！<|im_end|>4, of course.<|im_end|>"


def test_chatml_empty_and_whitespace_answers(chatml):
    conv = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "x"},
    ]
    e = encode_conversation(conv, chatml, template="chat_template")
    assert labelled_text(chatml, e) == "<|im_end|>x<|im_end|>"


def test_chat_template_without_prefix_stability():
    # Earlier turns render differently from the last one: labels still follow the full rendering.
    t = _variant(
        "{% for m in messages %}{% if loop.last %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
        "{% else %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ["<|im_start|>", "<|im_end|>"],
    )
    e = encode_conversation(PLAIN, t, template="chat_template", loss_on="last")
    assert labelled_text(t, e) == "4, of course.<|im_end|>"
    # An earlier turn rendered without the assistant header cannot be labelled: one clear error.
    with pytest.raises(
        DataError, match="message 3: the rendering has no assistant header|message 3: the chat"
    ):
        encode_conversation(PLAIN, t, template="chat_template")


# ---------------------------------------------------------------------------------------------
# Files, errors, summary, cache


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"msgs": []}), "missing 'messages'"),
        (json.dumps({"messages": "hi"}), "'messages' must be a list"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "unknown role 'bot'"),
        (json.dumps({"messages": [{"role": "user", "content": 3}]}), "content must be a string or a list"),
        (json.dumps({"messages": [{"role": "user", "content": None}]}), "list of text parts, got null"),
        ('{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}', "duplicate key 'role'"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "tools": {"a": 1}}), "must be a list"),
        (
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "assistant",
                            "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                        }
                    ]
                }
            ),
            "unparseable arguments",
        ),
    ],
)
def test_bad_input_names_file_line_problem(tmp_path, tok, bad, problem):
    p = _write(tmp_path, [GOOD, "", GOOD, bad, GOOD])
    for call in (lambda: load_conversations(p), lambda: encode_file(p, tok, cache_dir=False, progress=False)):
        with pytest.raises(DataError) as ei:
            call()
        msg = str(ei.value)
        assert msg.startswith(f"{p}:4: ") and problem in msg and "\n" not in msg


def test_json_array_file_and_line_numbers(tmp_path, tok):
    good = json.loads(GOOD)
    p = tmp_path / "a.json"
    p.write_text(json.dumps([good, good], indent=1))
    assert load_conversations(p) == [good, good]
    bad = [good, {"messages": [{"role": "robot", "content": "x"}]}]
    p.write_text("[\n" + json.dumps(bad[0]) + ",\n\n" + json.dumps(bad[1]) + "\n]")
    with pytest.raises(DataError, match=rf"^{p}:4: message 1: unknown role"):
        load_conversations(p)


def test_encode_file_matches_per_conversation_and_summary(tmp_path, tok):
    convs = demo_conversations(40, seed=3)
    convs.append({"messages": [{"role": "user", "content": "only a question"}]})  # nothing to train
    convs.append(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": False}]}
    )
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 1500}]}
    convs.append(long)
    p = tmp_path / "c.jsonl"
    write_jsonl(convs, p)
    expect = [encode_conversation(c["messages"], tok) for c in convs]
    kept = [e for e in expect if any(t != IGNORE for t in e.labels) and len(e.input_ids) <= 1000]

    ds, s = encode_file(p, tok, max_length=1000, cache_dir=False, num_workers=2, progress=False)
    assert list(ds) == kept
    assert (s.conversations, s.kept, s.skipped_no_label, s.dropped_overlong) == (43, len(kept), 2, 1)
    assert s.tokens == sum(len(e.input_ids) for e in kept)
    assert s.label_tokens == sum(sum(t != IGNORE for t in e.labels) for e in kept)
    assert "dropped 1" in s.format() and "no trainable token" in s.format()
    assert "glm4: role tokens + cached byte-level BPE pieces" in s.format()  # the path that ran

    ds, s = encode_file(p, tok, max_length=1000, overlong="truncate", cache_dir=False, progress=False)
    assert (
        s.truncated == 0 and s.dropped_overlong == 0 and len(ds) == len(kept)
    )  # its only turn is cut: none left


def test_truncate_cuts_at_a_turn_boundary(tmp_path, tok):
    conv = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "short answer"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "word " * 600},
    ]
    full = encode_conversation(conv, tok)
    first = encode_conversation(conv[:2], tok)
    p = tmp_path / "t.jsonl"
    write_jsonl([{"messages": conv}], p)
    ds, s = encode_file(p, tok, max_length=300, overlong="truncate", cache_dir=False, progress=False)
    assert s.truncated == 1 and len(ds) == 1
    end = (
        max(i for i, t in enumerate(first.labels) if t != IGNORE) + 1
    )  # the first turn, its end token included
    assert ds[0].input_ids == full.input_ids[:end] and ds[0].labels == full.labels[:end]
    assert tok.convert_ids_to_tokens(ds[0].labels[-1]) == "<|user|>"


def test_cache_roundtrip_and_key(tmp_path, tok):
    p = tmp_path / "c.jsonl"
    write_jsonl(demo_conversations(30, seed=4), p)
    cache = tmp_path / "cache"
    ds1, s1 = encode_file(p, tok, cache_dir=cache, progress=False, num_workers=1)
    ds2, s2 = encode_file(p, tok, cache_dir=cache, progress=False)
    assert not s1.from_cache and s2.from_cache
    assert list(ds1) == list(ds2) and s2.tokens == s1.tokens
    _, s3 = encode_file(p, tok, cache_dir=cache, progress=False, loss_on="last")  # other settings
    assert not s3.from_cache
    write_jsonl(demo_conversations(30, seed=5), p)  # other content
    _, s4 = encode_file(p, tok, cache_dir=cache, progress=False)
    assert not s4.from_cache


# ---------------------------------------------------------------------------------------------
# Assets


def test_demo_assets(tok):
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token is not None
    for t in ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id and len(tok.tokenize(t)) == 1
    train, val = load_conversations(DEMO_TRAIN_FILE), load_conversations(DEMO_VAL_FILE)
    assert len(train) >= 200 and 30 <= len(val) <= 50
    roles = {m["role"] for r in train for m in r["messages"]}
    assert roles == {"system", "user", "assistant", "observation"}
    text = "".join(m["content"] for r in train for m in r["messages"])
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text) and "weather" in text
    assert tok.decode(tok("北京 weather 21°C")["input_ids"]) == "北京 weather 21°C"


def test_synthetic_lengths_and_labelled_fraction(tok):
    convs = generate_conversations(300, mean_tokens=400, labelled_fraction=0.3, seed=1)
    enc = [encode_conversation(c["messages"], tok) for c in convs]
    lengths = sorted(len(e.input_ids) for e in enc)
    mean = sum(lengths) / len(lengths)
    assert 200 < mean < 800
    assert lengths[-1] > 3 * lengths[len(lengths) // 2]  # long tail
    frac = sum(sum(t != IGNORE for t in e.labels) for e in enc) / sum(lengths)
    assert 0.15 < frac < 0.45


def test_not_utf8_and_bad_settings(tmp_path, tok):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(
        (GOOD + "\n").encode() + '{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'.encode("latin-1")
    )
    with pytest.raises(DataError, match=rf"^{p}:2: not UTF-8"):
        encode_file(p, tok, cache_dir=False, progress=False)
    with pytest.raises(ValueError, match="end_token"):
        encode_conversation(PLAIN, tok, end_token="<|nope|>")
    with pytest.raises(ValueError, match="loss_on"):
        encode_conversation(PLAIN, tok, loss_on="first")
    with pytest.raises(DataError, match="'messages' is empty"):
        encode_conversation([], tok)
    empty = _write(tmp_path, ["", "  "], name="empty.jsonl")
    with pytest.raises(DataError, match=rf"^{empty}:1: no conversations"):
        encode_file(empty, tok, cache_dir=False, progress=False)
    with pytest.raises(DataError, match="no conversations"):
        load_conversations(empty)


def test_demo_assets_rebuild_identically(tmp_path):
    from trainer.assets import build_tokenizer as bt

    train = demo_conversations(bt.N_TRAIN, seed=1234)
    val = demo_conversations(bt.N_VAL, seed=5678)
    assert train == [json.loads(line) for line in DEMO_TRAIN_FILE.read_text().splitlines()]
    assert val == [json.loads(line) for line in DEMO_VAL_FILE.read_text().splitlines()]
    bt.build_tokenizer(bt.corpus(train + val), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (data.DEMO_TOKENIZER_DIR / name).read_bytes(), name


class _SlowTokenizer:
    """The demo tokenizer without its Rust backend, as GLM-4's own glm-4-9b-chat tokenizer is."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, name):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._tok, name)


def test_glm4_on_a_slow_tokenizer_equals_the_fast_one(tok, tmp_path):
    slow = _SlowTokenizer(tok)
    for conv in rich_conversations():
        assert encode_conversation(conv, slow) == encode_conversation(conv, tok)
    p = tmp_path / "c.jsonl"
    write_jsonl(demo_conversations(20, seed=7), p)
    common = dict(cache_dir=False, progress=False, num_workers=1)
    assert list(encode_file(p, slow, **common)[0]) == list(encode_file(p, tok, **common)[0])
    with pytest.raises(ValueError, match="needs a fast tokenizer"):
        encode_conversation(PLAIN, slow, template="chat_template")


def test_remote_code_tokenizer_needs_trust_remote_code(tmp_path):
    for f in data.DEMO_TOKENIZER_DIR.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("tokenizer_class")
    cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenization_custom.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    with pytest.raises(ValueError, match="set trust_remote_code: true"):
        load_tokenizer(str(tmp_path))
    assert type(load_tokenizer(str(tmp_path), trust_remote_code=True)).__name__ == "CustomTokenizer"


def test_template_auto_is_glm4_only_for_a_tokenizer_that_renders_as_glm4(chatml):
    """GLM-4's per-message rule for the demo's (GLM-4's) template; the tokenizer's own template for ChatML,
    and for GLM-4.6, which starts with [gMASK]<sop> too but renders turns otherwise (reasoning, no
    metadata line); explicit names stay as given."""
    from pathlib import Path

    from trainer.templates import resolve_template

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "templates"
    demo = data.load_tokenizer("demo")
    glm46 = data.load_tokenizer("demo")
    glm46.chat_template = (fixtures / "GLM-4.6.jinja").read_text()
    assert resolve_template("auto", demo) == "glm4"
    assert resolve_template("auto", glm46) == "chat_template"
    assert resolve_template("auto", chatml) == "chat_template"
    assert resolve_template("glm4", chatml) == "glm4"
    assert resolve_template("chat_template", demo) == "chat_template"
    assert data.make_template("auto", demo, "all").name == "glm4"
    assert data.make_template("auto", glm46, "all").name == "chat_template"
