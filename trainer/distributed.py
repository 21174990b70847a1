"""Data parallel over the processes that ``torchrun --nproc_per_node N -m trainer`` starts.

No DDP wrapper: every rank accumulates the LoRA gradients of its share of a step's rows, then one
all-reduce (SUM) of a flat buffer holding those gradients, the step's loss and the Ctrl-C flag makes every
rank hold the same numbers. The loss is already divided by the step's token count over all ranks (every
rank knows all rows of the step), so the sum is the step's gradient (DESIGN.md, loss normalization). A
plain all-reduce after the accumulation loop also keeps clear of DDP's hooks under gradient checkpointing
and PEFT, and of its averaging (which would divide by the number of ranks once more).
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process, 0 .. size-1
    size: int = 1  # number of processes
    local_rank: int = 0  # this process on its machine: the GPU it uses

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, logs and saves."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def all_reduce_step(
        self, params: list[torch.Tensor], loss: torch.Tensor, interrupt: bool
    ) -> tuple[torch.Tensor, bool]:
        """Sum the gradients of ``params`` (in place), the 0-dim ``loss`` and the Ctrl-C flags of all ranks;
        return (summed loss, whether any rank was interrupted). A parameter without a gradient (a rank with
        no row in this step) counts as zeros. One collective; a no-op with one process."""
        if self.size == 1:
            return loss, interrupt
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flag = torch.full((1,), float(interrupt), device=loss.device)
        flat = torch.cat([loss.detach().float().view(1), flag] + [p.grad.reshape(-1).float() for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 2
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
        return flat[0], bool(flat[1].item() > 0)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor summed over all ranks (a copy)."""
        value = value.clone()
        if self.size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (anything picklable), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    # ----------------------------------------------------------------------------------- agreement

    def all_true(self, flag: torch.Tensor) -> bool:
        """Whether ``flag`` (a 0-dim bool tensor) is true on every rank: one all-reduce (MIN). Ranks that run
        every forward pass together (FSDP) leave a loop by this, never by a flag of their own."""
        if self.size == 1:
            return bool(flag)
        value = flag.to(torch.int32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def from_main(self, obj):
        """Rank 0's ``obj`` (anything picklable) on every rank: a decision every rank must take alike."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def all_or_none(self):
        """Around a rank-local step that comes before a collective (reading this rank's files, rank 0's
        writes): the ranks meet at the end of the block, and when the step raised on any rank, every rank
        raises: the failing rank its own exception, the others the first failing rank's (the same class
        and one-line message, so the CLI ends every process the same way). Without it the other ranks
        would wait in the next collective until NCCL's timeout. The block may hold collectives only where
        every rank reaches them. One all-gather; nothing with one process."""
        if self.size == 1:
            yield
            return
        try:
            yield
        except Exception as error:
            self._agree(error)
            raise
        self._agree(None)

    def _agree(self, error: Exception | None) -> None:
        failures = [e for e in self.gather_objects(_portable(error)) if e is not None]
        if failures and error is None:
            raise failures[0]


def _portable(error: Exception | None) -> Exception | None:
    """``error`` as it can travel to the other ranks: itself when it pickles, else a RuntimeError with its
    one-line message."""
    if error is None:
        return None
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {' '.join(str(error).split())}")


ONE_PROCESS = World()


def init_world(device_name: str) -> World:
    """The world torchrun describes in WORLD_SIZE, RANK and LOCAL_RANK (one process without them). With
    several processes, join the process group: nccl and gloo on CUDA (this process takes GPU LOCAL_RANK;
    see :func:`process_group_backend`), gloo on CPU. Call :func:`close_world` at the end, also on errors."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return ONE_PROCESS
    world = World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ["LOCAL_RANK"]))
    if device_name not in ("auto", "cuda", "cpu"):
        raise ValueError(
            f"device {device_name!r} with {size} processes: use auto, cuda or cpu; "
            "each process takes the GPU of its LOCAL_RANK"
        )
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(world.local_rank)  # "cuda" below then means this process's GPU
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(use_cuda))
    return world


def process_group_backend(use_cuda: bool) -> str:
    """The backend of the process group: on CUDA nccl for GPU tensors and gloo for CPU ones (FSDP's CPU
    offload keeps the gradients on the CPU, and the gradient norm's all-reduce runs there; torchtitan and
    torchtune do the same); gloo alone on CPU."""
    return "cuda:nccl,cpu:gloo" if use_cuda else "gloo"


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
