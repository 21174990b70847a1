"""Conversations to ``input_ids`` and ``labels``, exactly as GLM-4's fine-tuning code builds them.

Input is GLM-4's fine-tuning format: JSONL with one ``{"messages": [...]}`` per line (or one JSON
array of such objects); roles system / user / assistant / observation; a system message may carry
``tools``; an assistant tool call carries the function name in ``metadata`` and JSON arguments in
``content``. OpenAI-style ``tool`` messages and assistant ``tool_calls`` are accepted and converted.

Labels follow the Hugging Face convention: aligned with ``input_ids`` (the model shifts them), -100
where there is no loss. Two ways to build them:

- ``template="glm4"``: GLM-4's ``process_batch``. ``[gMASK]<sop>``, then every message rendered alone
  with the tokenizer's chat template minus its leading ``[gMASK]<sop>``, then the chat end token
  (``<|user|>``; ``end_token="eos"`` for GLM-4's older code); the assistant mask shifted right by one.
  So ``<|assistant|>`` is never a target, the assistant's metadata, newline and content are, and so
  is the role token after an assistant turn: that is how GLM-4 learns to stop.
- ``template="chat_template"``: any tokenizer's chat template. Assistant character spans are found by
  rendering the conversation's prefixes; the text is tokenized once with offsets; tokens inside the
  spans are targets. A template with no end-of-turn marker after the assistant text (GLM-4) also gets
  the token that follows each span labelled.

``encode_file`` validates, encodes in parallel processes and caches the result on disk.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEMO_TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
DEMO_TRAIN_FILE = ASSETS_DIR / "demo_train.jsonl"
DEMO_VAL_FILE = ASSETS_DIR / "demo_val.jsonl"

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "observation")
TEMPLATES = ("glm4", "chat_template")
LOSS_ON = ("all", "last")
OVERLONG = ("drop", "truncate")
_CACHE_FORMAT = 1  # bump when the encoding or the cache layout changes
_CHUNK = 256  # conversations per worker task
_PIECE_CACHE_LIMIT = 500_000  # pre-tokens cached per process (~100 MB at most)


class DataError(ValueError):
    """Bad input data. The message is one line: ``<file>:<line>: <problem>``."""


class _Problem(Exception):
    """A problem in one conversation; the caller adds the file and line."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (the model shifts); IGNORE_INDEX where no loss


@dataclass
class DataSummary:
    path: str = ""
    conversations: int = 0
    kept: int = 0
    dropped_overlong: int = 0  # overlong="drop"
    truncated: int = 0  # overlong="truncate" (kept, cut on the right as GLM-4 does)
    skipped_no_label: int = 0  # no trainable token (after truncation, if any)
    tokens: int = 0  # in kept conversations
    label_tokens: int = 0  # tokens with a label in kept conversations
    max_length: int = 0
    overlong: str = "drop"
    from_cache: bool = False
    seconds: float = 0.0

    @property
    def label_fraction(self) -> float:
        return self.label_tokens / self.tokens if self.tokens else 0.0

    def format(self) -> str:
        source = "cache" if self.from_cache else "encoded"
        lines = [
            f"data {self.path}: {self.kept}/{self.conversations} conversations kept "
            f"({source}, {self.seconds:.1f}s)",
            f"  tokens {self.tokens:,}, with a label {self.label_tokens:,} "
            f"({100 * self.label_fraction:.1f}%)",
        ]
        if self.dropped_overlong:
            lines.append(f"  dropped {self.dropped_overlong} longer than max_length={self.max_length}")
        if self.truncated:
            lines.append(f"  truncated {self.truncated} to max_length={self.max_length}")
        if self.skipped_no_label:
            lines.append(f"  skipped {self.skipped_no_label} with no trainable token")
        return "\n".join(lines)


