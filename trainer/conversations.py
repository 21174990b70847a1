"""Reading and validating conversation records.

Sources: JSONL (one record a line), one JSON array of records, Parquet, a Hugging Face ``datasets``
directory (``save_to_disk``) or a dataset id that ``datasets.load_dataset`` resolves. A record is
``{"messages": [...]}`` (OpenAI / Hugging Face layout, or GLM-4's fine-tuning format) with optional
record-level ``"tools"`` (a list of function specs) and ``"chat_template_kwargs"`` (e.g.
``{"enable_thinking": false}``), or ShareGPT's ``{"conversations": [{"from": ..., "value": ...}]}``,
converted on read.

A message: ``role`` system / user / assistant / tool (GLM-4: observation); ``content`` a string or a
list of text parts (``[{"type": "text", "text": ...}]``); an assistant may carry ``reasoning_content``
(or ``reasoning`` / ``thinking``) and OpenAI ``tool_calls`` whose ``arguments`` are a JSON string or
an object; ``"loss": false`` keeps a message out of the loss.

Every problem is reported as ``DataError("<file>:<line>: <problem>")``, one line.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant", "observation", "tool")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function_response": "tool",
}


class DataError(ValueError):
    """Bad input data. The message is one line: ``<file>:<line>: <problem>``."""


class Problem(Exception):
    """A problem in one record; the caller adds the file and line."""


class LineProblem(Exception):
    """A problem whose line is known where it is found (inside a JSON array)."""

    def __init__(self, line: int, problem: str):
        super().__init__(problem)
        self.line, self.problem = line, problem


@dataclass
class Conversation:
    """A validated record: messages in the form the template expects, and per message whether it
    may carry loss (``"loss": false`` says no)."""

    messages: list[dict]
    may_train: list[bool]
    tools: list | None = None
    kwargs: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Sources


def read_bytes(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}:0: cannot read: {e.strerror}") from None


def decode_text(path, raw: bytes) -> str:
    """UTF-8 text; a leading byte-order mark (what many Windows editors write) is dropped."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    return text[1:] if text.startswith("\ufeff") else text


def iter_json_items(text: str) -> Iterator[tuple[int, str]]:
    """(line number, JSON text) of each record: JSONL lines, or the elements of a JSON array."""
    stripped = text.lstrip()
    if not stripped.startswith("["):
        for i, line in enumerate(text.split("\n")):
            if line.strip():
                yield i + 1, line
        return
    dec = json.JSONDecoder()
    pos, n = len(text) - len(stripped) + 1, len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n:
            raise Problem("JSON array is not closed with ']'")
        if text[pos] == "]":
            return
        start = pos
        try:
            _, pos = dec.raw_decode(text, start)
        except json.JSONDecodeError as e:
            raise LineProblem(text.count("\n", 0, e.pos) + 1, f"invalid JSON: {e.msg}") from None
        yield text.count("\n", 0, start) + 1, text[start:pos]


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise Problem(f"duplicate key {k!r} in a JSON object")
        out[k] = v
    return out


def parse_json_record(text: str) -> dict:
    try:
        record = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise Problem(f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict):
        raise Problem(f"expected an object with 'messages', got {type(record).__name__}")
    return record


def is_dataset_source(path) -> bool:
    """A Parquet file, a ``save_to_disk`` directory, or a name that is no local file (a dataset id)."""
    p = Path(path)
    return p.suffix == ".parquet" or p.is_dir() or (not p.exists() and "/" in str(path) and p.suffix == "")


def dataset_records(path) -> tuple[list[dict], str]:
    """Rows of a Parquet file or a Hugging Face dataset, and a fingerprint of their content."""
    p = Path(path)
    try:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(p).to_pylist()
            return rows, hashlib.blake2b(p.read_bytes(), digest_size=20).hexdigest()
        import datasets

        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
        else:
            ds = datasets.load_dataset(str(path), split="train")
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}:0: a dataset with splits {list(ds)} and no 'train' split")
            ds = ds["train"]
        return ds.to_list(), f"{ds._fingerprint}:{len(ds)}"
    except DataError:
        raise
    except Exception as e:  # pyarrow / datasets raise many kinds; one line is what the user needs
        raise DataError(f"{path}:0: cannot read as a dataset: {type(e).__name__}: {e}") from None


def source_digest(path) -> tuple[str, object]:
    """A digest of the source's content, and what ``iter_items`` needs to read it without reading
    the file twice (its bytes, or the dataset's rows)."""
    if is_dataset_source(path):
        rows, digest = dataset_records(path)
        return digest, rows
    raw = read_bytes(path)
    return hashlib.blake2b(raw, digest_size=20).hexdigest(), raw


