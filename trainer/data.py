"""Conversations to ``input_ids`` and ``labels``, cached on disk.

Reading and validating records is ``trainer/conversations.py``; the label rules (GLM-4's, and any
chat template's) are ``trainer/templates.py``. This module encodes a whole file in parallel
processes, applies ``max_length`` (dropping, or cutting at a turn boundary), counts what it drops in
a ``DataSummary``, and caches the result keyed by the file's content, the tokenizer and the settings.
Preference pairs go the same way (``pairs=True``): each record becomes its chosen and its rejected
conversation, side by side, and ``truncate`` drops the prompt's oldest turns instead of cutting.

Labels follow the Hugging Face convention: aligned with ``input_ids`` (the model shifts them), -100
where there is no loss.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trainer.conversations import (  # noqa: F401  (re-exported: the public names of trainer.data)
    ROLES,
    Conversation,
    DataError,
    Problem,
    as_record,
    iter_items,
    load_conversations,
    parse_json_record,
    preference_records,
    source_digest,
    without_oldest_turns,
)
from trainer.templates import Unexpressible, make_template

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEMO_TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
DEMO_TRAIN_FILE = ASSETS_DIR / "demo_train.jsonl"
DEMO_VAL_FILE = ASSETS_DIR / "demo_val.jsonl"

IGNORE_INDEX = -100
OVERLONG = ("drop", "truncate")
_CACHE_FORMAT = 3  # bump when the encoding or the cache layout changes
_CHUNK = 256  # conversations per worker task


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
    truncated: int = 0  # overlong="truncate": kept, cut at the end of the last whole trained turn
    skipped_no_label: int = 0  # no trainable token (after truncation, if any)
    skipped_template: int = 0  # a trained message the chat template drops or cannot render
    skip_example: str = ""  # the first of those, "<file>:<line>: <why>"
    tokens: int = 0  # in kept conversations
    label_tokens: int = 0  # tokens with a label in kept conversations
    max_length: int = 0
    overlong: str = "drop"
    template: str = ""
    encoder: str = ""  # the encoding path that ran
    from_cache: bool = False
    seconds: float = 0.0
    unit: str = "conversations"  # or "preference pairs": then counts are of pairs, tokens of both sides

    @property
    def label_fraction(self) -> float:
        return self.label_tokens / self.tokens if self.tokens else 0.0

    def format(self) -> str:
        source = "cache" if self.from_cache else "encoded"
        pairs = self.unit != "conversations"
        lines = [
            f"data {self.path}: {self.kept}/{self.conversations} {self.unit} kept "
            f"({source}, {self.encoder or self.template}, {self.seconds:.1f}s)",
            f"  tokens {self.tokens:,}{' in chosen and rejected conversations' if pairs else ''}, with a "
            f"label {self.label_tokens:,} ({100 * self.label_fraction:.1f}%)",
        ]
        if self.dropped_overlong:
            longer = "with a conversation longer" if pairs else "longer"
            lines.append(f"  dropped {self.dropped_overlong} {longer} than max_length={self.max_length}")
        if self.truncated and pairs:
            lines.append(f"  truncated {self.truncated} prompts to their latest turns to fit "
                         f"max_length={self.max_length}")  # fmt: skip
        elif self.truncated:
            lines.append(f"  truncated {self.truncated} to max_length={self.max_length} at a turn boundary")
        if self.skipped_no_label:
            what = "with an answer that has" if pairs else "with"
            lines.append(f"  skipped {self.skipped_no_label} {what} no trainable token")
        if self.skipped_template:
            lines.append(
                f"  skipped {self.skipped_template} the chat template cannot render as given, "
                f"e.g. {self.skip_example}"
            )
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


# Files a tokenizer directory holds one of (Hugging Face fast and slow, SentencePiece, Tekken, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "tekken.json", "*.tiktoken", "spiece.model")  # fmt: skip


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """``"demo"`` -> the built-in GLM-4-style tokenizer; anything else -> ``AutoTokenizer``.

    A tokenizer whose code lives in the model repository (GLM-4's ``glm-4-9b-chat``) needs
    ``trust_remote_code=True``; without it the error says so. Such a slow tokenizer serves
    ``template="glm4"`` (each message tokenized by it, as GLM-4's code does); ``chat_template``
    needs a fast one (character offsets).
    """
    from transformers import AutoTokenizer

    path = DEMO_TOKENIZER_DIR if str(name_or_path) == "demo" else name_or_path
    if Path(path).is_dir() and not any(next(Path(path).glob(p), None) for p in TOKENIZER_FILES):
        raise ValueError(
            f"no tokenizer files in {path} (looked for {', '.join(TOKENIZER_FILES)}); point --tokenizer at "
            "the directory that has them"
        )  # transformers would build an empty one-token tokenizer from such a directory
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ValueError(
                f"tokenizer {name_or_path} runs code from its repository; set trust_remote_code: true "
                "(--trust-remote-code true) if you trust it"
            ) from None
        raise
    return tok


def _tokenizer_fingerprint(tokenizer) -> str:
    # Serialising a 131k vocabulary takes a second: once per tokenizer object and template.
    key = (id(tokenizer), len(tokenizer), str(tokenizer.chat_template), tokenizer.eos_token_id)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = _fingerprint(tokenizer)
    return _FINGERPRINTS[key]


def _fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    if getattr(tokenizer, "is_fast", False):
        h.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(f"{tokenizer.eos_token_id}".encode())
    return h.hexdigest()


_TOKEN_CHARS: dict = {}
_FINGERPRINTS: dict = {}


def _max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: ``len(text) / this`` bounds a text's token
    count from below, cheaply (byte-level vocabularies spell a token with one character a byte)."""
    key = (id(tokenizer), len(tokenizer))
    if key not in _TOKEN_CHARS:
        _TOKEN_CHARS[key] = max(map(len, tokenizer.get_vocab()), default=1)
    return _TOKEN_CHARS[key]


# ---------------------------------------------------------------------------------------------
# One conversation


def _encode_one(template, record: dict) -> tuple[list[int], list[bool]]:
    try:
        prepared = template.prepare(record)
    except Problem as e:
        raise DataError(f"<messages>:0: {e}") from None
    result = template.encode([prepared])[0]
    if isinstance(result, Unexpressible):
        raise DataError(f"<messages>:0: {result}")
    return result


def encode_conversation(
    messages,
    tokenizer,
    *,
    template="glm4",
    loss_on="all",
    end_token=None,
    tools=None,
    chat_template_kwargs=None,
) -> Encoded:
    """One conversation (a list of message dicts) to ``Encoded(input_ids, labels)``.

    ``template``: "glm4" (GLM-4's per-message rule) or "chat_template" (the tokenizer's template,
    rendered once). ``loss_on``: "all" assistant turns or the "last" one; a message with
    ``"loss": false`` is never trained. ``end_token``: appended after the conversation (glm4) or
    after a final assistant turn of a template without end-of-turn marker: None (glm4: ``<|user|>``,
    chat_template: eos), "eos", a token string or an id. ``tools`` and ``chat_template_kwargs`` as a
    record's. No truncation here.
    """
    record = {"messages": messages}
    if tools is not None:
        record["tools"] = tools
    if chat_template_kwargs is not None:
        record["chat_template_kwargs"] = chat_template_kwargs
    ids, mask = _encode_one(_template_for(tokenizer, template, loss_on, end_token), record)
    return Encoded(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)])


