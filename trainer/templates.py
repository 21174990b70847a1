"""Templates: how a validated conversation becomes ``input_ids`` and a label mask.

One small protocol (``Template``: ``prepare`` a record, ``encode`` many conversations), two rules,
one registry (``TEMPLATES``, ``make_template``):

- ``glm4``: GLM-4's ``process_batch``. ``[gMASK]<sop>``, then every message rendered alone with
  the tokenizer's chat template minus its leading ``[gMASK]<sop>``, then the chat end token
  (``<|user|>``; ``end_token="eos"`` for GLM-4's older code); the assistant mask shifted right by
  one. So ``<|assistant|>`` is never a target, the assistant's metadata, newline and content are,
  and so is the role token after an assistant turn: that is how GLM-4 learns to stop.
- ``chat_template``: any Hugging Face chat template. The whole conversation is rendered once, as
  inference sees it (``tools=``, the record's ``chat_template_kwargs``), tokenized once with offsets,
  and each trained assistant message is labelled as it stands in that rendering: from the end of
  its role header through its reasoning (where the template keeps it), text and tool calls to the
  stop after them. A turn with no header (Falcon3 writes none before a tool call alone, Gemma 4
  continues its turn after tool results) starts where the model starts writing, when only
  whitespace, or the added token that closes the previous message, separates it from that
  message. The stops are derived, not listed: the added token the template writes first after an
  answer, and the one that ends a tool call before its result (``<|im_end|>``, ``<|eot_id|>``,
  ``</s>``, ``<|return|>`` / ``<|end|>``, ``<|call|>``, Gemma 4's ``<turn|>`` and
  ``<|tool_response>``), found by rendering probe conversations, plus eos and the
  ``generation_config.json`` eos ids. Templates with ``{% generation %}`` blocks are labelled by
  those blocks instead. A template with no stop after the turn (GLM) gets the token that follows
  the turn labelled, or ``end_token`` appended. A trained message the template drops or cannot
  render is reported (``Unexpressible``), never trained as something else.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple, Protocol

from trainer.conversations import Conversation, Problem, normalize, trainable
from trainer.fasttok import PROBE_TEXTS, PieceEncoder

GLM4_ROLES = ("system", "user", "assistant", "observation")
LOSS_ON = ("all", "last")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Probe conversations: what a template writes around a turn is read from their renderings.
_PROBE_USER = "Tell me 0x51f3."
_PROBE_ANSWER = "It is 20979."
_PROBE_NEXT = "And 0x2a?"
_PROBE_RESULT = "Result 7316."
_PROBE_NAME = "probe_lookup"
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": _PROBE_NAME,
        "description": "Look a key up",
        "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
    },
}
_PROBE_CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {"key": "k7"}}}
    ],
}
_PROBE_ASK = {"role": "user", "content": _PROBE_USER}
_PROBE_OUTPUT = {"role": "tool", "tool_call_id": "call00001", "name": _PROBE_NAME, "content": _PROBE_RESULT}


class Unexpressible(Exception):
    """The template cannot render a trained message as given (it drops it or raises)."""


Encoding = tuple[list[int], list[bool]]


class Template(Protocol):
    name: str
    end_id: int
    path: str  # which encoding path runs, in words

    def prepare(self, record: dict) -> tuple[Conversation, list[bool]]:
        """The validated conversation and, per message, whether it is trained. Raises ``Problem``."""

    def encode(self, convs: list[tuple[Conversation, list[bool]]]) -> list[Encoding | Unexpressible]:
        """(input_ids, label mask) per conversation, or why it cannot be encoded."""


def token_id(tokenizer, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id and token != tokenizer.unk_token:
        return None
    return int(tid)


def resolve_end_token(tokenizer, end_token, template: str) -> int:
    if end_token is None:
        end_token = "<|user|>" if template == "glm4" else "eos"
    if isinstance(end_token, int) and not isinstance(end_token, bool):
        return end_token
    if end_token == "eos":
        if tokenizer.eos_token_id is None:
            raise ValueError("end_token='eos' but the tokenizer has no eos_token")
        return int(tokenizer.eos_token_id)
    if isinstance(end_token, str):
        tid = token_id(tokenizer, end_token)
        if tid is None:
            raise ValueError(f"end_token {end_token!r} is not a token of this tokenizer; try end_token='eos'")
        return tid
    raise ValueError(f"end_token must be None, 'eos', a token string or an id, got {end_token!r}")


def _check_common(tokenizer, loss_on: str) -> None:
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")


# ---------------------------------------------------------------------------------------------
# GLM-4's per-message rule


class Glm4Template:
    """GLM-4's ``process_batch``; a direct path (role token + cached pieces) when the tokenizer's
    template and vocabulary are checked to give the same ids, else each message rendered alone."""

    name = "glm4"

    def __init__(self, tokenizer, loss_on: str, end_token):
        _check_common(tokenizer, loss_on)
        self.tokenizer, self.loss_on = tokenizer, loss_on
        # GLM-4's own glm-4-9b-chat tokenizer (trust_remote_code) is a slow one: no backend, and each
        # message is then tokenized by the tokenizer itself, exactly as GLM-4's code does.
        self.backend = (
            getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        )
        self.end_id = resolve_end_token(tokenizer, end_token, "glm4")
        self.prefix = "[gMASK]<sop>"
        self.prefix_ids = [token_id(tokenizer, "[gMASK]"), token_id(tokenizer, "<sop>")]
        if None in self.prefix_ids:
            raise ValueError("template='glm4' needs a tokenizer with [gMASK] and <sop> tokens")
        self.fast = self.backend is not None and self._fast_rendering_matches()
        self.role_ids = {r: token_id(tokenizer, f"<|{r}|>") for r in GLM4_ROLES}
        self._tools_cache: dict[str, tuple] = {}
        self.pieces = PieceEncoder.for_backend(self.backend) if self.backend is not None else None
        if self.fast and self.pieces is not None:
            self.fast = self._direct_ids_match()

    @property
    def path(self) -> str:
        """Which encoding path runs (the summary names it)."""
        if self.backend is None:
            return "glm4: each message tokenized by the (slow) tokenizer"
        if self.fast and self.pieces is not None:
            return "glm4: role tokens + cached byte-level BPE pieces"
        return "glm4: each message rendered, one batch tokenization"

    def prepare(self, record):
        conv = normalize(record, glm4=True)
        return conv, trainable(conv.messages, conv.may_train, self.loss_on)

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
        probes = [{"role": r, "content": c} for r in GLM4_ROLES for c in PROBE_TEXTS]
        probes.append({"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'})
        for m in probes:
            want = self.backend.encode(self._render_one(m), add_special_tokens=False).ids
            if self._direct_ids(m) != want:
                return False
        return True

    def _direct_ids(self, m: dict) -> list[int]:
        if not m["content"]:
            return []
        return [self.role_ids[m["role"]]] + self.pieces.encode(f"{m.get('metadata', '')}\n{m['content']}")

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

    def _message_texts(self, messages: list[dict]) -> list[str]:
        if self.fast:
            return [self._render_one(m) if "tools" in m else self._fast_text(m) for m in messages]
        return [self._render_one(m) for m in messages]

    def _message_ids(self, convs) -> list[list[int]]:
        """Token ids of every message of every conversation, in order."""
        if self.pieces is not None and self.fast:
            toks, texts, slots = [], [], []
            for conv, _ in convs:
                for m in conv.messages:
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
            return toks
        if self.backend is None:
            return [self._slow_ids(m) for conv, _ in convs for m in conv.messages]
        texts = [t for conv, _ in convs for t in self._message_texts(conv.messages)]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _slow_ids(self, m: dict) -> list[int]:
        ids = list(self.tokenizer.apply_chat_template([m], tokenize=True, return_dict=False))
        if ids[:2] != self.prefix_ids:
            raise ValueError(f"the chat template does not start with {self.prefix}")
        return ids[2:]

    def encode(self, convs):
        toks, out, k = self._message_ids(convs), [], 0
        for _, flags in convs:
            ids, mask = list(self.prefix_ids), [False, False]
            for m_toks, flag in zip(toks[k : k + len(flags)], flags, strict=True):
                ids += m_toks
                mask += [flag] * len(m_toks)
            k += len(flags)
            ids.append(self.end_id)
            mask.append(False)
            # The shift: a token is a target where the token before it belongs to a trained message.
            out.append((ids, [False] + mask[:-1]))
        return out


# ---------------------------------------------------------------------------------------------
# Any chat template: render once, label each trained turn where it stands


def render(tokenizer, messages, tools=None, kwargs=None, *, generation_prompt=False, spans=False):
    """``apply_chat_template(..., tokenize=False)`` without its per-call overhead; with ``spans``,
    also the ``{% generation %}`` character spans."""
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, indices = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=spans,
        add_generation_prompt=generation_prompt,
        **{**tokenizer.special_tokens_map, **(kwargs or {})},
    )
    return (texts[0], indices[0]) if spans else texts[0]


def _with_reasoning_aliases(m: dict) -> dict:
    # As transformers does: templates read reasoning as reasoning_content or (gpt-oss) thinking.
    r = m.get("reasoning_content")
    return m if r is None else {"thinking": r, **m, "reasoning_content": r}


class FastRenderer:
    """``render`` for one template, several times cheaper: the same compiled template and
    environment as transformers, but the sandbox's attribute check (a function of the object's type
    and the attribute's name only) is remembered instead of recomputed at every access."""

    def __init__(self, tokenizer):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        base = _compile_jinja_template(tokenizer.chat_template).environment
        env = base.overlay()
        env.__class__ = type("RememberingSandbox", (type(base),), {"is_safe_attribute": _remembered_check})
        env._safe_attributes = {}
        self.template = env.from_string(tokenizer.chat_template)
        self.special = dict(tokenizer.special_tokens_map)

    def __call__(self, messages, tools=None, kwargs=None) -> str:
        return self.template.render(
            messages=[_with_reasoning_aliases(m) for m in messages],
            tools=tools,
            documents=None,
            add_generation_prompt=False,
            **{**self.special, **(kwargs or {})},
        )