class EncodedDataset(Sequence):
    """Encoded conversations stored as flat arrays; items are ``Encoded`` built on access.

    Holding 10^8 tokens as Python lists would cost gigabytes, so ``encode_file`` returns this
    sequence instead of a plain list. ``lengths`` and ``label_counts`` are numpy arrays.
    """

    def __init__(self, ids: np.ndarray, label_mask: np.ndarray, offsets: np.ndarray):
        self.ids, self.label_mask, self.offsets = ids, label_mask, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} conversations")
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = np.asarray(self.ids[s:e], dtype=np.int64)
        labels = np.where(np.asarray(self.label_mask[s:e], dtype=bool), ids, IGNORE_INDEX)
        return Encoded(ids.tolist(), labels.tolist())

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(name_or_path: str):
    """``"demo"`` -> the built-in GLM-4-style tokenizer; anything else -> ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    path = DEMO_TOKENIZER_DIR if str(name_or_path) == "demo" else name_or_path
    tok = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer {name_or_path} is not a fast tokenizer; offsets need one")
    return tok


def _token_id(tokenizer, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id and token != tokenizer.unk_token:
        return None
    return int(tid)


def _resolve_end_token(tokenizer, end_token, template: str) -> int:
    if end_token is None:
        end_token = "<|user|>" if template == "glm4" else "eos"
    if isinstance(end_token, int) and not isinstance(end_token, bool):
        return end_token
    if end_token == "eos":
        if tokenizer.eos_token_id is None:
            raise ValueError("end_token='eos' but the tokenizer has no eos_token")
        return int(tokenizer.eos_token_id)
    if isinstance(end_token, str):
        tid = _token_id(tokenizer, end_token)
        if tid is None:
            raise ValueError(f"end_token {end_token!r} is not a token of this tokenizer; try end_token='eos'")
        return tid
    raise ValueError(f"end_token must be None, 'eos', a token string or an id, got {end_token!r}")


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(f"{tokenizer.eos_token_id}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading and validation


def _iter_items(text: str) -> Iterator[tuple[int, str]]:
    """(line number, JSON text) of each record: JSONL lines, or the elements of a JSON array."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        dec = json.JSONDecoder()
        pos = len(text) - len(stripped) + 1
        n = len(text)
        while True:
            while pos < n and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= n:
                raise _Problem("JSON array is not closed with ']'") from None
            if text[pos] == "]":
                return
            start = pos
            line = text.count("\n", 0, start) + 1
            try:
                _, pos = dec.raw_decode(text, start)
            except json.JSONDecodeError as e:
                raise _LineProblem(text.count("\n", 0, e.pos) + 1, f"invalid JSON: {e.msg}") from None
            yield line, text[start:pos]
    else:
        for i, line in enumerate(text.split("\n")):
            if line.strip():
                yield i + 1, line


class _LineProblem(Exception):
    def __init__(self, line: int, problem: str):
        super().__init__(problem)
        self.line, self.problem = line, problem