_TEMPLATES: dict = {}


def _template_for(tokenizer, template, loss_on, end_token):
    key = (id(tokenizer), template, loss_on, end_token)
    hit = _TEMPLATES.get(key)
    if hit is None or hit.tokenizer is not tokenizer:
        hit = _TEMPLATES[key] = make_template(template, tokenizer, loss_on, end_token)
    return hit


def truncate(ids: list[int], mask: list[bool], max_length: int) -> tuple[list[int], list[bool]]:
    """Cut to ``max_length`` at a turn boundary: a trained run cut by the limit loses its labels
    (no turn is trained without its end marker), and the unlabelled tail after the last whole
    trained turn goes."""
    cut_ids, cut_mask = ids[:max_length], mask[:max_length]
    if len(ids) > max_length and mask[max_length] and cut_mask[-1]:
        k = max_length - 1
        while k >= 0 and cut_mask[k]:
            cut_mask[k] = False
            k -= 1
    last = max((i for i, m in enumerate(cut_mask) if m), default=-1)
    return cut_ids[: last + 1], cut_mask[: last + 1]


def _bounded(prepared, max_length: int, chars_per_token: int, overlong: str):
    """A cheap bound before tokenizing: the user, assistant and tool text of a conversation has at
    least ``chars / chars_per_token`` tokens. Returns None when it surely ends beyond
    ``max_length`` (dropped, or with ``truncate`` nothing left), else ``(prepared, cut)``: with
    ``truncate``, the messages from the first one that surely ends beyond the limit are cut."""
    conv, flags = prepared
    total = 0
    for i, m in enumerate(conv.messages):
        if m["role"] != "system":
            total += len(m.get("content") or "") + len(m.get("reasoning_content") or "")
        if total > max_length * chars_per_token:
            if overlong == "drop" or not any(flags[:i]):
                return None
            cut = Conversation(conv.messages[:i], conv.may_train[:i], conv.tools, conv.kwargs)
            return (cut, flags[:i]), True
    return prepared, False


