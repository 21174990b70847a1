"""Data in: sources (JSONL with a BOM, Parquet, datasets directories), ShareGPT, record-level tools and
template kwargs, tool-call arguments as strings or objects, the cheap length bound, and what the
summary counts."""

from __future__ import annotations

import copy
import json

import pytest

from tests.trainer.test_templates import CONVERSATIONS, family_tokenizer, labelled_text, reference_labels
from trainer.data import DataError, encode_conversation, encode_file, load_conversations, load_tokenizer

RECORDS = [copy.deepcopy(CONVERSATIONS[k]) for k in ("multi_turn", "tool_call", "reasoning")]


@pytest.fixture(scope="module")
def qwen3():
    return family_tokenizer("qwen3")


@pytest.fixture(scope="module")
def demo():
    return load_tokenizer("demo")


def _jsonl(tmp_path, records, name="d.jsonl", prefix=""):
    p = tmp_path / name
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    p.write_text(prefix + lines, encoding="utf-8")
    return p


def _encode(path, tok, **kw):
    kw = {"template": "chat_template", "cache_dir": False, "progress": False, "num_workers": 1, **kw}
    return encode_file(path, tok, **kw)


def test_bom_is_accepted(tmp_path, qwen3):
    plain, _ = _encode(_jsonl(tmp_path, RECORDS), qwen3)
    with_bom, _ = _encode(_jsonl(tmp_path, RECORDS, "bom.jsonl", prefix="\ufeff"), qwen3)
    assert list(with_bom) == list(plain)
    assert len(load_conversations(tmp_path / "bom.jsonl")) == len(RECORDS)


def test_parquet_and_datasets_directory(tmp_path, qwen3):
    datasets = pytest.importorskip("datasets")

    want, _ = _encode(_jsonl(tmp_path, RECORDS), qwen3)
    rows = [{"messages": json.dumps(r["messages"]), "tools": json.dumps(r.get("tools"))} for r in RECORDS]
    ds = datasets.Dataset.from_list(rows).map(
        lambda r: {"messages": json.loads(r["messages"]), "tools": json.loads(r["tools"])},
        remove_columns=["messages", "tools"],
    )  # datasets fills missing keys with null across rows: the reader must take that as absent
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "d.parquet", tmp_path / "saved"):
        got, summary = _encode(source, qwen3)
        assert list(got) == list(want), source
        assert summary.conversations == len(RECORDS)


def test_sharegpt_is_converted(tmp_path, qwen3):
    share = {
        "system": "You are terse.",
        "conversations": [
            {"from": "human", "value": "Hello 你好"},
            {"from": "gpt", "value": "Hi! 你好！"},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4, of course."},
        ],
    }
    got, _ = _encode(_jsonl(tmp_path, [share]), qwen3)
    want, _ = _encode(_jsonl(tmp_path, [CONVERSATIONS["multi_turn"]], "o.jsonl"), qwen3)
    assert list(got) == list(want)
    bad = {"conversations": [{"from": "robot", "value": "x"}]}
    with pytest.raises(DataError, match=r":1: turn 1: unknown 'from' 'robot'"):
        _encode(_jsonl(tmp_path, [bad], "b.jsonl"), qwen3)


def test_arguments_as_string_or_object_encode_alike(qwen3):
    rec = copy.deepcopy(CONVERSATIONS["tool_call"])
    as_string = copy.deepcopy(rec)
    call = as_string["messages"][1]["tool_calls"][0]["function"]
    call["arguments"] = json.dumps(call["arguments"])
    a = encode_conversation(rec["messages"], qwen3, template="chat_template", tools=rec["tools"])
    b = encode_conversation(as_string["messages"], qwen3, template="chat_template", tools=rec["tools"])
    assert a == b
    assert '"arguments": {"city": "Paris"}' in qwen3.decode(a.input_ids)  # not double-encoded


def test_record_tools_reach_the_prompt_and_are_validated(tmp_path, qwen3, demo):
    rec = CONVERSATIONS["tool_call"]
    e = encode_conversation(rec["messages"], qwen3, template="chat_template", tools=rec["tools"])
    text = qwen3.decode(e.input_ids)
    assert "<tools>" in text and '"name": "get_time"' in text
    assert "get_time" not in labelled_text(qwen3, e)  # tool definitions are never targets
    # GLM-4: record-level tools go on a system message, as GLM-4's own data has them
    glm = encode_conversation(rec["messages"], demo, tools=rec["tools"])
    assert "## get_weather" in demo.decode(glm.input_ids)
    bad = {"messages": rec["messages"], "tools": [{"type": "function", "function": {"description": "x"}}]}
    with pytest.raises(DataError, match=r"d.jsonl:2: record: tool 1 has no function name"):
        _encode(_jsonl(tmp_path, [RECORDS[0], bad]), qwen3)


def test_chat_template_kwargs_per_record(qwen3):
    rec = CONVERSATIONS["multi_turn"]
    off = encode_conversation(
        rec["messages"], qwen3, template="chat_template", chat_template_kwargs={"enable_thinking": False}
    )
    on = encode_conversation(rec["messages"], qwen3, template="chat_template")
    # Qwen3 writes an empty think block in the last turn either way; with thinking off the
    # generation prompt holds it, so it is prompt, not target.
    assert labelled_text(qwen3, on).endswith("<think>\n\n</think>\n\n4, of course.<|im_end|>")
    assert labelled_text(qwen3, off) == "Hi! 你好！<|im_end|>4, of course.<|im_end|>"


