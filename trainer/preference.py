"""Preference fine-tuning on packed chosen/rejected pairs: DPO, SimPO and ORPO.

A preference record (``trainer/conversations.py``: ``preference_pair``) becomes two conversations, the
prompt followed by the chosen answer and by the rejected one, encoded with the SFT label rule (by
``trainer/data.py``, in parallel and cached as SFT data is): only the answer's assistant tokens and their
end-of-turn marker carry labels. Both sequences of a pair go into
the same packed row, back to back (varlen attention keeps them apart), so a row holds whole pairs and
no padding. The loss reads labelled rows only: the answer tokens' hidden states are compacted, the
fused masked cross-entropy gives each one's log-probability, and ``index_add`` sums them per sequence;
prompt rows never reach the head. The reference is the same model with the adapter switched off, run
without gradients in the same step, or once before training (``ref_logps: cached``).

Per pair, with policy log-prob sums ``c``, ``r`` over ``n_c``, ``n_r`` answer tokens and the reference's
``c0``, ``r0`` (``sigma`` the logistic function, ``eps`` the label smoothing)::

    dpo    z = beta * ((c - c0) - (r - r0))             loss = -(1 - eps) log sigma(z) - eps log sigma(-z)
    simpo  z = beta * (c / n_c - r / n_r) - gamma        the same form, no reference, length-normalised
    orpo   o = (c/n_c - r/n_r) - (log(1 - exp(c/n_c)) - log(1 - exp(r/n_r)))
                                                         loss = -beta log sigma(o), plus the chosen NLL

Normalisation: a step's loss is the mean of its pairs' losses over every micro-batch and rank, plus for
ORPO the chosen answers' summed cross-entropy over their token count in the step (TRL's ORPO takes the
mean over the batch's chosen tokens). Both counts are known on the host before the step, so the loss
and its gradients do not depend on ``grad_accum``, on packing or on the number of processes.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trainer.conversations import as_record, load_conversations
from trainer.data import encode_file
from trainer.model import decoder_hidden_states
from trainer.packing import IGNORE_INDEX, PackedBatch, collate_packed, pack

OBJECTIVES = ("dpo", "simpo", "orpo")
STATS = ("reward_chosen", "reward_rejected", "correct", "pairs", "nll", "nll_tokens")

# ------------------------------------------------------------------------------------------- data


def demo_pairs(path) -> list[dict]:
    """Preference records from a conversation file (the demo's pairs): the prompt is each conversation up
    to its last answer, chosen that answer, rejected the same words in reverse order (a preference the
    model can learn consistently, where another conversation's answer would be chosen elsewhere)."""
    records = []
    for record in load_conversations(path):
        messages = as_record(record)["messages"]
        answer = messages[-1]["content"]
        words = answer.split()
        wrong = " ".join(reversed(words)) if len(set(words)) > 1 else f"{answer} {answer}"
        records.append({"prompt": messages[:-1], "chosen": messages[-1:],
                        "rejected": [{**messages[-1], "content": wrong}]})  # fmt: skip
    return records


def encode_pairs(path, tokenizer, *, template: str, max_length: int, overlong: str = "drop", records=None,
                 cache_dir=None, progress: bool = True):  # fmt: skip
    """(sequences, summary): the kept pairs' conversations (an ``EncodedDataset``), the chosen one of pair
    ``p`` at ``2p`` and the rejected one at ``2p + 1``, encoded in parallel and cached as SFT data is
    (:func:`trainer.data.encode_file`). A pair whose longer conversation exceeds ``max_length`` is
    dropped, or with ``overlong="truncate"`` loses its prompt's oldest turns until both fit (dropped if
    its last user turn alone does not). ``records``: the rows of ``path`` when already read.
    Raises ``DataError("<file>:<line>: <problem>")``."""
    return encode_file(path, tokenizer, template=template, max_length=max_length, overlong=overlong,
                       cache_dir=cache_dir, progress=progress, pairs=True, records=records)  # fmt: skip


class _Span:
    """What ``pack`` reads of an item: its length (here a pair's two conversations together)."""

    def __init__(self, n: int):
        self.input_ids = self.labels = range(n)


def pack_pairs(sequences, max_tokens: int) -> list[list[int]]:
    """Rows of pair indices, best-fit-decreasing on the pairs' lengths: a pair is never split."""
    lengths = getattr(sequences, "lengths", None)  # an EncodedDataset's, without building its items
    if lengths is None:
        lengths = [len(e.input_ids) for e in sequences]
    return pack([_Span(int(lengths[2 * p] + lengths[2 * p + 1])) for p in range(len(sequences) // 2)],
                max_tokens)  # fmt: skip


def pair_lengths(sequences, row: list[int]) -> list[int]:
    """The conversations' lengths of a row of pairs (what the FLOP count reads)."""
    return [len(sequences[s].input_ids) for p in row for s in (2 * p, 2 * p + 1)]


@dataclass
class PairBatch:
    """One packed row of whole pairs: conversations chosen_0, rejected_0, chosen_1, ..."""

    rows: PackedBatch
    loss_seq: torch.Tensor  # [M] int64: the conversation each loss row belongs to
    counts: torch.Tensor  # [P, 2] int64: scored tokens of each pair's chosen and rejected answer
    pair_ids: torch.Tensor  # [P] int64: the pairs' indices in their data set (cached reference)
    num_pairs: int
    num_chosen_tokens: int  # host: scored tokens of the chosen answers

    @property
    def num_tokens(self) -> int:
        return self.rows.num_tokens

    @property
    def num_loss_tokens(self) -> int:
        return self.rows.num_loss_tokens

    def to(self, device, non_blocking: bool = True) -> PairBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if hasattr(value, "to") else value
        return PairBatch(**moved)


def collate_pairs(sequences, row: list[int]) -> PairBatch:
    """One packed row of the pairs ``row`` (indices of pairs in ``sequences``)."""
    order = [s for p in row for s in (2 * p, 2 * p + 1)]
    counts = [sum(label != IGNORE_INDEX for label in sequences[s].labels[1:]) for s in order]
    return PairBatch(
        rows=collate_packed(sequences, order),
        loss_seq=torch.repeat_interleave(torch.arange(len(order)), torch.tensor(counts)),
        counts=torch.tensor(counts, dtype=torch.int64).view(-1, 2),
        pair_ids=torch.tensor(row, dtype=torch.int64),
        num_pairs=len(row),
        num_chosen_tokens=sum(counts[0::2]),
    )


# ------------------------------------------------------------------------------------------- losses


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler's switch at -log 2)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(kind: str, policy, counts, reference=None, *, beta: float, label_smoothing: float = 0.0,
                simpo_gamma: float = 0.0):  # fmt: skip
    """(loss, chosen reward, rejected reward) per pair from ``[P, 2]`` log-prob sums (chosen, rejected),
    scored-token ``counts`` and, for DPO, the reference's sums; in the dtype of ``policy``."""
    if kind == "dpo":
        rewards = beta * (policy - reference)
        z = rewards[:, 0] - rewards[:, 1]
    else:
        means = policy / counts.clamp(min=1).to(policy.dtype)
        rewards = beta * means
        if kind == "simpo":
            z = rewards[:, 0] - rewards[:, 1] - simpo_gamma
        elif kind == "orpo":
            log_odds = (means[:, 0] - means[:, 1]) - (log1mexp(means[:, 0]) - log1mexp(means[:, 1]))
            return -beta * F.logsigmoid(log_odds), rewards[:, 0], rewards[:, 1]
        else:
            raise ValueError(f"objective {kind!r} is not one of {', '.join(OBJECTIVES)}")
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, rewards[:, 0], rewards[:, 1]


def _adapter_off(model):
    """The reference policy: the same model with its LoRA adapter switched off."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


class PreferenceLoss:
    """One objective (``dpo``, ``simpo``, ``orpo``) on ``PairBatch`` rows with ``loss_fn`` (the masked
    cross-entropy the trainer uses, called with ``reduction="none"``). Keeps the reward statistics of
    training steps and of evaluation on the device; ``take`` sums them over the ranks."""

    def __init__(self, kind: str, loss_fn, device: torch.device, *, beta: float, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5):  # fmt: skip
        if kind not in OBJECTIVES:
            raise ValueError(f"objective {kind!r} is not one of {', '.join(OBJECTIVES)}")
        self.kind, self.loss_fn, self.device = kind, loss_fn, device
        self.beta, self.label_smoothing, self.simpo_gamma = beta, label_smoothing, simpo_gamma
        self.stats = {
            mode: torch.zeros(len(STATS), dtype=torch.float64, device=device) for mode in ("train", "val")
        }
        self.cache: dict[str, torch.Tensor] = {}  # data set -> [pairs, 2] reference sums (ref_logps: cached)

    @property
    def steps_reference(self) -> bool:
        """Whether a training step runs the reference forward pass (DPO without a cache)."""
        return self.kind == "dpo" and "train" not in self.cache

    # ---------------------------------------------------------------------------- log-probabilities

    def logps(self, model, batch: PairBatch, head) -> tuple[torch.Tensor, torch.Tensor]:
        """([P, 2] fp32 log-prob sums of the answers, [M] per-token NLL of every scored row)."""
        rows = batch.rows
        hidden = decoder_hidden_states(model, rows)[0].index_select(0, rows.loss_index)
        with head.weights() if hasattr(head, "weights") else nullcontext(head) as (weight, bias, softcap):
            nll = self.loss_fn(
                hidden, weight, rows.loss_targets, bias=bias, reduction="none", softcap=softcap
            )
        nll = nll.float()
        sums = torch.zeros(2 * batch.num_pairs, dtype=torch.float32, device=nll.device)
        return sums.index_add(0, batch.loss_seq, nll, alpha=-1.0).view(-1, 2), nll

    @torch.no_grad()
    def reference(self, model, batch: PairBatch, head, mode: str = "train") -> torch.Tensor | None:
        """[P, 2] reference sums (DPO only): cached, or computed now with the adapter off."""
        if self.kind != "dpo":
            return None
        if mode in self.cache:
            return self.cache[mode].index_select(0, batch.pair_ids)
        with _adapter_off(model):
            return self.logps(model, batch, head)[0]

    @torch.no_grad()
    def cache_reference(self, model, sequences, rows, head, strategy, autocast, mode: str) -> None:
        """``ref_logps: cached``: the reference sums of every pair of a data set, once (the base model
        never changes); each rank computes its share of the ``rows`` (lists of pair indices into
        ``sequences``), collated one at a time, and the sums are added up over the ranks."""
        if self.kind != "dpo":
            return
        table = torch.zeros(len(sequences) // 2, 2, dtype=torch.float32, device=self.device)
        share = strategy.share(rows)
        for row, weight in tqdm(share, desc=f"reference log-probs ({mode})", disable=strategy.world.rank != 0,
                                leave=False, dynamic_ncols=True):  # fmt: skip
            batch = collate_pairs(sequences, row).to(self.device)
            with autocast:
                table.index_add_(0, batch.pair_ids, self.reference(model, batch, head, mode) * weight)
        self.cache[mode] = strategy.sum(table)

    # --------------------------------------------------------------------------------------- the loss

    @staticmethod
    def totals(batches) -> tuple[int, int]:
        """(pairs, scored chosen tokens) of a step's rows on every rank: the loss's denominators."""
        return max(1, sum(b.num_pairs for b in batches)), max(1, sum(b.num_chosen_tokens for b in batches))

    def loss(self, model, batch: PairBatch, head, totals: tuple[int, int], mode: str = "train",
             weight: float = 1.0) -> torch.Tensor:  # fmt: skip
        """This row's share of the step's loss (see the module's docstring), counted in the statistics
        with ``weight`` (0: a pass that only keeps FSDP's collectives in step)."""
        pairs, chosen_tokens = totals
        reference = self.reference(model, batch, head, mode)
        policy, nll = self.logps(model, batch, head)
        losses, chosen, rejected = pair_losses(
            self.kind, policy, batch.counts, reference, beta=self.beta, label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma,
        )  # fmt: skip
        total = losses.sum() / pairs
        chosen_nll = nll.new_zeros(())
        if self.kind == "orpo":
            chosen_nll = (nll * (batch.loss_seq % 2 == 0)).sum()
            total = total + chosen_nll / chosen_tokens
        counted = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum(),
                               chosen.new_tensor(batch.num_pairs), chosen_nll,
                               chosen.new_tensor(batch.num_chosen_tokens)])  # fmt: skip
        self.stats[mode] += counted.detach().double() * weight
        return total

    def forward_backward(self, model, mine, group, head, device, autocast) -> torch.Tensor:
        """Gradients of this rank's rows ``mine`` (``(row, weight)`` of ``strategy.share(group)``) for the
        step over ``group``; returns this rank's part of the step's loss (0-dim, no sync)."""
        totals = self.totals(group)
        total = torch.zeros((), device=device)
        for batch, weight in mine:
            with autocast:
                loss = self.loss(model, batch.to(device), head, totals, weight=weight) * weight
            loss.backward()
            total += loss.detach().float()
        return total

    @torch.no_grad()
    def evaluate(self, model, batches, head, device, autocast, strategy) -> float:
        """The mean loss over the pairs of ``batches`` (as a step over all of them would give it)."""
        totals = self.totals(batches)
        model.eval()
        total = torch.zeros((), device=device, dtype=torch.float64)
        for batch, weight in strategy.share(batches):
            with autocast:
                total += self.loss(model, batch.to(device), head, totals, "val", weight).double() * weight
        model.train()
        return strategy.sum(total).item()

    def take(self, strategy, mode: str = "train") -> dict:
        """Mean rewards, margin and accuracy (TRL's names) since the last take; every rank calls it."""
        values = dict(zip(STATS, strategy.sum(self.stats[mode]).tolist(), strict=True))
        self.stats[mode].zero_()
        pairs = max(1.0, values["pairs"])
        prefix = "val_" if mode == "val" else ""
        record = {
            f"{prefix}rewards/chosen": values["reward_chosen"] / pairs,
            f"{prefix}rewards/rejected": values["reward_rejected"] / pairs,
            f"{prefix}rewards/margins": (values["reward_chosen"] - values["reward_rejected"]) / pairs,
            f"{prefix}rewards/accuracies": values["correct"] / pairs,
        }
        if self.kind == "orpo":
            record[f"{prefix}nll_loss"] = values["nll"] / max(1.0, values["nll_tokens"])
        return record