# ---------------------------------------------------------------------------------------------
# Files: parallel encoding and the on-disk cache

_WORKER: dict = {}


def _init_worker(tokenizer, template, loss_on, end_token, max_length, overlong, chars_per_token, pairs,
                 pool=False):  # fmt: skip
    if pool:  # one thread per worker process: the processes are the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["template"] = make_template(template, tokenizer, loss_on, end_token)
    _WORKER["chars_per_token"] = chars_per_token
    _WORKER["max_length"], _WORKER["overlong"], _WORKER["pairs"] = max_length, overlong, pairs


def _encode_task(items: list[tuple[int, str | dict]]):
    return (_encode_pair_chunk if _WORKER["pairs"] else _encode_chunk)(items)


def _chunk_result(ids_parts, mask_parts, counts: dict, items: int, example: str):
    """What a worker task returns: the kept sequences as flat arrays, their lengths and the counts."""
    lengths = [len(ids) for ids in ids_parts]
    total = sum(lengths)
    flat_ids = np.fromiter(itertools.chain.from_iterable(ids_parts), dtype=np.int32, count=total)
    flat_mask = np.fromiter(itertools.chain.from_iterable(mask_parts), dtype=np.bool_, count=total)
    return ("ok", flat_ids, flat_mask, np.asarray(lengths, dtype=np.int64), counts, items, example)


def _encode_chunk(items: list[tuple[int, str | dict]]):
    """Worker task: parse, validate and encode a chunk; returns arrays of the kept conversations."""
    template = _WORKER["template"]
    max_length, overlong = _WORKER["max_length"], _WORKER["overlong"]
    counts = {"dropped_overlong": 0, "truncated": 0, "skipped_no_label": 0, "skipped_template": 0}
    prepared, lines, cut = [], [], []
    for line, item in items:
        try:
            p = template.prepare(as_record(item))
        except Problem as e:
            return ("error", line, str(e))
        if not any(p[1]):
            counts["skipped_no_label"] += 1
            continue
        bounded = _bounded(p, max_length, _WORKER["chars_per_token"], overlong)
        if bounded is None:
            counts["dropped_overlong" if overlong == "drop" else "skipped_no_label"] += 1
            continue
        prepared.append(bounded[0])
        cut.append(bounded[1])
        lines.append(line)
    example = ""
    ids_parts, mask_parts = [], []
    for line, was_cut, result in zip(lines, cut, template.encode(prepared), strict=True):
        if isinstance(result, Unexpressible):
            counts["skipped_template"] += 1
            example = example or f"line {line}: {result}"
            continue
        ids, mask = result
        if len(ids) > max_length:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            ids, mask = truncate(ids, mask, max_length)
            was_cut = True
        if not any(mask):
            counts["skipped_no_label"] += 1
            continue
        counts["truncated"] += was_cut
        ids_parts.append(ids)
        mask_parts.append(mask)
    return _chunk_result(ids_parts, mask_parts, counts, len(items), example)