def _remembered_check(self, obj, attr, value):
    key = (type(obj), attr)
    hit = self._safe_attributes.get(key)
    if hit is None:
        hit = self._safe_attributes[key] = super(type(self), self).is_safe_attribute(obj, attr, value)
    return hit


def _string_arguments(messages: list[dict]) -> list[dict]:
    """Messages with tool-call arguments as JSON strings, for templates that concatenate them."""
    out = []
    for m in messages:
        if "tool_calls" in m:
            calls = [
                {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def _split_think(content: str) -> tuple[str, str]:
    """(reasoning, answer) of content written as ``<think>...</think>answer``, as templates split it."""
    if "</think>" not in content:
        return "", content
    head, _, answer = content.partition("</think>")
    return head.split("<think>")[-1].strip(), answer


def tokens_re(tokens) -> re.Pattern:
    """Any of these tokens, longest first (a pattern that matches nothing for none)."""
    tokens = sorted(set(tokens) - {""}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")


def added_token_re(tokenizer) -> re.Pattern:
    """Any added (or special) token of the tokenizer, longest first."""
    added = {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    return tokens_re(added | set(getattr(tokenizer, "all_special_tokens", [])))


def _probe(tokenizer, messages, tools=None, kwargs=None) -> str | None:
    """A probe conversation rendered, or None where the template refuses it."""
    try:
        try:
            return render(tokenizer, messages, tools, kwargs)
        except TypeError:  # a template that concatenates arguments (DeepSeek-V3)
            return render(tokenizer, _string_arguments(messages), tools, kwargs)
    except Exception:
        return None


def _common_prefix(a: str, b: str, added: re.Pattern) -> int:
    """Length of the common prefix of a and b, never ending inside an added token."""
    n = len(os.path.commonprefix([a, b]))
    for m in added.finditer(b, max(0, n - 64), n + 64):
        if m.start() < n < m.end():
            return m.start()
    return n


def derive_stops(tokenizer, kwargs=None, added: re.Pattern | None = None) -> tuple[list[str], bool]:
    """The tokens that end an assistant turn, as the chat template writes them, and whether it writes
    one after the conversation's last turn (GLM's templates do not: the next role token ends a turn).
    Read from probe renderings: the first added token after an answer (last, then followed by a user
    and by an observation message), and the one that ends a tool call followed by its result."""
    added = added or added_token_re(tokenizer)
    user = _PROBE_ASK
    answer = {"role": "assistant", "content": _PROBE_ANSWER}
    found: list[re.Match] = []
    last = _probe(tokenizer, [user, answer], kwargs=kwargs)
    final = None
    if last is not None and _PROBE_ANSWER in last:
        final = added.search(last, last.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER))
        found.append(final)
    for role in ("user", "observation"):
        text = _probe(tokenizer, [user, answer, {"role": role, "content": _PROBE_NEXT}], kwargs=kwargs) or ""
        a = text.find(_PROBE_ANSWER) + len(_PROBE_ANSWER) if _PROBE_ANSWER in text else -1
        b = text.find(_PROBE_NEXT, a) if a >= 0 else -1
        if b >= 0:
            found.append(added.search(text, a, b))
    text_stops = {m.group() for m in found if m is not None}
    found.append(_call_stop(tokenizer, kwargs, added, text_stops, final is not None))
    stops = [m.group() for m in found if m is not None]
    return list(dict.fromkeys(stops)), final is not None


def _call_stop(tokenizer, kwargs, added: re.Pattern, text_stops: set, has_final: bool) -> re.Match | None:
    """The added token that ends a tool-call turn followed by the tool's result. The renderings of the
    call as the last message and followed by its result agree up to some point. When the call turn is
    already ended there by a stop of answers (``<|im_end|>``), that stop; when the last-message
    rendering goes on differently there (a template that ends a last call like an answer) or the
    template ends no turn itself (GLM), the first added token after that point (GLM's
    ``<|observation|>``); else the added token that closes the common part (gpt-oss's ``<|call|>``,
    Gemma 4's ``<|tool_response>``, written after a call whether a result follows or not)."""
    user = _PROBE_ASK
    last = _probe(tokenizer, [user, _PROBE_CALL], [_PROBE_TOOL], kwargs)
    follow = _probe(tokenizer, [user, _PROBE_CALL, _PROBE_OUTPUT], [_PROBE_TOOL], kwargs)
    if last is None or follow is None or _PROBE_USER not in follow:
        return None
    n = follow.find(_PROBE_NAME, follow.index(_PROBE_USER) + len(_PROBE_USER))
    r = follow.find(_PROBE_RESULT, n) if n >= 0 else -1
    c = _common_prefix(last, follow, added)
    if r < 0 or not n < c <= r:
        return None
    ended = [m for m in added.finditer(follow, n, c) if m.group() in text_stops]
    if ended:
        return ended[-1]
    if last[c:].strip() or not has_final:
        return added.search(follow, c, r)
    closing = [m for m in added.finditer(follow, n, c) if not follow[m.end() : c].strip()]
    return closing[-1] if closing else None


def turn_stops(tokenizer, kwargs=None) -> list[str]:
    """The tokens that end an assistant turn of this tokenizer's chat template (``derive_stops``)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    return derive_stops(tokenizer, kwargs)[0]


def generation_eos_ids(tokenizer) -> list[int] | None:
    """``eos_token_id`` of the ``generation_config.json`` beside the tokenizer (its directory, or its
    hub id's local cache), as a list; None when there is no such file."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    path = Path(name) / "generation_config.json" if name else None
    if path is not None and not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name, "generation_config.json")
        except Exception:  # not a hub id
            hit = None
        path = Path(hit) if isinstance(hit, str) else None
    if path is None:
        return None
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return None
    if eos is None:
        return None
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


class TurnFacts(NamedTuple):
    """What a template writes around an assistant turn, for one set of template kwargs."""

    prompt: str  # the generation prompt's assistant header
    forms: list[str]  # the header's forms to search for, longest first
    stops: list[str]  # derived stops (``derive_stops``)
    final: bool  # the template writes a stop after the last turn
    markers: re.Pattern  # stops, eos and the generation config's eos tokens
    opening: str | None  # what a tool-call turn starts with (``<tool_call>``, ``[TOOL_CALLS]``...)
    call_prefix: str  # what it writes from there to the call's name
    think: str  # what it writes before reasoning it keeps, after the header (``<|channel>thought\n``)
    tails: dict[str, str]  # per role, what the template writes after a message's text (Falcon3 user: ``\n``)


class ChatTemplate:
    """The full-render rule for any Hugging Face chat template (see the module docstring)."""

    name = "chat_template"

    def __init__(self, tokenizer, loss_on: str, end_token):
        _check_common(tokenizer, loss_on)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "template='chat_template' needs a fast tokenizer (character offsets); use template='glm4'"
            )
        self.tokenizer, self.loss_on = tokenizer, loss_on
        self.backend = tokenizer.backend_tokenizer
        self.end_id = resolve_end_token(tokenizer, end_token, "chat_template")
        self.has_generation = bool(_GENERATION.search(tokenizer.chat_template))
        self.added = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        self.added_re = tokens_re(self.added)
        ids = generation_eos_ids(tokenizer)
        self.generation_eos = None if ids is None else [tokenizer.convert_ids_to_tokens(i) for i in ids]
        self._headers: dict[str, tuple[str, list[str]]] = {}
        self._facts: dict[str, TurnFacts] = {}
        self.fast_render = FastRenderer(tokenizer)

    @property
    def path(self) -> str:
        how = "{% generation %} blocks" if self.has_generation else "turns located in the rendering"
        return f"chat_template: rendered once, tokenized once, {how}; {self.stops_line()}"

    def stops_line(self, kwargs: dict | None = None) -> str:
        """Which stops end a turn, in one line: derived from the template, eos, and how the
        ``generation_config.json`` eos ids compare."""
        facts = self.facts(kwargs or {})
        line = f"stops {', '.join(facts.stops) or 'none'} (from the template)"
        eos, end = self.tokenizer.eos_token, self.tokenizer.convert_ids_to_tokens(self.end_id)
        if not facts.final:
            line += f", {end} appended after a last turn"
        if eos and eos not in facts.stops and (facts.final or eos != end):
            line += f", {eos} (eos)"
        if self.generation_eos is not None:
            extra = [t for t in self.generation_eos if t not in facts.stops and t != eos]
            missing = [t for t in facts.stops if t not in self.generation_eos]
            line += (
                "; generation_config.json "
                + (f"adds {', '.join(extra)}" if extra else "agrees")
                + (f", lacks {', '.join(missing)}" if missing else "")
            )
        return line

    def facts(self, kwargs: dict) -> TurnFacts:
        """Header, stops and tool-call opening of this template for these kwargs (probed once)."""
        key = json.dumps(kwargs, sort_keys=True, default=str)
        hit = self._facts.get(key)
        if hit is None:
            prompt, forms = self.header(kwargs)
            stops, final = derive_stops(self.tokenizer, kwargs, self.added_re)
            markers = set(stops) | {self.tokenizer.eos_token} | set(self.generation_eos or ())
            marker_re = tokens_re(markers & self.added)
            opening, prefix, think = self._openings(kwargs, prompt, forms)
            tails = self._tails(kwargs)
            hit = TurnFacts(prompt, forms, stops, final, marker_re, opening, prefix, think, tails)
            self._facts[key] = hit
        return hit

    def prepare(self, record):
        conv = normalize(record, glm4=False)
        return conv, trainable(conv.messages, conv.may_train, self.loss_on)

    # -- rendering -------------------------------------------------------------------------------

    def _render(self, conv: Conversation, spans: bool = False):
        def once(messages):
            if spans:
                return render(self.tokenizer, messages, conv.tools, conv.kwargs, spans=True)
            return self.fast_render(messages, conv.tools, conv.kwargs)

        try:
            return once(conv.messages)
        except TypeError:
            if not any("tool_calls" in m for m in conv.messages):
                raise
            return once(_string_arguments(conv.messages))  # a template that concatenates them (DeepSeek-V3)

    def header(self, kwargs: dict) -> tuple[str, list[str]]:
        """The assistant header as the generation prompt writes it, and its shorter forms (history
        turns may lack its tail, e.g. Qwen3's empty think block): prefixes cut after an added token
        or a newline, longest first, down to the shortest that a user turn does not also contain."""
        key = json.dumps(kwargs, sort_keys=True, default=str)
        hit = self._headers.get(key)
        if hit is not None:
            return hit
        user = [_PROBE_ASK]
        plain = render(self.tokenizer, user, kwargs=kwargs)
        prompt = render(self.tokenizer, user, kwargs=kwargs, generation_prompt=True)
        hdr = prompt[_common_prefix(plain, prompt, self.added_re) :]
        cuts = {m.end() for m in self.added_re.finditer(hdr)} | {m.end() for m in re.finditer("\n", hdr)}
        forms = []
        for cut in sorted(cuts | {len(hdr)}, reverse=True):
            form = hdr[:cut]
            if form.strip() and form not in plain:
                forms.append(form)
        if not forms and hdr.strip():
            forms = [hdr]
        if not hdr.strip():
            forms = self._probe_gap(user, kwargs)
        self._headers[key] = hit = (hdr, forms)
        return hit

    def _probe_gap(self, user: list[dict], kwargs: dict) -> list[str]:
        """For a template with no generation prompt (Mistral's ``[/INST]``, Phi-4's first template,
        whose user turn writes the assistant header): what it writes between a user's text and the
        assistant's, when that ends with an added token."""
        probe = [*user, {"role": "assistant", "content": _PROBE_ANSWER}]
        try:
            text = render(self.tokenizer, probe, kwargs=kwargs)
        except Exception:
            return []
        start, end = text.find(_PROBE_USER), text.find(_PROBE_ANSWER)
        gap = text[start + len(_PROBE_USER) : end] if 0 <= start < end else ""
        tail = list(self.added_re.finditer(gap))
        return [gap] if gap.strip() and tail and tail[-1].end() == len(gap) else []

    def _openings(self, kwargs: dict, prompt: str, forms: list[str]) -> tuple[str | None, str, str]:
        """What the template writes before reasoning it keeps, after the assistant's role; what a tool
        call turn starts with: its first added token (``<tool_call>``, ``[TOOL_CALLS]``), else its first
        line, between the role (or the user's message, where it writes none) and the call's name, an
        empty reasoning block skipped; and all it writes there."""
        user = [_PROBE_ASK]
        alone = _probe(self.tokenizer, user, [_PROBE_TOOL], kwargs)
        think, segment, markup = "", "", set()  # markup: reasoning's own added tokens
        if forms:
            markup = {
                m.group() for m in self.added_re.finditer(prompt, prompt.find(forms[-1]) + len(forms[-1]))
            }
        for call in ({**_PROBE_CALL, "reasoning_content": _PROBE_ANSWER}, _PROBE_CALL):
            text = _probe(self.tokenizer, [*user, call], [_PROBE_TOOL], kwargs)
            u = text.find(_PROBE_USER) + len(_PROBE_USER) if alone and text and _PROBE_USER in text else -1
            n = text.find(_PROBE_NAME, u) if u >= 0 else -1
            if n < 0:
                continue
            start = max(u, _common_prefix(alone, text, self.added_re))
            found = self._header(text, start, n, forms)  # its shortest form: what the model writes follows
            segment = text[found[0] + len(forms[-1]) if found else start : n].lstrip()
            if call is not _PROBE_CALL and _PROBE_ANSWER in segment:
                r = segment.index(_PROBE_ANSWER)
                think, close = segment[:r], self.added_re.search(segment, r)
                markup |= {m.group() for m in self.added_re.finditer(think)} | (
                    {close.group()} if close else set()
                )
        m = self.added_re.match(segment)
        while m and m.group() in markup:  # an empty reasoning block: the call opens after it
            segment = segment[m.end() :].lstrip()
            m = self.added_re.match(segment)
        return (segment[: m.end()] if m else segment.split("\n", 1)[0]) or None, segment, think

    def _tails(self, kwargs: dict) -> dict[str, str]:
        """What the template writes after a user's and a tool's text, when the message is the last."""
        user = _PROBE_ASK
        tails = {}
        for role, probe, tools, probe_text in (
            ("user", [user], None, _PROBE_USER),
            ("tool", [user, _PROBE_CALL, _PROBE_OUTPUT], [_PROBE_TOOL], _PROBE_RESULT),
        ):
            text = _probe(self.tokenizer, probe, tools, kwargs)
            if text is not None and probe_text in text:
                tails[role] = text[text.rindex(probe_text) + len(probe_text) :]
        return tails

    # -- locating each message in the rendering ----------------------------------------------------

    @staticmethod
    def _anchors(m: dict) -> list[str]:
        """Texts of a message that any faithful rendering contains, in order."""
        content = m.get("content") or ""
        if m["role"] == "assistant":
            _, content = _split_think(content)
            return [a for a in [content.strip()] if a] + [
                c["function"]["name"] for c in m.get("tool_calls", [])
            ]
        return [content.strip()] if content.strip() else []

    def _locate(self, text: str, conv: Conversation, flags, facts: TurnFacts) -> list[tuple[int, int, int]]:
        """Per message: (end of its assistant header, start of its first anchor, end of its last);
        -1 where there is none. Anchors are searched in order, an assistant's after its header and
        its reasoning (when the template keeps it); a trained message whose anchors are missing is
        unexpressible."""
        pos, out, before = 0, [], None
        for i, m in enumerate(conv.messages):
            anchors = self._anchors(m) if m["role"] != "system" else []  # templates move system text
            start, first, p = -1, -1, pos
            if m["role"] == "assistant" and anchors:
                tail = facts.tails.get(before, "")
                end = pos + _common_prefix(text[pos : pos + len(tail)], tail, self.added_re)
                start = self._assistant_start(text, pos, end, m, anchors[0], facts)
                if start < 0 and flags[i]:
                    raise Unexpressible(f"message {i + 1}: the rendering has no assistant header for it")
                p = max(start, pos)
                reasoning = (m.get("reasoning_content") or "").strip()
                turn_end = facts.markers.search(text, p)
                j = text.find(reasoning, p, turn_end.start() if turn_end else len(text)) if reasoning else -1
                if j >= 0:  # kept by the template (before the turn's first marker): the answer comes after
                    first, p = j, j + len(reasoning)
            for a in anchors:
                j = text.find(a, p)
                if j < 0:
                    if flags[i]:
                        raise Unexpressible(f"message {i + 1}: the chat template does not render {a[:40]!r}")
                    first = -1
                    break
                first = j if first < 0 else first
                p = j + len(a)
            out.append((start, first, p if first >= 0 else -1))
            if first >= 0:
                pos, before = p, m["role"]
        return out

    def _assistant_start(self, text: str, pos: int, end: int, m: dict, anchor: str, facts: TurnFacts) -> int:
        """Where an assistant message's turn starts: after its header (found before its first
        anchor). Without one there: for a template with no generation prompt, after the added token
        that closes the previous turn (Mistral's ``[/TOOL_RESULTS]``). Else where the model starts
        writing (its reasoning, the opening of a tool call alone, or its text), when only whitespace
        separates that from the previous message's end (``end``: its text and the tail the template
        writes after it, or the added token that closes it): Falcon3's tool calls, Gemma 4 and
        DeepSeek after tool results. Else -1."""
        j = text.find(anchor, pos)
        found = self._header(text, pos, j if j >= 0 else len(text), facts.forms)
        if found is not None:
            return found[1]
        if j < 0:
            return -1
        if not facts.prompt.strip():
            mark = self.added_re.search(text, pos, j)
            return mark.end() if mark else pos
        t = j
        if facts.opening and not _split_think(m.get("content") or "")[1].strip():  # a tool call alone
            o = text.rfind(facts.opening, end, j)
            s = j - len(text[end:j].lstrip())  # or what it writes before a call's name
            t = o if o >= 0 else s if facts.call_prefix.endswith(text[s:j]) else j
        reasoning = (m.get("reasoning_content") or "").strip()
        r = text.rfind(reasoning, pos, t) if reasoning else -1
        if r >= 0:
            t = (
                r - len(facts.think)
                if facts.think and text.startswith(facts.think, r - len(facts.think))
                else r
            )
        closing = max((mark.end() for mark in self.added_re.finditer(text, end, t)), default=end)
        if text[closing:t].strip():
            return -1  # text between them that is no header we know (a role name?): refuse
        return t

    def _header(self, text: str, lo: int, hi: int, forms: list[str]) -> tuple[int, int] | None:
        """(start, end) of the assistant header in text[lo:hi]: the earliest place the shortest
        form occurs, extended by the longest form that matches there."""
        if not forms:
            return None
        j = text.find(forms[-1], lo, hi)
        if j < 0:
            return None
        return j, j + max(len(f) for f in forms if text.startswith(f, j))

    def _assistant_spans(self, text, conv, flags) -> list[tuple[int, int, bool]]:
        """(start, end, ends with a marker) of each trained assistant message, in characters."""
        facts = self.facts(conv.kwargs)
        located = self._locate(text, conv, flags, facts)
        # Per message, where the next located message starts and the previous one ends (one pass each).
        nxt, prev, n = [len(text)] * len(located), [0] * len(located), len(located)
        for i in range(n - 2, -1, -1):
            nxt[i] = located[i + 1][1] if located[i + 1][1] >= 0 else nxt[i + 1]
        for i in range(1, n):
            prev[i] = located[i - 1][2] if located[i - 1][1] >= 0 else prev[i - 1]
        spans = []
        for i, (start, first, last) in enumerate(located):
            if not flags[i]:
                continue
            hi = nxt[i]
            if first < 0:  # an empty (or blank) answer: only the turn itself to find
                lo = prev[i]
                header = self._header(text, lo, hi, facts.forms)
                if header is None:
                    continue  # the template renders nothing for it (GLM-4): nothing to learn
                start = last = header[1]
            marker = facts.markers.search(text, last, hi)
            if first < 0 and text[start : marker.start() if marker else hi].strip():
                continue  # the header found belongs to a later turn
            if marker is not None:
                spans.append((start, marker.end(), True))
            elif hi == len(text):
                spans.append((start, len(text), False))
            else:
                spans.append((start, last, False))
        return spans

    def _generation_spans(self, conv, flags, indices, text) -> list[tuple[int, int, bool]]:
        """``{% generation %}`` blocks, each given to its assistant message: in order when there is
        one block per assistant message, else the message whose located text the block holds."""
        assistants = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
        if len(indices) == len(assistants):
            owners = assistants
        else:
            located = self._locate(text, conv, flags, self.facts(conv.kwargs))
            owners = [
                next((i for i in assistants if located[i][1] >= start and located[i][2] <= end), None)
                for start, end in indices
            ]
        return [(s, e, True) for (s, e), i in zip(indices, owners, strict=True) if i is not None and flags[i]]

    # -- encoding --------------------------------------------------------------------------------

    def _char_spans(self, conv, flags):
        if self.has_generation:
            text, indices = self._render(conv, spans=True)
            return text, self._generation_spans(conv, flags, indices, text)
        text = self._render(conv)
        return text, self._assistant_spans(text, conv, flags)

    def encode(self, convs):
        rendered = []
        for conv, flags in convs:
            try:
                rendered.append(self._char_spans(conv, flags) if any(flags) else (self._render(conv), []))
            except Unexpressible as e:
                rendered.append(e)
            except Exception as e:  # the template raised (e.g. "roles must alternate")
                rendered.append(Unexpressible(f"the chat template cannot render it: {type(e).__name__}: {e}"))
        texts = [r[0] for r in rendered if not isinstance(r, Unexpressible)]
        encs = iter(self.backend.encode_batch(texts, add_special_tokens=False))
        return [r if isinstance(r, Unexpressible) else self._label(next(encs), r[1]) for r in rendered]

    def _label(self, enc, spans) -> Encoding:
        """Tokens overlapping each character span are targets (found from the span's ends, not by
        scanning every token's offsets)."""
        ids = enc.ids
        mask = [False] * len(ids)
        for start, end, has_marker in spans:
            first = _token_at(enc, start, end, +1)
            last = _token_at(enc, end - 1, start - 1, -1)
            if first is not None and last is not None and last >= first:
                mask[first : last + 1] = [True] * (last + 1 - first)
            if not has_marker:  # no end-of-turn marker: the next token ends the turn, learn it
                nxt = (last + 1) if last is not None else len(ids)
                if nxt < len(ids):
                    mask[nxt] = True
                else:  # the conversation ends with this turn: append the end token as its target
                    ids.append(self.end_id)
                    mask.append(True)
        return ids, mask


def _token_at(enc, char: int, stop: int, step: int) -> int | None:
    """The token holding ``char``, or the nearest one towards ``stop`` (characters no token covers)."""
    while char != stop:
        t = enc.char_to_token(char)
        if t is not None:
            return t
        char += step
    return None


TEMPLATES = {"glm4": Glm4Template, "chat_template": ChatTemplate}


def make_template(name: str, tokenizer, loss_on: str = "all", end_token=None) -> Template:
    """The template ``name`` names; ``"auto"``: the one :func:`resolve_template` picks for ``tokenizer``."""
    name = resolve_template(name, tokenizer)
    if name not in TEMPLATES:
        raise ValueError(f"template must be one of auto, {', '.join(TEMPLATES)}, got {name!r}")
    return TEMPLATES[name](tokenizer, loss_on, end_token)


# One message of each kind GLM-4's rule writes, rendered alone as GLM-4's own template does.
_GLM4_PROBES = (
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi"},
    {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
    {"role": "observation", "content": '{"t": 1}'},
)


def resolve_template(name: str, tokenizer) -> str:
    """``"auto"`` -> ``"glm4"`` when the tokenizer is GLM-4's (it has ``[gMASK]`` and ``<sop>`` and its
    chat template renders each message alone as ``[gMASK]<sop><|role|>metadata\ncontent``, as
    glm-4-9b-chat's and the demo's do), else ``"chat_template"``: GLM-4.5/4.6 also start with
    ``[gMASK]<sop>`` but render turns differently, so their own template labels them. Other names as given."""
    if name != "auto":
        return name
    if None in (token_id(tokenizer, "[gMASK]"), token_id(tokenizer, "<sop>")):
        return "chat_template"
    if not getattr(tokenizer, "chat_template", None):
        return "chat_template"  # ChatTemplate then says that the tokenizer has none
    prefix = "[gMASK]<sop>"
    try:
        for m in _GLM4_PROBES:
            if tokenizer.apply_chat_template([m], tokenize=False) != prefix + Glm4Template._fast_text(m):
                return "chat_template"
    except Exception:  # a template that cannot render a lone message is not GLM-4's
        return "chat_template"
    return "glm4"


def describe_template(asked: str, resolved: str) -> str:
    """The line a run prints at start: which template labels the data, and why when ``auto`` chose it."""
    why = {
        "glm4": "the tokenizer is GLM-4's; GLM-4's per-message labels",
        "chat_template": "the tokenizer's own chat template, which is not GLM-4's",
    }
    return f"template: {resolved}" + (f" (auto: {why[resolved]})" if asked == "auto" else "")


__all__ = ["TEMPLATES", "Template", "Unexpressible", "make_template", "render", "resolve_template",
           "describe_template", "Problem"]  # fmt: skip
