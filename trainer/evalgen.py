"""Validation by generation: what the adapter answers, scored against the reference answers.

Validation loss alone misses the classic small-dataset trap: loss keeps falling while the answers get
longer and stop ending. With ``eval_generate: N``, every evaluation greedy-generates the final assistant
turn of the first N validation conversations (the adapter as it is at that step, the conversation's own
chat template, batched with a KV cache, stopping at the chat's end-of-turn tokens or after
``eval_max_new_tokens``) and scores the answers against the reference turns. ``metric_for_best`` then
chooses ``best/`` and early stopping by any of those scores or by the validation loss, and
:func:`judge` warns when training loss keeps falling while that metric gets worse.

The file reads top to bottom: the metrics (pure functions on strings), batched greedy generation, the
validation prompts, the per-evaluation runner (split across processes like validation), choosing the
best evaluation with the over-fitting guard, and the plot panel.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.config import METRICS
from trainer.conversations import load_conversations, normalize
from trainer.data import DEMO_VAL_FILE, DataError
from trainer.distributed import ONE_PROCESS, World
from trainer.generate import answer_text, cache_argument, cached_attention, prompt_ids, stop_token_ids

# ---------------------------------------------------------------------------------------- metrics

# The metric names and their directions (METRICS) are config vocabulary: trainer/config.py validates
# metric_for_best against them.
LOOP_REPEATS = 3  # a loop: at least this many back-to-back copies of a block ...
LOOP_SPAN = 24  # ... covering at least this many characters of the normalised answer
THINK_END = "</think>"  # ends the reasoning block of Qwen3, DeepSeek-R1, GLM-4.5 and others


def normalize_whitespace(text: str) -> str:
    """Runs of whitespace as one space, none at the ends."""
    return " ".join(text.split())


def exact_match(output: str, reference: str) -> bool:
    return normalize_whitespace(output) == normalize_whitespace(reference)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character, each costing 1).

    Myers' bit-vector algorithm in Hyyrö's formulation: column j of the textbook DP table is kept as two
    bit vectors (where the vertical difference is +1 and where it is -1) in Python integers of len(b)
    bits, so each character of ``a`` costs a few big-integer operations instead of len(b) Python steps.
    """
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    match: dict[str, int] = {}  # character -> bits of its positions in b
    for i, c in enumerate(b):
        match[c] = match.get(c, 0) | (1 << i)
    full, top = (1 << m) - 1, 1 << (m - 1)
    plus, minus, distance = full, 0, m  # column 0: D[i][0] = i, every vertical step +1
    for c in a:
        eq = match.get(c, 0)
        xv = eq | minus
        xh = (((eq & plus) + plus) ^ plus) | eq
        h_plus = minus | (~(xh | plus) & full)
        h_minus = plus & xh
        distance += 1 if h_plus & top else -1 if h_minus & top else 0
        h_plus = ((h_plus << 1) | 1) & full  # row 0: D[0][j] = j, the horizontal step there is +1
        h_minus = (h_minus << 1) & full
        plus = h_minus | (~(xv | h_plus) & full)
        minus = h_plus & xv
    return distance


def similarity(output: str, reference: str) -> float:
    """1 - edit distance / length of the longer string, on whitespace-normalised text; 1.0 when both are
    empty, 0.0 when nothing is shared."""
    a, b = normalize_whitespace(output), normalize_whitespace(reference)
    longest = max(len(a), len(b))
    return 1.0 - edit_distance(a, b) / longest if longest else 1.0


