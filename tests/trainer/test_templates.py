"""The chat-template rule on real templates of the families people fine-tune (tests/fixtures/templates).

Each family's tokenizer is the demo tokenizer with the family's template and special tokens. The
reference is independent of trainer/templates.py: a regular expression per family, written from
the family's documented turn format, cuts the full rendering into assistant turns (header
excluded, end-of-turn marker included); the text of the trained turns must equal the decoded
labelled tokens. A conversation a family's template cannot express must be refused with one clear
error, never labelled as something else; which ones are refused is pinned below.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trainer.data import DEMO_TOKENIZER_DIR, IGNORE_INDEX, DataError, encode_conversation
from trainer.templates import render

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "templates"

_CHATML = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>"]
_LLAMA = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
_MISTRAL = ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]"]
_MISTRAL += ["[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]", "[CALL_ID]"]
_GLM = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>"]
_GLM += ["</arg_value>", "<tool_response>", "</tool_response>"]
_DEEPSEEK = [
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁call▁begin｜>",
]
_DEEPSEEK += ["<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "<｜tool▁outputs▁begin｜>"]
_DEEPSEEK += ["<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁outputs▁end｜>"]
_GPTOSS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
_GEMMA4 = ["<|turn>", "<turn|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>"]
_GEMMA4 += ["<tool_response|>", '<|"|>', "<|channel>", "<channel|>", "<|think|>", "<|image|>"]
_FALCON3 = ["<|system|>", "<|user|>", "<|assistant|>"]
_TOOL_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>"]
_MINIMAX = ["]~!b[", "]~b]", "[e~[", "<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>"]
_GRANITE = ["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", *_TOOL_TAGS]

# The reference: a regular expression whose group 1 is one assistant message as rendered, from
# after its header through its end-of-turn marker (GLM: up to the next role token, which ends it).
_TURN = {
    "chatml": r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)",
    # TRL's training copy puts the newline after <|im_end|> inside its generation block
    "chatml-generation": r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)",
    "llama3": r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n(.*?<\|eo[tm]_id\|>)",
    "mistral": r"\[/(?:INST|TOOL_RESULTS)\](?!\[TOOL_RESULTS\])(.*?</s>)",
    "gemma": r"<start_of_turn>model\n(.*?<end_of_turn>)",
    "phi3": r"<\|assistant\|>\n(.*?<\|end\|>)",
    "phi4": r"<\|im_start\|>assistant<\|im_sep\|>(.*?<\|im_end\|>)",
    "gptoss": r"<\|start\|>assistant((?:<\|channel\|>analysis<\|message\|>.*?<\|end\|><\|start\|>assistant)?"
    r".*?<\|(?:end|return|call)\|>)",
    "glm": r"<\|assistant\|>(.*?(?:<\|user\|>|<\|observation\|>|$))",
    # GLM-4.7's generation prompt ends with <think>: not generated, not trained
    "glm-think": r"<\|assistant\|>(?:<think>)?(.*?(?:<\|user\|>|<\|observation\|>|$))",
    # Qwen3.5's generation prompt ends with <think>\n
    "chatml-think": r"<\|im_start\|>assistant\n(?:<think>\n)?(.*?<\|im_end\|>)",
    # a model turn opens with <|turn>model or goes on after the tool results it asked for; it ends with
    # <turn|>, or with <|tool_response> where it calls a tool
    "gemma4": r"(?:<\|turn>model\n|<tool_response\|>(?!<\|tool_response>))"
    r"(.*?(?:<turn\|>|<\|tool_response>))",
    # <|assistant|> opens a turn with text (and a tool result); a tool call alone follows the user's line
    "falcon3": r"(?:<\|assistant\|>\n(?!<tool_response>)|\n\n(?=<tool_call>\n))(.*?<\|endoftext\|>)",
    "minimax": r"\]~b\]ai\n(?:<think>\n)?(.*?\[e~\[)",
    "granite": r"<\|start_of_role\|>assistant<\|end_of_role\|>(.*?<\|end_of_text\|>)",
    # V3.1's generation prompt (non-thinking) ends with <think></think>: not generated, not trained;
    # R1's template writes the answer (or a next call) after tool results with no header
    "deepseek": r"(?:<｜Assistant｜>(?:<think></think>)?|<｜tool▁outputs?▁end｜>(?!\s*<｜tool▁output)\s*)"
    r"(.*?<｜end▁of▁sentence｜>)",
}

# family: (fixture, turn format, special tokens, bos, eos)
FAMILIES = {
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", "chatml", _CHATML, None, "<|im_end|>"),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", "chatml", _CHATML, None, "<|im_end|>"),
    "qwen3-generation": ("trl-qwen3_training.jinja", "chatml-generation", _CHATML, None, "<|im_end|>"),
    "smollm3": ("HuggingFaceTB-SmolLM3-3B.jinja", "chatml", _CHATML, None, "<|im_end|>"),
    "llama3.1": (
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        "llama3",
        _LLAMA,
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    "llama3.2": (
        "meta-llama-Llama-3.2-3B-Instruct.jinja",
        "llama3",
        _LLAMA,
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    "llama3.3": (
        "meta-llama-Llama-3.3-70B-Instruct.jinja",
        "llama3",
        _LLAMA,
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    "mistral-small-3.2": ("Mistral-Small-3.2-24B-Instruct-2506.jinja", "mistral", _MISTRAL, "<s>", "</s>"),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral", _MISTRAL, "<s>", "</s>"),
    "gemma2": ("google-gemma-2-2b-it.jinja", "gemma", ["<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "gemma3": (
        "trl-gemma3.jinja",
        "gemma",
        ["<start_of_turn>", "<end_of_turn>", "<start_of_image>"],
        "<bos>",
        "<eos>",
    ),
    "phi3.5": (
        "microsoft-Phi-3.5-mini-instruct.jinja",
        "phi3",
        ["<|assistant|>", "<|end|>"],
        None,
        "<|endoftext|>",
    ),
    "phi4": (
        "microsoft-phi-4.jinja",
        "phi4",
        ["<|im_start|>", "<|im_sep|>", "<|im_end|>"],
        None,
        "<|im_end|>",
    ),
    "gpt-oss": ("openai-gpt-oss-120b.jinja", "gptoss", _GPTOSS, None, "<|return|>"),
    "glm4.5": ("trl-glm4moe.jinja", "glm", _GLM, None, "<|endoftext|>"),
    "glm4.6": ("GLM-4.6.jinja", "glm", _GLM, None, "<|endoftext|>"),
    "deepseek-r1": (
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
        "deepseek",
        _DEEPSEEK,
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),
    "deepseek-v3": (
        "trl-deepseekv3.jinja",
        "deepseek",
        _DEEPSEEK,
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),
    "deepseek-v3.1": (
        "deepseek-ai-DeepSeek-V3.1.jinja",
        "deepseek",
        _DEEPSEEK,
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
    ),
    # the current families (issue 23)
    "gemma4": ("google-gemma-4-31B-it.jinja", "gemma4", _GEMMA4, "<bos>", "<turn|>"),
    "qwen3.5": ("Qwen-Qwen3.5-4B.jinja", "chatml-think", _CHATML, None, "<|im_end|>"),
    "qwen3-coder": ("Qwen-Qwen3-Coder-30B-A3B-Instruct.jinja", "chatml", _CHATML, None, "<|im_end|>"),
    "glm4.7-flash": ("zai-org-GLM-4.7-Flash.jinja", "glm-think", _GLM, None, "<|endoftext|>"),
    "minimax-m2": ("MiniMaxAI-MiniMax-M2.jinja", "minimax", _MINIMAX, "]~!b[", "[e~["),
    "ministral3": (
        "mistralai-Ministral-3-14B-Reasoning-2512.jinja",
        "mistral",
        [*_MISTRAL, "[THINK]", "[/THINK]", "[IMG]"],
        "<s>",
        "</s>",
    ),
    "granite4": ("ibm-granite-granite-4.0.jinja", "granite", _GRANITE, None, "<|end_of_text|>"),
    "falcon3": (
        "tiiuae-Falcon3-7B-Instruct.jinja",
        "falcon3",
        [*_FALCON3, *_TOOL_TAGS],
        None,
        "<|endoftext|>",
    ),
    # the same template where the tool tags are plain text, not tokens of their own
    "falcon3-text-tags": ("tiiuae-Falcon3-7B-Instruct.jinja", "falcon3", _FALCON3, None, "<|endoftext|>"),
}

_CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the local time in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
]


def _call(name, city, i):
    # keys in the order the loader writes them: Falcon3's template writes the whole call with tojson
    return {"type": "function", "function": {"name": name, "arguments": {"city": city}}, "id": f"call{i:05d}"}


CONVERSATIONS = {
    "multi_turn": {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello 你好"},
            {"role": "assistant", "content": "Hi! 你好！"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4, of course."},
        ]
    },
    "tool_call": {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", "Paris", 1)]},
            {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temp": 15}'},
            {"role": "assistant", "content": "It is 15 degrees in Paris."},
        ],
    },
    "parallel_calls": {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Weather and time in Rome?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [_call("get_weather", "Rome", 2), _call("get_time", "Rome", 3)],
            },
            {"role": "tool", "tool_call_id": "call00002", "name": "get_weather", "content": '{"temp": 30}'},
            {"role": "tool", "tool_call_id": "call00003", "name": "get_time", "content": '{"time": "14:05"}'},
            {"role": "assistant", "content": "30 degrees, and it is 14:05."},
        ],
    },
    "tool_steps": {  # a second call after the first one's result: Falcon3 and Gemma 4 write no header for it
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Weather and time in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", "Oslo", 4)]},
            {"role": "tool", "tool_call_id": "call00004", "name": "get_weather", "content": '{"temp": 3}'},
            {"role": "assistant", "content": "", "tool_calls": [_call("get_time", "Oslo", 5)]},
            {"role": "tool", "tool_call_id": "call00005", "name": "get_time", "content": '{"time": "09:30"}'},
            {"role": "assistant", "content": "3 degrees at 09:30."},
        ],
    },
    "content_parts": {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        ]
    },
    "reasoning": {
        "messages": [
            {"role": "user", "content": "What is 3*7?"},
            {"role": "assistant", "reasoning_content": "3 times 7 is 21.", "content": "21."},
            {"role": "user", "content": "And 6*7?"},
            {"role": "assistant", "reasoning_content": "6 times 7 is 42.", "content": "42."},
        ]
    },
    "loss_false": {
        "messages": [
            {"role": "user", "content": "Say A."},
            {"role": "assistant", "content": "A (a bad answer).", "loss": False},
            {"role": "user", "content": "Say B."},
            {"role": "assistant", "content": "B."},
        ]
    },
}

# What a family's template cannot express, and must refuse (with this in the error).
REFUSED = {
    ("gemma2", "multi_turn"): "System role not supported",
    ("gemma2", "tool_call"): "roles must alternate",
    ("gemma2", "parallel_calls"): "roles must alternate",
    ("gemma3", "tool_call"): "roles must alternate",
    ("gemma3", "parallel_calls"): "roles must alternate",
    ("llama3.1", "parallel_calls"): "single tool-calls",
    ("llama3.2", "parallel_calls"): "single tool-calls",
    ("llama3.3", "parallel_calls"): "single tool-calls",
    ("phi3.5", "tool_call"): "does not render 'get_weather'",
    ("phi3.5", "parallel_calls"): "does not render 'get_weather'",
    ("phi4", "tool_call"): "does not render 'get_weather'",
    ("phi4", "parallel_calls"): "does not render 'get_weather'",
    ("smollm3", "tool_call"): "does not render 'get_weather'",
    ("smollm3", "parallel_calls"): "does not render 'get_weather'",
    ("gpt-oss", "parallel_calls"): "does not render 'get_time'",  # one call per message in harmony
    ("gemma2", "tool_steps"): "roles must alternate",
    ("gemma3", "tool_steps"): "roles must alternate",
    ("phi3.5", "tool_steps"): "does not render 'get_weather'",
    ("phi4", "tool_steps"): "does not render 'get_weather'",
    ("smollm3", "tool_steps"): "does not render 'get_weather'",
}


def family_tokenizer(family: str):
    fixture, _, specials, bos, eos = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER_DIR))
    tok.add_special_tokens({"additional_special_tokens": specials})
    extra = {"eos_token": eos}
    if bos:
        extra["bos_token"] = bos
    tok.add_special_tokens(extra)
    tok.chat_template = (FIXTURES / fixture).read_text()
    return tok


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, family_tokenizer(request.param)


def reference_labels(tok, fmt: str, record: dict, trained: list[int]) -> str:
    """The trained assistant turns' text, cut from the full rendering by the family's turn format."""
    text = render(tok, record["messages"], record.get("tools"), record.get("chat_template_kwargs"))
    turns = re.findall(_TURN[fmt], text, flags=re.S)
    if fmt == "deepseek":  # R1/V3 write an empty extra assistant turn after a tool call: not a message
        turns = [t for t in turns if t != "<｜end▁of▁sentence｜>"]
    assistants = [i for i, m in enumerate(record["messages"]) if m["role"] == "assistant"]
    assert len(turns) == len(assistants), f"{len(turns)} assistant turns rendered for {len(assistants)}"
    out = ""
    for i, turn in zip(assistants, turns, strict=True):
        if i in trained:
            out += (
                turn
                if not fmt.startswith("glm") or turn.endswith(("<|user|>", "<|observation|>"))
                else turn + tok.eos_token
            )
    return out


def labelled_text(tok, e) -> str:
    return tok.decode([t for t in e.labels if t != IGNORE_INDEX])


def _arguments_as_strings(record):
    """Templates that concatenate arguments (DeepSeek R1's) get them as JSON strings in the reference."""
    import json

    record = copy.deepcopy(record)
    for m in record["messages"]:
        for c in m.get("tool_calls", []):
            c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
    return record


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_family_labels_match_reference(family, name):
    fam, tok = family
    record = copy.deepcopy(CONVERSATIONS[name])
    kwargs = dict(template="chat_template", tools=record.get("tools"))
    if (fam, name) in REFUSED:
        with pytest.raises(DataError, match=re.escape(REFUSED[(fam, name)])) as ei:
            encode_conversation(record["messages"], tok, **kwargs)
        assert "\n" not in str(ei.value)
        return
    e = encode_conversation(record["messages"], tok, **kwargs)
    assert e.input_ids[: len(e.labels)] == e.input_ids and len(e.labels) == len(e.input_ids)
    trained = [
        i for i, m in enumerate(record["messages"]) if m["role"] == "assistant" and m.get("loss", True)
    ]
    flat = copy.deepcopy(record)
    for m in flat["messages"]:  # the reference renders plain strings, as the loader hands them over
        if isinstance(m["content"], list):
            m["content"] = "".join(p["text"] for p in m["content"])
    try:
        render(tok, flat["messages"], flat.get("tools"))
    except TypeError:
        flat = _arguments_as_strings(flat)
    want = reference_labels(tok, FAMILIES[fam][1], flat, trained)
    assert labelled_text(tok, e) == want
    full = render(tok, flat["messages"], flat.get("tools"))
    assert tok.decode(e.input_ids).startswith(full) or FAMILIES[fam][1].startswith("glm")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_fast_render_equals_apply_chat_template(family, name):
    from trainer.conversations import normalize
    from trainer.templates import FastRenderer

    fam, tok = family
    fast = _RENDERERS.get(fam) or _RENDERERS.setdefault(fam, FastRenderer(tok))
    conv = normalize(copy.deepcopy(CONVERSATIONS[name]), glm4=False)
    try:
        want = tok.apply_chat_template(conv.messages, tools=conv.tools, tokenize=False)
    except Exception as e:  # the template refuses it: so must the fast path, with the same error
        with pytest.raises(type(e)):
            fast(conv.messages, conv.tools)
        return
    assert fast(conv.messages, conv.tools) == want


_RENDERERS: dict = {}


# ---------------------------------------------------------------------------------------------
# Turns with no header, and stops derived from the rendering (issue 23)


def _labelled(fam: str, name: str) -> str:
    tok = family_tokenizer(fam)
    record = copy.deepcopy(CONVERSATIONS[name])
    e = encode_conversation(record["messages"], tok, template="chat_template", tools=record.get("tools"))
    return labelled_text(tok, e)


@pytest.mark.parametrize("fam", ["falcon3", "falcon3-text-tags"])
def test_falcon3_tool_call_alone_is_a_turn_without_header(fam):
    """Falcon3 writes <|assistant|> only before text: a tool call alone follows the user's line after
    whitespace. That is the turn (what the model writes), not a refusal."""
    tok = family_tokenizer(fam)
    record = CONVERSATIONS["tool_call"]
    text = render(tok, record["messages"], TOOLS)
    assert "Weather in Paris?\n\n<tool_call>\n[" in text  # the rendering the rule is for
    got = _labelled(fam, "tool_call")
    assert got.startswith('<tool_call>\n[\n  {\n    "type": "function"')
    assert got.endswith("\n</tool_call><|endoftext|>It is 15 degrees in Paris.<|endoftext|>")


def test_gemma4_tool_call_turn_ends_with_tool_response():
    """Gemma 4 ends a tool-call turn with <|tool_response>, not its eos <turn|>: the arguments, <tool_call|>
    and that stop are trained; the answer after the results continues the turn with no header."""
    got = _labelled("gemma4", "tool_call")
    assert got == (
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>'
        "It is 15 degrees in Paris.<turn|>"
    )


def test_gemma4_turn_continued_after_tool_results_keeps_its_reasoning():
    """A second call after the first one's result continues the model turn with no header; the reasoning
    Gemma 4 writes before it (<|channel>thought ... <channel|>) is part of what the model writes."""
    tok = family_tokenizer("gemma4")
    record = copy.deepcopy(CONVERSATIONS["tool_steps"])
    record["messages"][3]["reasoning_content"] = "Now the time."
    e = encode_conversation(record["messages"], tok, template="chat_template", tools=TOOLS)
    assert labelled_text(tok, e) == (
        '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>'
        "<|channel>thought\nNow the time.\n<channel|>"
        '<|tool_call>call:get_time{city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>3 degrees at 09:30.<turn|>'
    )


# the stops derived from each template: the first is what ends an answer; GLM's end no last turn
STOPS = {
    "chatml": (["<|im_end|>"], True),
    "gemma4": (["<turn|>", "<|tool_response>"], True),
    "gpt-oss": (["<|return|>", "<|end|>", "<|call|>"], True),
    "glm4.6": (["<|user|>", "<|observation|>"], False),
    "glm4.7-flash": (["<|user|>", "<|observation|>"], False),
    "llama3.1": (["<|eot_id|>"], True),
    "mistral-small-3.2": (["</s>"], True),
    "deepseek-v3.1": (["<｜end▁of▁sentence｜>"], True),
    "falcon3": (["<|endoftext|>"], True),
    "minimax-m2": (["[e~["], True),
    "granite4": (["<|end_of_text|>"], True),
    "phi3.5": (["<|end|>"], True),
}


@pytest.mark.parametrize("fam", sorted(STOPS))
def test_stops_are_derived_from_the_rendering(fam):
    from trainer.templates import derive_stops

    tok = family_tokenizer("qwen2.5" if fam == "chatml" else fam)
    assert derive_stops(tok) == STOPS[fam]


def test_headerless_turn_after_other_text_is_still_refused():
    """Only whitespace, or an added token that closes the previous message, may stand between it and a
    turn without header; a role written as text is no header we know: one clear error."""
    tok = family_tokenizer("qwen2.5")
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}<|im_end|>\n"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = CONVERSATIONS["multi_turn"]["messages"]
    with pytest.raises(DataError, match="message 3: the rendering has no assistant header for it"):
        encode_conversation(messages, tok, template="chat_template")


def test_stops_line_cross_checks_the_generation_config(tmp_path):
    import json

    from trainer.templates import ChatTemplate, generation_eos_ids

    tok = family_tokenizer("gemma4")
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert generation_eos_ids(tok) is None
    assert (
        ChatTemplate(tok, "all", None).stops_line() == "stops <turn|>, <|tool_response> (from the template)"
    )
    ids = [tok.convert_tokens_to_ids(t) for t in ("<turn|>", "<|tool_response>")]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    assert generation_eos_ids(tok) == ids
    assert ChatTemplate(tok, "all", None).stops_line().endswith("; generation_config.json agrees")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids[0], tok.bos_token_id]}))
    line = ChatTemplate(tok, "all", None).stops_line()
    assert line.endswith("; generation_config.json adds <bos>, lacks <|tool_response>"), line