def _encode_pair_chunk(items: list[tuple[int, str | dict]]):
    """Worker task for preference records: each one's chosen and rejected conversation, side by side,
    kept or skipped together; ``truncate`` drops the prompt's oldest turns until both fit."""
    template, max_length = _WORKER["template"], _WORKER["max_length"]
    counts = {"dropped_overlong": 0, "truncated": 0, "skipped_no_label": 0, "skipped_template": 0}
    pairs, prepared = [], []
    for line, item in items:
        try:
            pair = preference_records(parse_json_record(item) if isinstance(item, str) else item)
            prepared.extend(template.prepare(conversation) for conversation in pair)
        except Problem as e:
            return ("error", line, str(e))
        pairs.append(pair)
    encoded = template.encode(prepared)
    cut = _fit_prompts(template, pairs, encoded, max_length) if _WORKER["overlong"] == "truncate" else None
    example = ""
    ids_parts, mask_parts = [], []
    for p, (line, _) in enumerate(items):
        pair = encoded[2 * p : 2 * p + 2]
        if problem := next((e for e in pair if isinstance(e, Unexpressible)), None):
            counts["skipped_template"] += 1
            example = example or f"line {line}: {problem}"
        elif not all(any(mask) for _, mask in pair):
            counts["skipped_no_label"] += 1
        elif _longest(pair) > max_length:
            counts["dropped_overlong"] += 1
        else:
            counts["truncated"] += bool(cut and cut[p])
            ids_parts.extend(ids for ids, _ in pair)
            mask_parts.extend(mask for _, mask in pair)
    return _chunk_result(ids_parts, mask_parts, counts, len(items), example)


def _longest(pair) -> int:
    """Tokens in the longer conversation of an encoded pair (0 for one the template cannot render)."""
    return max((len(e[0]) for e in pair if not isinstance(e, Unexpressible)), default=0)