def has_loop(seq, *, repeats: int = LOOP_REPEATS, span: int = LOOP_SPAN) -> bool:
    """Whether ``seq`` (a string, or a sequence of ints such as token ids) is caught in a loop: a stretch
    of at least max(repeats * p, span) elements that repeats one block of p elements back to back (the
    last copy may be partial). "abcabcabc" holds "abc" 3 times, a stretch of 9.

    A stretch of period p is a run of positions i with seq[i] == seq[i + p]: a run of L such positions is
    a stretch of L + p elements. One vectorised comparison per period."""
    x = _as_array(seq)
    n = len(x)
    for period in range(1, n // repeats + 1):
        need = max(repeats * period, span) - period  # positions in a run
        if need > n - period:
            continue
        equal = np.concatenate(([0], (x[period:] == x[:-period]).view(np.int8), [0]))
        edges = np.diff(equal)
        if (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).max(initial=0) >= need:
            return True
    return False


def _as_array(seq) -> np.ndarray:
    if isinstance(seq, str):
        return np.frombuffer(seq.encode("utf-32-le"), dtype=np.uint32)
    return np.asarray(seq, dtype=np.int64).reshape(-1)


def length_ratio(output: str, reference: str) -> float:
    """Characters of the answer over characters of the reference, whitespace-normalised (an empty
    reference counts as one character)."""
    return len(normalize_whitespace(output)) / max(1, len(normalize_whitespace(reference)))


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, final answer) of a turn: the text up to the last ``</think>`` and the text after it;
    ("", text) when it has no reasoning block."""
    reasoning, end, answer = text.rpartition(THINK_END)
    return (reasoning + end, answer) if end else ("", text)


def answer_scores(output: str, reference: str, stopped: bool) -> dict:
    """One answer's scores; the generation metrics are their means (see :func:`score_answers`). Match,
    similarity and length compare the final answers, after any reasoning block: a reasoning model's
    thoughts differ from the reference's in wording even when the answers agree. Loops count anywhere."""
    answer, expected = split_reasoning(output)[1], split_reasoning(reference)[1]
    return {
        "exact_match": exact_match(answer, expected),
        "similarity": similarity(answer, expected),
        "stopped": stopped,
        "loop": has_loop(normalize_whitespace(output)),
        "length_ratio": length_ratio(answer, expected),
    }


def score_answers(scores: list[dict]) -> dict[str, float]:
    """The generation metrics: means of the answers' scores (from :func:`answer_scores`)."""
    n = max(1, len(scores))
    per_answer = {"exact_match": "exact_match", "similarity": "similarity", "stop_rate": "stopped",
                  "repetition": "loop", "length_ratio": "length_ratio"}  # fmt: skip
    return {metric: sum(float(s[key]) for s in scores) / n for metric, key in per_answer.items()}


# ------------------------------------------------------------------------------ batched greedy generation


@torch.no_grad()
def generate_batch(
    model, prompts: list[list[int]], stops: set[int], *, max_new_tokens: int, pad_id: int = 0,
    world: World = ONE_PROCESS,
) -> list[tuple[list[int], bool]]:  # fmt: skip
    """Greedy answers to ``prompts`` (token ids) in one batch with a KV cache: for each prompt, the new ids
    (the stop token excluded) and whether a stop token ended them within ``max_new_tokens``.

    Prompts are left-padded; the attention mask hides the padding and position ids count real tokens
    only, so every row sees what it would see alone (trainer/generate.py's generate_ids). Finished rows
    ride along until every row is done. One host sync per new token (the all-done check). ``world``: the
    ranks that run every forward pass together (a sharded model): the loop ends when every row of every
    rank is done, so all of them run the same number of forward passes (gathers) even when a rank-local
    difference (an argmax tie) ends one rank's rows sooner."""
    with cached_attention(model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        device = base.get_input_embeddings().weight.device
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, longest - len(p) :] = torch.tensor(p)
            mask[row, longest - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=device)
        new = torch.zeros((len(prompts), max_new_tokens), dtype=torch.long, device=device)
        lengths = torch.full((len(prompts),), max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        cache_key = cache_argument(base)
        cache = None
        for t in range(max_new_tokens):
            result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **{cache_key: cache})  # fmt: skip
            cache = result[cache_key]
            token = result.logits[:, -1].float().argmax(-1)
            stopped = torch.isin(token, stop_ids) & ~done
            lengths = torch.where(stopped, t, lengths)
            done |= stopped
            new[:, t] = token
            if world.all_true(done.all()):
                break
            ids = token[:, None]
            mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
            positions = positions[:, -1:] + 1
        new, lengths, done = new.tolist(), lengths.tolist(), done.tolist()
    return [(row[:n], d) for row, n, d in zip(new, lengths, done, strict=True)]