def iter_items(path, loaded=None) -> list[tuple[int, str | dict]]:
    """(line or row number, JSON text or record) of every record in ``path``."""
    if loaded is None:
        _, loaded = source_digest(path)
    if isinstance(loaded, list):
        return [(i + 1, row) for i, row in enumerate(loaded)]
    text = decode_text(path, loaded)
    try:
        return list(iter_json_items(text))
    except LineProblem as e:
        raise DataError(f"{path}:{e.line}: {e.problem}") from None
    except Problem as e:
        raise DataError(f"{path}:{text.count(chr(10)) + 1}: {e}") from None


def as_record(item: str | dict) -> dict:
    """The record as ``{"messages": ...}``: ShareGPT is converted, and a preference pair reads as its
    prompt and chosen answer, the answer alone trained (so SFT and ``eval_generate`` take a preference
    file as it is)."""
    record = parse_json_record(item) if isinstance(item, str) else item
    if "messages" not in record:
        if "conversations" in record:
            return from_sharegpt(record)
        if "chosen" in record:
            return preference_records(record)[0]
        raise Problem("missing 'messages'")
    return record


def load_conversations(path) -> list[dict]:
    """Parse and validate every record of a file or dataset; returns the records as written
    (ShareGPT converted). Raises ``DataError("<file>:<line>: <problem>")``."""
    records = []
    items = iter_items(path)
    for line, item in items:
        try:
            record = as_record(item)
            normalize(record, glm4=False)
        except Problem as e:
            raise DataError(f"{path}:{line}: {e}") from None
        records.append(record)
    if not records:
        raise DataError(f"{path}:1: no conversations in the file")
    return records


# ---------------------------------------------------------------------------------------------
# Preference pairs


def _as_messages(value, role: str, key: str) -> list:
    """A string is one ``role`` message; a message object is a list of one; a list is kept."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise Problem(f"'{key}' must be a string or a list of messages, got {type(value).__name__}")


def preference_pair(record: dict) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) message lists of a preference record: ``{"prompt", "chosen",
    "rejected"}`` with strings (a user turn and assistant answers) or message lists (TRL's standard and
    conversational forms), or TRL's implicit prompt: ``chosen`` and ``rejected`` whole conversations whose
    common leading messages are the prompt. Each answer must hold an assistant message."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise Problem(f"a preference record needs 'prompt', 'chosen' and 'rejected'; missing '{key}'")
    chosen = _as_messages(record["chosen"], "assistant", "chosen")
    rejected = _as_messages(record["rejected"], "assistant", "rejected")
    if record.get("prompt") is not None:
        prompt = _as_messages(record["prompt"], "user", "prompt")
    else:  # implicit prompt: the messages both conversations share
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in answer):
            raise Problem(f"'{key}' has no assistant message to score")
    if not prompt:
        raise Problem("a preference record needs a prompt ('prompt', or leading messages chosen and "
                      "rejected share)")  # fmt: skip
    return prompt, chosen, rejected


def _record_extras(record: dict) -> dict:
    """The record-level keys a conversation carries besides its messages."""
    return {k: record[k] for k in ("tools", "chat_template_kwargs") if record.get(k) is not None}


def preference_records(record: dict) -> tuple[dict, dict]:
    """The chosen and the rejected conversation of a preference record, each a ``{"messages"}`` record
    whose prompt messages carry ``"loss": false``: only the answer is scored."""
    prompt, chosen, rejected = preference_pair(record)
    if isinstance(record.get("tools"), str):
        record = {**record, "tools": _json_value(record["tools"], "'tools'")}  # TRL datasets keep JSON text
    quiet = [{**m, "loss": False} if isinstance(m, dict) else m for m in prompt]
    extras = _record_extras(record)
    return {**extras, "messages": quiet + chosen}, {**extras, "messages": quiet + rejected}


def without_oldest_turns(pair: tuple[dict, dict], turns: int) -> tuple[dict, dict] | None:
    """The pair of :func:`preference_records` with the prompt's first ``turns`` user turns dropped, each
    with the replies and tool results that follow it; leading system (or developer) messages stay, and
    the pair keeps one prompt. None when the prompt has no more than ``turns`` user turns to give."""
    chosen, rejected = (conversation["messages"] for conversation in pair)
    prompt = 0  # the unscored messages both conversations share
    while (prompt < min(len(chosen), len(rejected)) and chosen[prompt] == rejected[prompt]
           and isinstance(chosen[prompt], dict) and chosen[prompt].get("loss") is False):  # fmt: skip
        prompt += 1
    head = 0
    while head < prompt and chosen[head].get("role") in ("system", "developer"):
        head += 1
    users = [i for i in range(head, prompt) if chosen[i].get("role") == "user"]
    if turns >= len(users):
        return None
    start = users[turns]
    return tuple({**c, "messages": c["messages"][:head] + c["messages"][start:]} for c in pair)


# ---------------------------------------------------------------------------------------------
# ShareGPT


def from_sharegpt(record: dict) -> dict:
    """``{"conversations": [{"from", "value"}], "system"?, "tools"?}`` -> ``{"messages": [...]}``."""
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise Problem(f"'conversations' must be a list, got {type(turns).__name__}")
    messages = []
    if isinstance(record.get("system"), str) and record["system"]:
        messages.append({"role": "system", "content": record["system"]})
    for i, t in enumerate(turns):
        who = t.get("from") if isinstance(t, dict) else None
        if who not in SHAREGPT_ROLES:
            raise Problem(
                f"turn {i + 1}: unknown 'from' {who!r} (expected one of {', '.join(SHAREGPT_ROLES)})"
            )
        value = t.get("value")
        if who == "function_call":
            call = _json_value(value, f"turn {i + 1}")
            calls = call if isinstance(call, list) else [call]
            messages.append(
                {"role": "assistant", "content": "", "tool_calls": [{"function": c} for c in calls]}
            )
        else:
            messages.append({"role": SHAREGPT_ROLES[who], "content": value})
        if isinstance(t, dict) and "loss" in t:
            messages[-1]["loss"] = t["loss"]
    out = {"messages": messages}
    tools = record.get("tools")
    if tools:
        out["tools"] = _json_value(tools, "'tools'") if isinstance(tools, str) else tools
    return out


def _json_value(value, where: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise Problem(f"{where}: not valid JSON: {e.msg}") from None


# ---------------------------------------------------------------------------------------------
# Validation


def check_tools(tools, where: str) -> list:
    """A list of function specs ``{"type": "function", "function": {"name": ...}}`` (or bare specs)."""
    if not isinstance(tools, list):
        raise Problem(f"{where}: 'tools' must be a list, got {type(tools).__name__}")
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise Problem(f"{where}: tool {j + 1} must be an object, got {type(tool).__name__}")
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise Problem(f"{where}: tool {j + 1} has no function name")
    return tools


def _glm4_tools(tools) -> list:
    """GLM-4's ``process_message``: drop tool parameters whose value is null (on a copy)."""
    tools = copy.deepcopy(tools)
    for tool in tools:
        fn = tool.get("function")
        params = fn.get("parameters") if isinstance(fn, dict) else None
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict):
            params["properties"] = {k: v for k, v in props.items() if v is not None}
    return tools