def _fit_prompts(template, pairs: list, encoded: list, max_length: int) -> list[int]:
    """Re-encode, in place in ``encoded``, each pair over ``max_length`` without its prompt's oldest
    turns, one more turn a round (a batch of the pairs still over), until it fits or only its last user
    turn is left. Returns how many turns each pair lost."""
    cut = [0] * len(pairs)
    over = [p for p in range(len(pairs)) if _longest(encoded[2 * p : 2 * p + 2]) > max_length]
    while over:
        shorter = []
        for p in over:
            if (trimmed := without_oldest_turns(pairs[p], cut[p] + 1)) is None:
                continue  # only the last user turn is left: the pair stays over, and is dropped
            try:
                shorter.append((p, [template.prepare(conversation) for conversation in trimmed]))
            except Problem:  # a shortened prompt the template refuses: the pair stays as it was
                continue
            cut[p] += 1
        if not shorter:
            break
        redone = template.encode([prepared for _, pair in shorter for prepared in pair])
        over = []
        for i, (p, _) in enumerate(shorter):
            encoded[2 * p : 2 * p + 2] = redone[2 * i : 2 * i + 2]
            if _longest(encoded[2 * p : 2 * p + 2]) > max_length:
                over.append(p)
    return cut


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
    pairs=False,
    records=None,
) -> tuple[EncodedDataset, DataSummary]:
    """Validate and encode every conversation of a file; returns (encoded, summary).

    ``encoded`` is a sequence of ``Encoded`` (see ``EncodedDataset``), in file order, holding the
    kept conversations only. Conversations longer than ``max_length`` are dropped
    (``overlong="drop"``) or cut at the end of their last whole trained turn (``"truncate"``); those
    left with no trainable token, and those with a trained message the chat template cannot render,
    are skipped; all are counted in the summary. ``path``: JSONL, a JSON array, Parquet, a
    ``datasets`` directory or dataset id. ``num_workers``: processes
    (None: one per CPU, at most 8). ``cache_dir``: where results are cached, keyed by the file's
    content, the tokenizer and these settings (None: ``$TRITRAIN_CACHE`` or ``~/.cache/tritrain``;
    False: no cache). ``pairs``: the file holds preference records; the result holds the chosen
    conversation of pair ``p`` at ``2p`` and the rejected one at ``2p + 1``, the summary counts pairs
    (see ``trainer/preference.py``). ``records``: the file's rows when already read (the demo's pairs).
    Raises ``DataError("<file>:<line>: <problem>")`` on bad input.
    """
    t0 = time.perf_counter()
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    tmpl = _template_for(tokenizer, template, loss_on, end_token)  # validates the settings
    if records is None:
        digest, loaded = source_digest(path)
    else:
        digest, loaded = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest(), records
    unit = "preference pairs" if pairs else "conversations"

    entry = None
    if cache_dir is not False:
        settings = [_CACHE_FORMAT, template, loss_on, tmpl.end_id, max_length, overlong] + ["pairs"] * pairs
        key = hashlib.sha256(json.dumps([digest, _tokenizer_fingerprint(tokenizer), settings]).encode())
        entry = Path(cache_dir or _default_cache_dir()) / key.hexdigest()[:32]
        cached = _load_cached(entry)
        if cached is not None:
            ds, summary = cached
            if summary.skip_example.startswith(f"{summary.path}:"):  # the same content under another name
                summary.skip_example = f"{path}:{summary.skip_example.removeprefix(f'{summary.path}:')}"
            summary.path, summary.from_cache, summary.seconds = str(path), True, time.perf_counter() - t0
            return ds, summary

    items = iter_items(path, loaded)
    del loaded
    if not items:
        raise DataError(f"{path}:1: no {unit} in the file")
    chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 8)
    num_workers = max(1, min(num_workers, len(chunks)))
    chars_per_token = _max_token_chars(tokenizer)
    init_args = (tokenizer, template, loss_on, end_token, max_length, overlong, chars_per_token, pairs)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"encoding {Path(path).name}", unit="pair" if pairs else "conv",
                   leave=False)  # fmt: skip
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
                collect(_encode_task(chunk))
        else:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(num_workers, _init_worker, (*init_args, True)) as pool:
                for result in pool.imap(_encode_task, chunks):
                    collect(result)
    finally:
        _WORKER.clear()
        if bar is not None:
            bar.close()

    summary = DataSummary(path=str(path), conversations=len(items), max_length=max_length, overlong=overlong,
                          template=template, unit=unit)  # fmt: skip
    summary.encoder = tmpl.path
    for r in results:
        for k, v in r[4].items():
            setattr(summary, k, getattr(summary, k) + v)
        if r[6] and not summary.skip_example:
            summary.skip_example = f"{path}:{r[6].removeprefix('line ')}"
    ids = np.concatenate([r[1] for r in results]) if results else np.zeros(0, np.int32)
    mask = np.concatenate([r[2] for r in results]) if results else np.zeros(0, np.bool_)
    lengths = np.concatenate([r[3] for r in results]) if results else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    summary.kept = len(lengths) // 2 if pairs else len(lengths)
    summary.tokens, summary.label_tokens = len(ids), int(mask.sum())
    ds = EncodedDataset(ids, mask, offsets)
    if entry is not None:
        _store_cached(entry, ds, summary)
    summary.seconds = time.perf_counter() - t0
    return ds, summary