def test_reasoning_kept_where_the_template_keeps_it(qwen3):
    rec = CONVERSATIONS["reasoning"]
    text = labelled_text(qwen3, encode_conversation(rec["messages"], qwen3, template="chat_template"))
    assert "6 times 7 is 42." in text  # the last turn keeps its reasoning
    assert "3 times 7 is 21." not in text  # Qwen3 drops an earlier turn's: it is not trained either


def test_unexpressible_conversations_are_counted(tmp_path):
    gemma = family_tokenizer("gemma2")  # no system role
    ok = {"messages": CONVERSATIONS["multi_turn"]["messages"][1:]}
    ds, s = _encode(_jsonl(tmp_path, [ok, CONVERSATIONS["multi_turn"], ok]), gemma)
    assert len(ds) == 2 and s.skipped_template == 1
    assert "d.jsonl:2: " in s.skip_example and "System role not supported" in s.format()
    assert "chat_template: rendered once, tokenized once" in s.format()


def test_far_overlong_conversation_is_dropped_before_tokenizing(tmp_path, demo, monkeypatch):
    from trainer import templates

    seen = []
    encode = templates.Glm4Template.encode
    monkeypatch.setattr(
        templates.Glm4Template, "encode", lambda self, convs: seen.extend(convs) or encode(self, convs)
    )
    huge = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "w " * 400_000}]}
    common = dict(max_length=512, cache_dir=False, progress=False, num_workers=1)
    ds, s = encode_file(_jsonl(tmp_path, [RECORDS[0], huge]), demo, **common)
    assert s.dropped_overlong == 1 and len(ds) == 1
    assert all(len(c.messages[-1]["content"]) < 10_000 for c, _ in seen)  # never tokenized
    ds, s = encode_file(_jsonl(tmp_path, [huge, RECORDS[0]], "t.jsonl"), demo, overlong="truncate", **common)
    assert len(ds) == 1 and s.skipped_no_label == 1


def test_tekken_tokenizer_labels(qwen3):
    pytest.importorskip("mistral_common")
    from pathlib import Path

    import mistral_common
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    from tests.trainer.test_templates import FIXTURES

    data = Path(mistral_common.__file__).parent / "data"
    template = (FIXTURES / "mistralai-Mistral-Nemo-Instruct-2407.jinja").read_text()
    tok = convert_tekken_tokenizer(str(data / "tekken_240718.json"), chat_template=template)
    for name in ("multi_turn", "tool_call", "loss_false"):
        rec = copy.deepcopy(CONVERSATIONS[name])
        e = encode_conversation(rec["messages"], tok, template="chat_template", tools=rec.get("tools"))
        msgs = rec["messages"]
        trained = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and m.get("loss", True)]
        assert labelled_text(tok, e) == reference_labels(tok, "mistral", rec, trained), name
        full = tok.apply_chat_template(msgs, tools=rec.get("tools"), tokenize=True, return_dict=False)
        assert e.input_ids == full  # one tokenization, the same ids as the plain path


ORPHANS = {
    "after a user turn": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "21"}],
    "at the start": [{"role": "tool", "content": "21"}, {"role": "assistant", "content": "ok"}],
    "after a system message": [{"role": "system", "content": "s"}, {"role": "observation", "content": "21"},
                               {"role": "assistant", "content": "ok"}],
}  # fmt: skip
ORPHAN_PROBLEMS = {
    "after a user turn": "message 2: tool result after the user message; a tool result must follow",
    "at the start": "message 1: tool result at the start",
    "after a system message": "message 2: observation result after the system message",
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ORPHANS))
def test_a_tool_result_that_answers_no_call_is_one_line_naming_file_and_line(tmp_path, demo, case):
    """It used to be trained on silently (GLM-4 and chat templates render it as if a call had been made)."""
    path = _jsonl(tmp_path, [RECORDS[0], {"messages": ORPHANS[case]}])
    expected = f"^{path}:2: {ORPHAN_PROBLEMS[case]}"
    for template in ("glm4", "chat_template"):
        with pytest.raises(DataError, match=expected):
            _encode(path, demo, template=template)
    with pytest.raises(DataError, match=expected):
        load_conversations(path)


def test_tool_results_after_an_assistant_turn_are_accepted(tmp_path, demo):
    """After tool_calls, after GLM-4's metadata call, and after a call written in the text (Hermes style),
    one result or several in a row."""
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
    glm = {"role": "assistant", "metadata": "f", "content": "{}"}
    text = {"role": "assistant", "content": '<tool_call>{"name": "f"}</tool_call>'}
    records = [
        {"messages": [{"role": "user", "content": "q"}, turn, {"role": "tool", "content": "1"},
                      {"role": "tool", "content": "2"}, {"role": "assistant", "content": "a"}]}
        for turn in (call, glm, text)
    ]  # fmt: skip
    assert len(load_conversations(_jsonl(tmp_path, records))) == 3