def _parse_record(text: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Problem(f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict):
        raise _Problem(f"expected an object with 'messages', got {type(record).__name__}")
    if "messages" not in record:
        raise _Problem("missing 'messages'")
    return record


def _read_bytes(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}:0: cannot read: {e.strerror}") from None


def _decode(path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None


def load_conversations(path) -> list[dict]:
    """Parse and validate a JSONL (or JSON array) file of ``{"messages": [...]}`` records.

    Returns the records as written. Raises ``DataError("<file>:<line>: <problem>")``.
    """
    text = _decode(path, _read_bytes(path))
    records = []
    try:
        for line, item in _iter_items(text):
            try:
                record = _parse_record(item)
                _normalize(record["messages"], glm4=True)
            except _Problem as e:
                raise DataError(f"{path}:{line}: {e}") from None
            records.append(record)
    except _LineProblem as e:
        raise DataError(f"{path}:{e.line}: {e.problem}") from None
    except _Problem as e:
        raise DataError(f"{path}:{text.count(chr(10)) + 1}: {e}") from None
    if not records:
        raise DataError(f"{path}:1: no conversations in the file")
    return records


def _clean_tools(tools, where: str) -> list:
    """GLM-4's ``process_message``: drop tool parameters whose value is null (on a copy)."""
    if not isinstance(tools, list):
        raise _Problem(f"{where}: 'tools' must be a list, got {type(tools).__name__}")
    tools = copy.deepcopy(tools)
    for tool in tools:
        if not isinstance(tool, dict):
            raise _Problem(f"{where}: each tool must be an object, got {type(tool).__name__}")
        fn = tool.get("function")
        params = fn.get("parameters") if isinstance(fn, dict) else None
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict):
            params["properties"] = {k: v for k, v in props.items() if v is not None}
    return tools


def _tool_call_messages(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise _Problem(f"{where}: 'tool_calls' must be a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise _Problem(f"{where}: tool call {j + 1} has no function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                problem = f"tool call {j + 1} ({name}) has unparseable arguments: {e.msg}"
                raise _Problem(f"{where}: {problem}") from None
        if not isinstance(args, dict):
            raise _Problem(f"{where}: tool call {j + 1} ({name}) arguments must be a JSON object")
        out.append({"role": "assistant", "metadata": name, "content": json.dumps(args, ensure_ascii=False)})
    return out


def _normalize(messages, *, glm4: bool) -> tuple[list[dict], list[bool]]:
    """Validated copies of the messages and, per message, whether it may carry loss.

    ``glm4=True`` converts to GLM-4's form (``tool`` -> observation, ``tool_calls`` -> one assistant
    message per call with the name in ``metadata``; ``tools`` kept on system messages only, null
    parameters dropped). ``glm4=False`` keeps the caller's form for the tokenizer's own template.
    """
    if not isinstance(messages, list):
        raise _Problem(f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise _Problem("'messages' is empty")
    out: list[dict] = []
    may_train: list[bool] = []
    for i, m in enumerate(messages):
        where = f"message {i + 1}"
        if not isinstance(m, dict):
            raise _Problem(f"{where}: expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES and role != "tool":
            raise _Problem(
                f"{where}: unknown role {role!r} (expected system, user, assistant, observation or tool)"
            )
        loss = m.get("loss", True)
        if not isinstance(loss, bool):
            raise _Problem(f"{where}: 'loss' must be true or false, got {loss!r}")
        calls = m.get("tool_calls")
        if calls is not None and role != "assistant":
            raise _Problem(f"{where}: 'tool_calls' on a {role} message")
        content = m.get("content")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            got = "null" if content is None else type(content).__name__
            raise _Problem(f"{where}: content must be a string, got {got}")
        metadata = m.get("metadata")  # null (datasets fills missing keys so) is absent, not "None"
        if metadata is not None and not isinstance(metadata, str):
            raise _Problem(f"{where}: metadata must be a string, got {type(metadata).__name__}")
        tools = m.get("tools")
        if tools is not None and role == "system":
            tools = _clean_tools(tools, where)
        else:
            tools = None  # GLM-4 deletes tools on other roles; dataset libraries inject tools: null
        call_msgs = _tool_call_messages(calls, where) if calls else []

        if not glm4:
            msg = {k: v for k, v in m.items() if k not in ("loss", "tools")}
            msg["content"] = content
            if tools is not None:
                msg["tools"] = tools
            out.append(msg)
            may_train.append(loss)
            continue

        role = "observation" if role == "tool" else role
        msg = {"role": role, "content": content}
        if metadata is not None:
            msg["metadata"] = metadata
        if tools is not None:
            msg["tools"] = tools
        if not call_msgs or content:
            out.append(msg)
            may_train.append(loss)
        for cm in call_msgs:
            out.append(cm)
            may_train.append(loss)
    return out, may_train


def _trainable(messages: list[dict], may_train: list[bool], loss_on: str) -> list[bool]:
    flags = [m["role"] == "assistant" and ok for m, ok in zip(messages, may_train, strict=True)]
    if loss_on == "last":
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        flags = [f and i == last for i, f in enumerate(flags)]
    return flags


# ---------------------------------------------------------------------------------------------
# Encoding


# GPT-2's pre-tokenizer pattern, used by byte-level BPE tokenizers' ByteLevel(use_regex=True).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PROBE_TEXTS = [
    "Hello, world! It's 2024; we'll see.\n\nNext   line\twith\ttabs  ",
    "北京今天晴，气温21摄氏度。你好！「引号」…",
    '{"city": "Paris", "t": -3.5e2, "list": [1, 2]}\r\n  indented\n',
    "émigré naïve Ünïcödé ½ ² Ⅷ ٣ 🙂👍 a\u00a0b\u2028c",
    "",
    "   ",
]


class _PieceCache(dict):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def __missing__(self, piece: str) -> tuple:
        if len(self) >= _PIECE_CACHE_LIMIT:  # bounded memory on text with endless distinct pieces
            self.clear()
        ids = self[piece] = tuple(self.backend.encode(piece, add_special_tokens=False).ids)
        return ids


class _PieceEncoder:
    """Byte-level BPE by pre-token: split with GPT-2's pattern, look each piece up in a cache.

    Exactly the tokenizer's own output when it has no normalizer, a plain ``ByteLevel`` pre-tokenizer
    and a BPE model without dropout, and the text holds no added token (then the backend is used):
    BPE acts on each pre-token alone. Real text repeats its pre-tokens, so most lookups hit; this is
    several times faster than the backend's per-call path on small machines.
    """

    def __init__(self, backend, added: list[str]):
        import regex

        self.backend = backend
        self.split = regex.compile(_GPT2_PATTERN).findall
        self.cache = _PieceCache(backend)
        self.added = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))).search

    @classmethod
    def for_backend(cls, backend) -> _PieceEncoder | None:
        try:
            import regex  # noqa: F401
        except ImportError:
            return None
        spec = json.loads(backend.to_str())
        pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        eligible = (
            spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)
            and model.get("type") == "BPE"
            and model.get("dropout") is None
            and not model.get("byte_fallback", False)
        )
        added = [t["content"] for t in spec.get("added_tokens", [])]
        if not eligible or not added:
            return None
        enc = cls(backend, added)
        if any(enc.encode(t) != backend.encode(t, add_special_tokens=False).ids for t in _PROBE_TEXTS):
            return None
        return enc

    def encode(self, text: str) -> list[int]:
        return self.encode_many([text])[0]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        cache = self.cache
        splits = [None if self.added(t) else self.split(t) for t in texts]
        missing = set().union(*(sp for sp in splits if sp is not None)) - cache.keys()
        if missing:  # one batch call for every new piece: the per-call overhead dominates otherwise
            if len(cache) + len(missing) > _PIECE_CACHE_LIMIT:
                cache.clear()
            new = list(missing)
            encoded = self.backend.encode_batch(new, add_special_tokens=False)
            cache.update(zip(new, (tuple(e.ids) for e in encoded), strict=True))
        chain, get = itertools.chain.from_iterable, cache.__getitem__
        return [
            self.backend.encode(t, add_special_tokens=False).ids if sp is None else list(chain(map(get, sp)))
            for t, sp in zip(texts, splits, strict=True)
        ]


