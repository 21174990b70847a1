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
  end-of-turn marker after them (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``,
  ``<|end|>``, ``<|return|>``, ``<|call|>``, ``<|observation|>``...). Templates with
  ``{% generation %}`` blocks are labelled by those blocks instead. A template with no marker after
  the turn (GLM-4) gets the token that follows the turn labelled, or ``end_token`` appended. A
  trained message the template drops or cannot render is reported (``Unexpressible``), never
  trained as something else.
"""

from __future__ import annotations

import json
import re
from typing import Protocol

from trainer.conversations import Conversation, Problem, normalize, trainable
from trainer.fasttok import PROBE_TEXTS, PieceEncoder

GLM4_ROLES = ("system", "user", "assistant", "observation")
LOSS_ON = ("all", "last")
# Tokens that end an assistant turn in the families we know; only those that are single added
# tokens of the tokenizer at hand are used, plus its eos token.
END_MARKERS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "</s>", "<|end|>", "<|return|>", "<|call|>",
    "<|endoftext|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|user|>", "<|observation|>",
)  # fmt: skip
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE_USER = "Tell me 0x51f3."
_PROBE_ANSWER = "It is 20979."


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
        added = [t.content for t in self.backend.get_added_tokens_decoder().values()]
        self.added_re = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True))) or "(?!)")
        markers = {m for m in END_MARKERS if m in added}
        if tokenizer.eos_token in added:
            markers.add(tokenizer.eos_token)
        self.marker_re = re.compile(
            "|".join(map(re.escape, sorted(markers, key=len, reverse=True))) or "(?!)"
        )
        self._headers: dict[str, tuple[str, list[str]]] = {}
        self.fast_render = FastRenderer(tokenizer)

    @property
    def path(self) -> str:
        how = "{% generation %} blocks" if self.has_generation else "turns located in the rendering"
        return f"chat_template: rendered once, tokenized once, {how}"

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
        user = [{"role": "user", "content": _PROBE_USER}]
        plain = render(self.tokenizer, user, kwargs=kwargs)
        prompt = render(self.tokenizer, user, kwargs=kwargs, generation_prompt=True)
        common = 0
        while common < min(len(plain), len(prompt)) and plain[common] == prompt[common]:
            common += 1
        for m in self.added_re.finditer(prompt):  # never cut inside an added token
            if m.start() < common < m.end():
                common = m.start()
        hdr = prompt[common:]
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

    def _locate(self, text: str, conv: Conversation, flags, header) -> list[tuple[int, int, int]]:
        """Per message: (end of its assistant header, start of its first anchor, end of its last);
        -1 where there is none. Anchors are searched in order, an assistant's after its header and
        its reasoning (when the template keeps it); a trained message whose anchors are missing is
        unexpressible."""
        pos, out = 0, []
        for i, m in enumerate(conv.messages):
            anchors = self._anchors(m) if m["role"] != "system" else []  # templates move system text
            start, first, p = -1, -1, pos
            if m["role"] == "assistant" and anchors:
                start = self._assistant_start(text, pos, anchors[0], header)
                if start < 0 and flags[i]:
                    raise Unexpressible(f"message {i + 1}: the rendering has no assistant header for it")
                p = max(start, pos)
                reasoning = (m.get("reasoning_content") or "").strip()
                turn_end = self.marker_re.search(text, p)
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
                pos = p
        return out

    def _assistant_start(self, text: str, pos: int, anchor: str, header: tuple[str, list[str]]) -> int:
        """Where an assistant message's turn starts: after its header (found before its first
        anchor). Without one there: for a template with no generation prompt, after the added token
        that closes the previous turn (Mistral's ``[/TOOL_RESULTS]``); else after the added token
        right before the anchor (DeepSeek after tool results)."""
        prompt, forms = header
        j = text.find(anchor, pos)
        found = self._header(text, pos, j if j >= 0 else len(text), forms)
        if found is not None:
            return found[1]
        if j < 0:
            return -1
        if not prompt.strip():
            m = self.added_re.search(text, pos, j)
            return m.end() if m else pos
        found = list(self.added_re.finditer(text, pos, j))
        if not found or text[found[-1].end() : j].strip():
            return -1  # text between them that is no header we know (a role name?): refuse
        return found[-1].end()

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
        header = self.header(conv.kwargs)
        forms = header[1]
        located = self._locate(text, conv, flags, header)
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
                header = self._header(text, lo, hi, forms)
                if header is None:
                    continue  # the template renders nothing for it (GLM-4): nothing to learn
                start = last = header[1]
            marker = self.marker_re.search(text, last, hi)
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
            located = self._locate(text, conv, flags, self.header(conv.kwargs))
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
    if name not in TEMPLATES:
        raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {name!r}")
    return TEMPLATES[name](tokenizer, loss_on, end_token)


__all__ = ["TEMPLATES", "Template", "Unexpressible", "make_template", "render", "Problem"]