# ------------------------------------------------------------------------------------ validation prompts


@dataclass
class Prompt:
    index: int  # the conversation's position in the validation file, from 0
    ids: list[int]  # the conversation up to its final assistant turn, ending with the assistant's role
    reference: str  # that turn as the model should generate it


def reference_answer(tokenizer, messages: list[dict], *, tools=None, template_kwargs=None) -> str:
    """The last message (an assistant turn) as generation should produce it: what the chat template
    renders after the generation prompt, special tokens dropped (GLM-4: a tool call's function name line
    and arguments). Its stripped content when the template renders the whole conversation differently."""
    kwargs = dict(tools=tools, tokenize=False, **(template_kwargs or {}))
    before = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, **kwargs)
    full = tokenizer.apply_chat_template(messages, **kwargs)
    if not full.startswith(before):
        return messages[-1]["content"].strip()
    return answer_text(tokenizer, tokenizer(full[len(before) :], add_special_tokens=False).input_ids)


def validation_prompts(path, tokenizer, *, count: int, template: str, max_length: int) -> tuple[list, int]:
    """(prompts, skipped): the final assistant turn of the first ``count`` conversations of ``path`` that
    have one and whose prompt fits in ``max_length`` tokens, in file order; and how many were passed over.
    Messages are read as training reads them (GLM-4's form for ``template="glm4"``)."""
    prompts, skipped = [], 0
    for index, record in enumerate(load_conversations(path)):
        if len(prompts) == count:
            break
        conversation = normalize(record, glm4=template == "glm4")
        messages, extra = (
            conversation.messages,
            dict(tools=conversation.tools, template_kwargs=conversation.kwargs),
        )
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        ids = prompt_ids(tokenizer, messages[:last], **extra) if last else []
        if not ids or len(ids) > max_length:
            skipped += 1
            continue
        prompts.append(Prompt(index, ids, reference_answer(tokenizer, messages[: last + 1], **extra)))
    return prompts, skipped


# ------------------------------------------------------------------------------------ at each evaluation

GENERATION_BATCH_FACTOR = 2  # a generation batch holds up to 2 x max_tokens prompt + answer tokens (README)