class _Encoder:
    """Per-tokenizer state shared by every conversation (and by each worker process)."""

    def __init__(self, tokenizer, template: str, loss_on: str, end_token):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        self.tokenizer, self.template, self.loss_on = tokenizer, template, loss_on
        self.backend = tokenizer.backend_tokenizer
        self.end_id = _resolve_end_token(tokenizer, end_token, template)
        if template == "glm4":
            self.prefix = "[gMASK]<sop>"
            self.prefix_ids = [_token_id(tokenizer, "[gMASK]"), _token_id(tokenizer, "<sop>")]
            if None in self.prefix_ids:
                raise ValueError("template='glm4' needs a tokenizer with [gMASK] and <sop> tokens")
            self.fast = self._fast_rendering_matches()
            self.role_ids = {r: _token_id(tokenizer, f"<|{r}|>") for r in ROLES}
            self._tools_cache: dict[str, tuple] = {}
            self.pieces = _PieceEncoder.for_backend(self.backend)
            if self.fast and self.pieces is not None:
                self.fast = self._direct_ids_match()

    def _render_one(self, message: dict) -> str:
        text = self.tokenizer.apply_chat_template([message], tokenize=False)
        if not text.startswith(self.prefix):
            raise ValueError(f"the chat template does not start with {self.prefix}: {text[:40]!r}")
        return text[len(self.prefix) :]

    @staticmethod
    def _fast_text(m: dict) -> str:
        # GLM-4's template for one message without tools.
        if not m["content"]:
            return ""
        return f"<|{m['role']}|>{m.get('metadata', '')}\n{m['content']}"

    def _fast_rendering_matches(self) -> bool:
        """Whether the template renders plain messages as ``_fast_text`` does (checked, not assumed)."""
        probes = [
            {"role": "system", "content": "s 系统"},
            {"role": "user", "content": "hello\n你好"},
            {"role": "assistant", "content": "hi"},
            {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
            {"role": "observation", "content": '{"t": 1}'},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": ""},
        ]
        try:
            return all(self._render_one(p) == self._fast_text(p) for p in probes)
        except Exception:
            return False

    def _direct_ids_match(self) -> bool:
        """Whether ``<|role|>`` + pieces equals tokenizing the rendered message (checked, not assumed)."""
        probes = [{"role": r, "content": c} for r in ROLES for c in _PROBE_TEXTS]
        probes.append({"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'})
        for m in probes:
            want = self.backend.encode(self._render_one(m), add_special_tokens=False).ids
            if self._direct_ids(m) != want:
                return False
        return True

    def _direct_ids(self, m: dict) -> list[int]:
        if not m["content"]:
            return []
        role_id = self.role_ids[m["role"]]
        return [role_id] + self.pieces.encode(f"{m.get('metadata', '')}\n{m['content']}")

    def _tools_message_ids(self, m: dict) -> tuple:
        # Tool lists repeat across a dataset: render and tokenize each distinct one once.
        key = json.dumps(m, ensure_ascii=False)
        ids = self._tools_cache.get(key)
        if ids is None:
            if len(self._tools_cache) > 10_000:
                self._tools_cache.clear()
            text = self._render_one(m)
            ids = self._tools_cache[key] = tuple(self.backend.encode(text, add_special_tokens=False).ids)
        return ids

    def message_texts(self, messages: list[dict]) -> list[str]:
        if self.fast:
            return [self._render_one(m) if "tools" in m else self._fast_text(m) for m in messages]
        return [self._render_one(m) for m in messages]

    def encode_glm4_batch(self, convs: list[tuple[list[dict], list[bool]]]) -> list[tuple[list, list]]:
        """GLM-4's per-message ``process_batch`` for many conversations: (ids, label mask) each."""
        if self.pieces is not None and self.fast:
            toks, texts, slots = [], [], []
            for messages, _ in convs:
                for m in messages:
                    if "tools" in m:
                        toks.append(list(self._tools_message_ids(m)))
                    elif not m["content"]:
                        toks.append([])  # GLM-4's template renders nothing for empty content
                    else:
                        slots.append(len(toks))
                        toks.append([self.role_ids[m["role"]]])
                        texts.append(f"{m.get('metadata', '')}\n{m['content']}")
            for slot, ids in zip(slots, self.pieces.encode_many(texts), strict=True):
                toks[slot] += ids
            counts = [len(messages) for messages, _ in convs]
        else:
            texts, counts = [], []
            for messages, _ in convs:
                t = self.message_texts(messages)
                texts += t
                counts.append(len(t))
            toks = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        out, k = [], 0
        for (_, flags), n in zip(convs, counts, strict=True):
            ids = list(self.prefix_ids)
            mask = [False, False]
            for m_toks, flag in zip(toks[k : k + n], flags, strict=True):
                ids += m_toks
                mask += [flag] * len(m_toks)
            k += n
            ids.append(self.end_id)
            mask.append(False)
            # The shift: a token is a target where the token before it belongs to a trained message.
            mask = [False] + mask[:-1]
            out.append((ids, mask))
        return out

    def encode_chat_template(self, messages: list[dict], flags: list[bool]) -> tuple[list, list]:
        tok = self.tokenizer

        def render(msgs, gen=False):
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        try:
            prev = render([])
        except Exception:
            prev = ""
        spans = []  # (start, end, has_end_marker)
        for i, m in enumerate(messages):
            cur = render(messages[: i + 1])
            if not cur.startswith(prev):
                raise ValueError(
                    f"the chat template's rendering of the first {i + 1} messages does not extend its "
                    f"rendering of the first {i}, so assistant spans cannot be found; use template='glm4' "
                    "or a template whose renderings of a conversation's prefixes are prefixes of each other"
                )
            if flags[i]:
                start = None
                if i > 0:
                    gen = render(messages[:i], gen=True)
                    if gen.startswith(prev) and cur.startswith(gen):
                        start = len(gen)
                content = m.get("content") or ""
                if start is None:
                    found = cur.find(content.strip(), len(prev)) if content.strip() else -1
                    start = found if found >= 0 else len(prev)
                # The turn ends at its end-of-turn marker (trailing newlines are the next turn's
                # business); with no marker after the text (GLM-4), at the end of the rendered text.
                body = content.strip()
                if content and cur.endswith(content) or body and cur.rstrip().endswith(body):
                    has_marker, end = False, len(cur)
                else:
                    has_marker, end = True, len(cur.rstrip())
                if end > start:  # else it rendered nothing (GLM-4 drops empty messages): nothing to learn
                    spans.append((start, end, has_marker))
            prev = cur
        full = prev
        enc = self.backend.encode(full, add_special_tokens=False)
        ids, offsets = list(enc.ids), enc.offsets
        mask = [False] * len(ids)
        for start, end, has_marker in spans:
            following = None
            for j, (s, e) in enumerate(offsets):
                if s < end and e > start:
                    mask[j] = True
                elif s >= end and e > s:
                    following = j
                    break
            if not has_marker:  # no end-of-turn marker: the next token ends the turn, learn it
                if following is not None:
                    mask[following] = True
                else:  # the conversation ends with this turn: append the end token as its target
                    ids.append(self.end_id)
                    mask.append(True)
        return ids, mask

    def encode(self, convs: list[tuple[list[dict], list[bool]]]) -> list[tuple[list, list]]:
        if self.template == "glm4":
            return self.encode_glm4_batch(convs)
        return [self.encode_chat_template(m, f) for m, f in convs]

    def prepare(self, messages) -> tuple[list[dict], list[bool]]:
        msgs, may_train = _normalize(messages, glm4=self.template == "glm4")
        return msgs, _trainable(msgs, may_train, self.loss_on)


def encode_conversation(messages, tokenizer, *, template="glm4", loss_on="all", end_token=None) -> Encoded:
    """One conversation (a list of message dicts) to ``Encoded(input_ids, labels)``.

    ``template``: "glm4" (GLM-4's per-message rule) or "chat_template" (spans of the tokenizer's
    template). ``loss_on``: "all" assistant turns or the "last" one; a message with ``"loss": false``
    is never trained. ``end_token``: appended after the conversation (glm4) or after a final
    assistant turn of a template without end-of-turn marker: None (glm4: ``<|user|>``,
    chat_template: eos), "eos", a token string or an id. No truncation here.
    """
    encoder = _encoder_for(tokenizer, template, loss_on, end_token)
    try:
        prepared = encoder.prepare(messages)
    except _Problem as e:
        raise DataError(f"<messages>:0: {e}") from None
    ids, mask = encoder.encode([prepared])[0]
    return Encoded(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)])


_ENCODERS: dict = {}


def _encoder_for(tokenizer, template, loss_on, end_token) -> _Encoder:
    key = (id(tokenizer), template, loss_on, end_token)
    hit = _ENCODERS.get(key)
    if hit is None or hit.tokenizer is not tokenizer:
        hit = _ENCODERS[key] = _Encoder(tokenizer, template, loss_on, end_token)
    return hit


# ---------------------------------------------------------------------------------------------
# Files: parallel encoding and the on-disk cache

_WORKER: dict = {}


def _init_worker(tokenizer, template, loss_on, end_token, max_length, overlong):
    _WORKER["encoder"] = _Encoder(tokenizer, template, loss_on, end_token)
    _WORKER["max_length"], _WORKER["overlong"] = max_length, overlong


def _encode_chunk(items: list[tuple[int, str]]):
    """Worker task: parse, validate and encode a chunk; returns arrays of the kept conversations."""
    encoder: _Encoder = _WORKER["encoder"]
    max_length, overlong = _WORKER["max_length"], _WORKER["overlong"]
    prepared = []
    for line, text in items:
        try:
            prepared.append(encoder.prepare(_parse_record(text)["messages"]))
        except _Problem as e:
            return ("error", line, str(e))
    try:
        encoded = encoder.encode(prepared)
    except Exception:
        for (line, _), p in zip(items, prepared, strict=True):  # find the conversation that failed
            try:
                encoder.encode([p])
            except Exception as e:
                return ("error", line, f"cannot render with the chat template: {type(e).__name__}: {e}")
        raise
    counts = {"dropped_overlong": 0, "truncated": 0, "skipped_no_label": 0}
    ids_parts, mask_parts, lengths = [], [], []
    for ids, mask in encoded:
        if len(ids) > max_length:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            counts["truncated"] += 1
        if not any(mask):
            counts["skipped_no_label"] += 1
            continue
        ids_parts.append(ids)
        mask_parts.append(mask)
        lengths.append(len(ids))
    total = sum(lengths)
    flat_ids = np.fromiter(itertools.chain.from_iterable(ids_parts), dtype=np.int32, count=total)
    flat_mask = np.fromiter(itertools.chain.from_iterable(mask_parts), dtype=np.bool_, count=total)
    return ("ok", flat_ids, flat_mask, np.asarray(lengths, dtype=np.int64), counts, len(items))


def _default_cache_dir() -> Path:
    env = os.environ.get("TRITRAIN_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tritrain"
    return base / "data"


def _load_cached(entry: Path) -> tuple[EncodedDataset, DataSummary] | None:
    try:
        summary = DataSummary(**json.loads((entry / "summary.json").read_text()))
        ids = np.load(entry / "ids.npy", mmap_mode="r")
        mask = np.load(entry / "label_mask.npy", mmap_mode="r")
        offsets = np.load(entry / "offsets.npy")
    except (OSError, ValueError, TypeError):
        return None  # missing or damaged: encode again
    if len(ids) != len(mask) or offsets[-1] != len(ids):
        return None
    return EncodedDataset(ids, mask, offsets), summary


def _store_cached(entry: Path, ds: EncodedDataset, summary: DataSummary) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    try:
        np.save(tmp / "ids.npy", ds.ids)
        np.save(tmp / "label_mask.npy", ds.label_mask)
        np.save(tmp / "offsets.npy", ds.offsets)
        (tmp / "summary.json").write_text(json.dumps(asdict(summary)))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process stored the same entry first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def encode_file(
    path,
    tokenizer,
    *,
    template="glm4",
    loss_on="all",
    end_token=None,
    max_length=2048,
    overlong="drop",
    num_workers=None,
    cache_dir=None,
    progress=True,
) -> tuple[EncodedDataset, DataSummary]:
    """Validate and encode every conversation of a file; returns (encoded, summary).

    ``encoded`` is a sequence of ``Encoded`` (see ``EncodedDataset``), in file order, holding the
    kept conversations only. Conversations longer than ``max_length`` are dropped
    (``overlong="drop"``) or cut on the right (``"truncate"``, as GLM-4 does); those left with no
    trainable token are skipped; all are counted in the summary. ``num_workers``: processes
    (None: one per CPU, at most 8). ``cache_dir``: where results are cached, keyed by the file's
    content, the tokenizer and these settings (None: ``$TRITRAIN_CACHE`` or ``~/.cache/tritrain``;
    False: no cache). Raises ``DataError("<file>:<line>: <problem>")`` on bad input.
    """
    t0 = time.perf_counter()
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    encoder = _encoder_for(tokenizer, template, loss_on, end_token)  # validates the settings
    raw = _read_bytes(path)

    entry = None
    if cache_dir is not False:
        digest = hashlib.blake2b(raw, digest_size=20).hexdigest()
        settings = [_CACHE_FORMAT, template, loss_on, encoder.end_id, max_length, overlong]
        key = hashlib.sha256(json.dumps([digest, _tokenizer_fingerprint(tokenizer), settings]).encode())
        entry = Path(cache_dir or _default_cache_dir()) / key.hexdigest()[:32]
        cached = _load_cached(entry)
        if cached is not None:
            ds, summary = cached
            summary.path, summary.from_cache, summary.seconds = str(path), True, time.perf_counter() - t0
            return ds, summary

    text = _decode(path, raw)
    del raw
    try:
        items = list(_iter_items(text))
    except _LineProblem as e:
        raise DataError(f"{path}:{e.line}: {e.problem}") from None
    except _Problem as e:
        raise DataError(f"{path}:{text.count(chr(10)) + 1}: {e}") from None
    del text
    if not items:
        raise DataError(f"{path}:1: no conversations in the file")
    chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 8)
    num_workers = max(1, min(num_workers, len(chunks)))
    init_args = (tokenizer, template, loss_on, end_token, max_length, overlong)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"encoding {Path(path).name}", unit="conv", leave=False)
    results = []

    def collect(result):
        if result[0] == "error":
            _, line, problem = result
            raise DataError(f"{path}:{line}: {problem}")
        results.append(result)
        if bar is not None:
            bar.update(result[5])

    try:
        if num_workers == 1:
            _init_worker(*init_args)
            for chunk in chunks:
                collect(_encode_chunk(chunk))
        else:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(num_workers, _init_worker, init_args) as pool:
                for result in pool.imap(_encode_chunk, chunks):
                    collect(result)
    finally:
        _WORKER.clear()
        if bar is not None:
            bar.close()

    summary = DataSummary(path=str(path), conversations=len(items), max_length=max_length, overlong=overlong)
    for r in results:
        for k, v in r[4].items():
            setattr(summary, k, getattr(summary, k) + v)
    ids = np.concatenate([r[1] for r in results]) if results else np.zeros(0, np.int32)
    mask = np.concatenate([r[2] for r in results]) if results else np.zeros(0, np.bool_)
    lengths = np.concatenate([r[3] for r in results]) if results else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    summary.kept, summary.tokens, summary.label_tokens = len(lengths), len(ids), int(mask.sum())
    ds = EncodedDataset(ids, mask, offsets)
    if entry is not None:
        _store_cached(entry, ds, summary)
    summary.seconds = time.perf_counter() - t0
    return ds, summary