def content_text(content, where: str, *, allow_null: bool) -> str:
    """A string, or the text of a list of text parts joined; null only where ``allow_null``."""
    if isinstance(content, str):
        return content
    if content is None and allow_null:
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif (
                isinstance(part, dict)
                and part.get("type", "text") == "text"
                and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise Problem(
                    f"{where}: content part {j + 1} is not text (type {kind!r}); only text is trained"
                )
        return "".join(texts)
    got = "null" if content is None else type(content).__name__
    raise Problem(f"{where}: content must be a string or a list of text parts, got {got}")


def tool_calls(calls, where: str) -> list[dict]:
    """OpenAI tool calls with ``arguments`` parsed to an object (a JSON string is decoded once)."""
    if not isinstance(calls, list):
        raise Problem(f"{where}: 'tool_calls' must be a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise Problem(f"{where}: tool call {j + 1} has no function name")
        args = fn.get("arguments", fn.get("parameters", {}))
        if args is None:
            args = {}
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise Problem(
                    f"{where}: tool call {j + 1} ({name}) has unparseable arguments: {e.msg}"
                ) from None
        if not isinstance(args, dict):
            raise Problem(f"{where}: tool call {j + 1} ({name}) arguments must be a JSON object")
        c = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call, dict) and call.get("id") is not None:
            c["id"] = call["id"]
        out.append(c)
    return out


def _message(m, i: int) -> tuple[dict, bool, list | None]:
    """One validated message (content a string, tool calls parsed, reasoning under
    ``reasoning_content``), whether it may carry loss, and the tools a system message carries."""
    where = f"message {i + 1}"
    if not isinstance(m, dict):
        raise Problem(f"{where}: expected an object, got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise Problem(
            f"{where}: unknown role {role!r} (expected system, user, assistant, observation or tool)"
        )
    loss = m.get("loss", True)
    if not isinstance(loss, bool):
        raise Problem(f"{where}: 'loss' must be true or false, got {loss!r}")
    calls = m.get("tool_calls")
    if calls is not None and role != "assistant":
        raise Problem(f"{where}: 'tool_calls' on a {role} message")
    msg = {
        k: v
        for k, v in m.items()
        if k not in ("loss", "tools", "tool_calls", *REASONING_KEYS) and v is not None
    }
    msg["role"] = role
    msg["content"] = content_text(m.get("content"), where, allow_null=bool(calls))
    metadata = m.get("metadata")  # null (datasets fills missing keys so) is absent, not "None"
    if metadata is not None and not isinstance(metadata, str):
        raise Problem(f"{where}: metadata must be a string, got {type(metadata).__name__}")
    reasoning = next((m[k] for k in REASONING_KEYS if m.get(k) is not None), None)
    if reasoning is not None:
        if role != "assistant":
            raise Problem(f"{where}: reasoning on a {role} message")
        msg["reasoning_content"] = content_text(reasoning, where + " reasoning", allow_null=False)
    if calls:
        msg["tool_calls"] = tool_calls(calls, where)
    tools = m.get("tools")
    if tools is not None and role == "system":
        tools = check_tools(tools, where)
    else:
        tools = None  # GLM-4 deletes tools on other roles; dataset libraries inject tools: null
    return msg, loss, tools


def normalize(record: dict, *, glm4: bool) -> Conversation:
    """A validated ``Conversation`` from a record.

    ``glm4=False``: the messages for a Hugging Face chat template; record-level ``tools`` (or a
    system message's) go to ``tools=``. ``glm4=True``: GLM-4's form: ``tool`` -> observation, each
    tool call its own assistant message with the name in ``metadata``, tools on a system message
    with null parameters dropped.
    """
    messages = record["messages"]
    if not isinstance(messages, list):
        raise Problem(f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise Problem("'messages' is empty")
    tools = record.get("tools")
    if tools is not None:
        tools = check_tools(tools, "record")
    kwargs = record.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise Problem(f"'chat_template_kwargs' must be an object, got {type(kwargs).__name__}")
    out, may_train = [], []
    before = None  # the role of the last message that is not a tool result
    for i, m in enumerate(messages):
        msg, loss, sys_tools = _message(m, i)
        if msg["role"] in ("tool", "observation"):
            # what called the tool (tool_calls, GLM-4's metadata, or a call written in the text) is an
            # assistant turn; a result after anything else answers no call
            if before != "assistant":
                after = f"after the {before} message" if before else "at the start"
                raise Problem(f"message {i + 1}: {msg['role']} result {after}; a tool result must follow "
                              "the assistant turn that called the tool")  # fmt: skip
        else:
            before = msg["role"]
        if glm4:
            for g in _to_glm4(msg, sys_tools):
                out.append(g)
                may_train.append(loss)
            continue
        if sys_tools is not None:
            msg["tools"] = _glm4_tools(sys_tools)  # GLM-4-style templates read tools from the message
            tools = tools if tools is not None else sys_tools
        out.append(msg)
        may_train.append(loss)
    if glm4 and tools is not None:
        out, may_train = _glm4_record_tools(out, may_train, tools)
    return Conversation(out, may_train, None if glm4 else tools, kwargs)


def _to_glm4(msg: dict, tools) -> list[dict]:
    role = "observation" if msg["role"] == "tool" else msg["role"]
    g = {"role": role, "content": msg["content"]}
    if "metadata" in msg:
        g["metadata"] = msg["metadata"]
    if tools is not None:
        g["tools"] = _glm4_tools(tools)
    calls = [
        {
            "role": "assistant",
            "metadata": c["function"]["name"],
            "content": json.dumps(c["function"]["arguments"], ensure_ascii=False),
        }
        for c in msg.get("tool_calls", [])
    ]
    return ([g] if not calls or msg["content"] else []) + calls


def _glm4_record_tools(messages, may_train, tools):
    """Record-level tools go on the first system message, or a new empty one in front."""
    if messages[0]["role"] == "system" and "tools" not in messages[0]:
        messages[0]["tools"] = _glm4_tools(tools)
        return messages, may_train
    return [{"role": "system", "content": "", "tools": _glm4_tools(tools)}, *messages], [False, *may_train]


def trainable(messages: list[dict], may_train: list[bool], loss_on: str) -> list[bool]:
    """Per message: whether it is trained (an assistant message, allowed, and the last one for
    ``loss_on="last"``)."""
    flags = [m["role"] == "assistant" and ok for m, ok in zip(messages, may_train, strict=True)]
    if loss_on == "last":
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        flags = [f and i == last for i, f in enumerate(flags)]
    return flags