class GenerationEval:
    """Answers the validation prompts at each evaluation and scores them. Under torchrun every rank answers
    its share of the prompts (sorted by length, dealt round-robin), all answers are gathered on every
    rank and rank 0 appends them to ``eval_samples.jsonl``. Ranks run their forward passes independently,
    which data parallel allows. A sharded model (FSDP, ``split=False``) needs every rank in every forward
    pass: each rank then answers every prompt, in the same batches, and a batch ends when it is done on
    every rank (the same weights give the same greedy tokens, up to ties). Either way trainer/train.py's
    run_eval logs and judges rank 0's numbers, so every rank takes the same best/ and early-stop verdict."""

    def __init__(self, prompts: list[Prompt], tokenizer, stops: set[int], *, max_new_tokens: int,
                 batch_tokens: int, world: World = ONE_PROCESS, autocast=None,
                 samples_path: Path | None = None, skipped: int = 0, split: bool = True):  # fmt: skip
        self.prompts = sorted(prompts, key=lambda p: -len(p.ids))
        self.skipped = skipped  # conversations passed over (for describe)
        self.tokenizer, self.stops, self.world = tokenizer, stops, world
        self.max_new_tokens, self.batch_tokens = max_new_tokens, batch_tokens
        self.autocast = autocast if autocast is not None else nullcontext()
        self.samples_path = samples_path
        self.split = split and world.size > 1

    @classmethod
    def setup(
        cls,
        cfg,
        tokenizer,
        model,
        world: World,
        autocast,
        out: Path,
        resumed_step: int = 0,
        split: bool = True,
    ):
        """None when ``cfg.eval_generate`` is 0. Keeps the samples of a resumed run up to its step."""
        if not cfg.eval_generate or not cfg.val_file:
            return None
        path = DEMO_VAL_FILE if cfg.val_file == "demo" else cfg.val_file
        prompts, skipped = validation_prompts(path, tokenizer, count=cfg.eval_generate, template=cfg.template,
                                              max_length=cfg.max_length)  # fmt: skip
        if not prompts:
            raise DataError(f"{path}:1: eval_generate: no conversation with a final assistant turn whose "
                            f"prompt fits in max_length={cfg.max_length} tokens")  # fmt: skip
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        samples = Path(out) / "eval_samples.jsonl"
        if world.is_main:
            _keep_samples_up_to(samples, resumed_step)
        stops = stop_token_ids(tokenizer, base)
        return cls(prompts, tokenizer, stops, max_new_tokens=cfg.eval_max_new_tokens,
                   batch_tokens=GENERATION_BATCH_FACTOR * cfg.max_tokens, world=world, autocast=autocast,
                   samples_path=samples, skipped=skipped, split=split)  # fmt: skip

    def describe(self) -> str:
        lengths = [len(p.ids) for p in self.prompts]
        return (
            f"generation eval: {len(self.prompts)} validation prompts ({min(lengths)}-{max(lengths)} tokens"
            + (f", {self.skipped} passed over: no final assistant turn or too long" if self.skipped else "")
            + f"), greedy, up to {self.max_new_tokens} new tokens; answers in {self.samples_path}"
        )

    def batches(self, prompts: list[Prompt]) -> list[list[Prompt]]:
        """Consecutive prompts (longest first) while rows x (longest prompt + new tokens) fits the budget."""
        out: list[list[Prompt]] = []
        for p in prompts:
            if out and (len(out[-1]) + 1) * (len(out[-1][0].ids) + self.max_new_tokens) <= self.batch_tokens:
                out[-1].append(p)
            else:
                out.append([p])
        return out

    def run(self, model, step: int) -> dict:
        """The generation metrics of ``model`` as it is, and ``gen_seconds`` (generation and scoring)."""
        start = time.perf_counter()
        answers = []
        mine = self.prompts[self.world.rank :: self.world.size] if self.split else self.prompts
        together = ONE_PROCESS if self.split else self.world  # the ranks in each forward pass
        for batch in self.batches(mine):
            with self.autocast:
                results = generate_batch(model, [p.ids for p in batch], self.stops,
                                         max_new_tokens=self.max_new_tokens, world=together)  # fmt: skip
            for p, (ids, stopped) in zip(batch, results, strict=True):
                output = answer_text(self.tokenizer, ids)
                answers.append({"step": step, "prompt": p.index, "reference": p.reference, "output": output,
                                **answer_scores(output, p.reference, stopped)})  # fmt: skip
        if self.split:
            answers = [a for part in self.world.gather_objects(answers) for a in part]
        answers = sorted(answers, key=lambda a: a["prompt"])
        metrics = score_answers(answers)
        if self.world.is_main and self.samples_path is not None:
            with open(self.samples_path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
        return {**metrics, "gen_seconds": time.perf_counter() - start}


def _keep_samples_up_to(path: Path, step: int) -> None:
    """Drop the samples of evaluations after ``step`` (a resumed run redoes them; a fresh run: all)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line + "\n" for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(kept), encoding="utf-8")


# ------------------------------------------------------------------- the best evaluation, over-fitting guard

GUARD_EVALS = 3  # with patience 0 the over-fitting guard speaks after this many worse evaluations in a row


@dataclass
class Verdict:
    improved: bool  # this evaluation is the best so far: save best/
    stop: bool  # patience is exhausted: stop training
    lines: list[str]  # to print, rank 0


def _score(metric: str, value: float) -> float:
    """Higher is better."""
    direction = METRICS[metric]
    return -value if direction == "min" else value if direction == "max" else -abs(value - 1.0)


def _train_loss_at(records: list[dict], step: int) -> float | None:
    """The training loss logged last at or before ``step``."""
    logged = [r["loss"] for r in records if "loss" in r and r["step"] <= step]
    return logged[-1] if logged else None


def judge(state: dict, record: dict, records: list[dict], *, metric: str, patience: int) -> Verdict:
    """Compare an evaluation (``record``: val_loss and, with eval_generate, the generation metrics) with
    the best so far by ``metric``; ties on the metric go to the lower validation loss. Updates ``state``
    (the run's checkpointed state): best_val (validation loss of the best evaluation), best_metric,
    best_by, best_step, evals_since_best (for patience, as before) and worse_in_row (evaluations
    strictly worse than the best on the metric, for the over-fitting guard). ``records``: the run's
    metrics so far, for the training loss."""
    best = state.get("best_metric") if state.get("best_by") == metric else None
    if best is None and metric == "val_loss":  # checkpoints from before metric_for_best
        best = state.get("best_val")
    key = (_score(metric, record[metric]), -record["val_loss"])
    best_key = None if best is None else (_score(metric, best), -state["best_val"])
    improved = best_key is None or key > best_key
    worse = not improved and key[0] < best_key[0]
    if improved:
        state.update(best_val=record["val_loss"], best_metric=record[metric], best_by=metric,
                     best_step=record["step"], evals_since_best=0, worse_in_row=0)  # fmt: skip
    else:
        state["evals_since_best"] = state.get("evals_since_best", 0) + 1
        state["worse_in_row"] = state.get("worse_in_row", 0) + 1 if worse else 0
    lines = [format_eval(record, best=improved)]
    if worse and state["worse_in_row"] == (patience or GUARD_EVALS):
        lines += _overfitting_line(state, record, records, metric)
    return Verdict(improved, patience > 0 and state["evals_since_best"] >= patience, lines)


def _overfitting_line(state: dict, record: dict, records: list[dict], metric: str) -> list[str]:
    best_step = state.get("best_step")
    then, now = _train_loss_at(records, best_step or 0), _train_loss_at(records, record["step"])
    if best_step is None or then is None or now is None or not now < then:
        return []
    return [
        f"over-fitting: training loss fell from {then:.4f} to {now:.4f} since step {best_step} while "
        f"{metric} got worse for {state['worse_in_row']} evaluations in a row ({state['best_metric']:.4g} "
        f"at step {best_step}, {record[metric]:.4g} now); best/ holds the adapter of step {best_step}"
    ]


def format_eval(record: dict, *, best: bool = False) -> str:
    """The evaluation's log line: validation loss, then the generation metrics when there are any."""
    line = f"step {record['step']}: val loss {record['val_loss']:.4f}"
    if "exact_match" in record:
        line += (
            f", exact match {record['exact_match']:.3f}, similarity {record['similarity']:.3f}, "
            f"stop rate {record['stop_rate']:.2f}, repetition {record['repetition']:.2f}, "
            f"length ratio {record['length_ratio']:.2f} (generated in {record['gen_seconds']:.1f} s)"
        )
    return line + (" (best)" if best else "")


def best_summary(state: dict, metric: str) -> str:
    """For the run's last line: which evaluation best/ holds when it is chosen by a generation metric."""
    if metric == "val_loss" or state.get("best_by") != metric:
        return ""
    return f" (best/ is step {state['best_step']} by {metric}: {state['best_metric']:.4g})"


# ------------------------------------------------------------------------------------------------- plot


def has_generation_metrics(records: list[dict]) -> bool:
    return any("exact_match" in r for r in records)


def plot_generation(ax, records: list[dict]) -> None:
    """The generation metrics over the steps on ``ax`` (a matplotlib Axes), length ratio on the right."""
    rows = [r for r in records if "exact_match" in r]
    steps = [r["step"] for r in rows]
    for key, label in (("exact_match", "exact match"), ("similarity", "similarity"),
                       ("stop_rate", "stop rate"), ("repetition", "repetition")):  # fmt: skip
        ax.plot(steps, [r[key] for r in rows], "o-", label=label)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("share of validation answers")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(steps, [r["length_ratio"] for r in rows], "k--", alpha=0.6, label="length ratio")
    right.axhline(1.0, color="k", linewidth=0.5, alpha=0.3)  # the reference's length
    right.set_ylim(bottom=0)
    right.set_ylabel("answer / reference length")
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = right.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, fontsize="small", loc="best")
