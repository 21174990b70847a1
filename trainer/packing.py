"""Packing encoded conversations into token-budget rows, and the padded baseline collator.

A packed row holds whole conversations back to back, ``max_tokens`` at most, with no pad token:
``position_ids`` restart at 0 per conversation and ``cu_seqlens`` tells varlen attention where each
one starts. Labels follow the Hugging Face convention (unshifted: the hidden state at t predicts
``labels[t+1]``); the first label of every conversation is forced to -100 so that no target crosses a
conversation boundary. The collator also hands over the positions that carry a target
(``loss_index``) so that the loss compacts its rows without a host sync.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100


def _length(item) -> int:
    return len(item.input_ids)


def _check_items(encoded: Sequence, max_tokens: int | None = None) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    for i, item in enumerate(encoded):
        n = _length(item)
        if len(item.labels) != n:
            raise ValueError(
                f"conversation {i} has {n} input_ids but {len(item.labels)} labels; they must match"
            )
        if n == 0:
            raise ValueError(f"conversation {i} is empty; drop empty conversations before packing")
        if max_tokens is not None and n > max_tokens:
            raise ValueError(
                f"conversation {i} has {n} tokens, more than max_tokens={max_tokens}; "
                "raise max_tokens or drop/truncate that conversation"
            )


# --------------------------------------------------------------------------------------------- packing


def pack(encoded: Sequence, max_tokens: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of conversations into rows of at most ``max_tokens`` tokens.

    Longest first, each conversation goes into the open row with the least room that still fits it
    (a new row when none does). Deterministic: ties are broken by index. Returns the rows as lists of
    indices into ``encoded``, in the order the rows were opened.
    """
    _check_items(encoded, max_tokens)
    order = sorted(range(len(encoded)), key=lambda i: (-_length(encoded[i]), i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free slots, bin id), sorted, for the best-fit search
    for i in order:
        n = _length(encoded[i])
        j = bisect.bisect_left(room, (n, -1))
        if j == len(room):
            bins.append([i])
            bisect.insort(room, (max_tokens - n, len(bins) - 1))
        else:
            free, b = room.pop(j)
            bins[b].append(i)
            bisect.insort(room, (free - n, b))
    return bins


def packing_efficiency(encoded: Sequence, bins: Sequence[Sequence[int]], max_tokens: int) -> float:
    """Real tokens / token slots (``len(bins) * max_tokens``): 1.0 means no row has room left."""
    if not bins:
        return 0.0
    real = sum(_length(encoded[i]) for b in bins for i in b)
    return real / (len(bins) * max_tokens)


# ------------------------------------------------------------------------------------------ packed batch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64, restarting at 0 per conversation
    labels: torch.Tensor  # [1, T] int64, unshifted; first label of every conversation is -100
    cu_seqlens: torch.Tensor  # [n+1] int32, conversation boundaries from 0 to T
    max_seqlen: int  # longest conversation in the row
    loss_index: torch.Tensor  # [M] int64: positions t whose target labels[t+1] != -100
    loss_targets: torch.Tensor  # [M] int64: labels[t+1] at those positions
    num_tokens: int  # real tokens T
    num_loss_tokens: int  # M

    def to(self, device, non_blocking: bool = True) -> PackedBatch:
        """A copy with every tensor on ``device``; the ints stay on the host (no sync to read them)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return PackedBatch(**moved)


def _loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions t, targets labels[t+1]) of a 1-D unshifted label row."""
    targets = labels[1:]
    index = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return index, targets[index]


def collate_packed(encoded: Sequence, row: Sequence[int]) -> PackedBatch:
    """One packed row from the conversations ``encoded[i] for i in row``, in that order."""
    ids, labels, positions, lengths = [], [], [], []
    for i in row:
        item = encoded[i]
        n = _length(item)
        ids.extend(item.input_ids)
        labels.append(IGNORE_INDEX)  # the previous conversation's last token must not predict this one
        labels.extend(item.labels[1:])
        positions.extend(range(n))
        lengths.append(n)
    label_row = torch.tensor(labels, dtype=torch.int64)
    loss_index, loss_targets = _loss_positions(label_row)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64).unsqueeze(0),
        position_ids=torch.tensor(positions, dtype=torch.int64).unsqueeze(0),
        labels=label_row.unsqueeze(0),
        cu_seqlens=cu,
        max_seqlen=max(lengths),
        loss_index=loss_index,
        loss_targets=loss_targets,
        num_tokens=len(ids),
        num_loss_tokens=int(loss_index.numel()),
    )


def epoch_rows(bins: Sequence[Sequence[int]], *, seed: int = 0, epoch: int = 0) -> list[list[int]]:
    """The packed rows in the order epoch ``epoch`` visits them: a deterministic shuffle per (seed, epoch).
    The bins themselves do not change between epochs, so callers pack once and collate row by row."""
    rows = [list(row) for row in bins]
    random.Random(f"tritrain-pack:{seed}:{epoch}").shuffle(rows)
    return rows


def make_packed_batches(
    encoded: Sequence, max_tokens: int, *, seed: int = 0, epoch: int = 0
) -> list[PackedBatch]:
    """Pack ``encoded`` (best-fit-decreasing) and collate every row; rows are shuffled deterministically
    per ``(seed, epoch)``, so each epoch sees the same rows in a different order."""
    rows = epoch_rows(pack(encoded, max_tokens), seed=seed, epoch=epoch)
    return [collate_packed(encoded, row) for row in rows]


# ------------------------------------------------------------------------------------------ padded batch


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # [B, L] int64, pad_id after each conversation, L = longest
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens
    labels: torch.Tensor  # [B, L] int64, unshifted, -100 at pads and at each first position
    num_tokens: int  # real tokens
    num_loss_tokens: int  # positions t with labels[t+1] != -100

    def to(self, device, non_blocking: bool = True) -> PaddedBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return PaddedBatch(**moved)


def pad_collate(encoded: Sequence, pad_id: int) -> PaddedBatch:
    """Right-pad conversations to the longest one: the baseline that packing is measured against."""
    _check_items(encoded)
    if len(encoded) == 0:
        raise ValueError("pad_collate got no conversations")
    width = max(_length(item) for item in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.int64)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.int64)
    for b, item in enumerate(encoded):
        n = _length(item)
        input_ids[b, :n] = torch.tensor(item.input_ids, dtype=torch.int64)
        attention_mask[b, :n] = 1
        labels[b, 1:n] = torch.tensor(item.labels[1:], dtype=torch.int64)
    return PaddedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        num_tokens=int(attention_mask.sum()),
        num_loss_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
    )
