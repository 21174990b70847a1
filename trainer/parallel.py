"""How a training step's work is split across processes: one small object per strategy, one interface.

- ``Single``: one process, the whole model.
- ``DataParallel`` (``parallel: ddp``): a full copy per process; every rank trains on its share of the
  step's rows, then one all-reduce (SUM) of a flat buffer of the LoRA gradients, the loss and the
  Ctrl-C flag (trainer/distributed.py explains why no DDP wrapper).
- ``FullySharded`` (``parallel: fsdp``): FSDP2's ``fully_shard`` per decoder layer, on the embeddings,
  the head and the decoder; the frozen base is sharded in its dtype, LoRA weights and their optimizer
  state stay fp32, gradients are reduce-scattered in fp32 as sums (not averages). Every rank runs the
  same number of forward passes (FSDP gathers each layer collectively), so a rank short of rows runs a
  row with weight 0. Checkpoints are sharded: each rank writes its part through
  ``torch.distributed.checkpoint``.

Loss normalisation is the same for all three (DESIGN.md): each rank divides its loss sums by the
target tokens of the whole step, and the ranks' gradients are summed.

Interface, called by trainer/train.py: ``wrap(model)``, ``share(group)``, ``unsharded(module)``,
``reduce(params, loss, interrupt)``, ``grad_norm(params, max_norm)``, ``sum(value)``,
``save_state(model, optimizer, directory)``, ``load_state(model, optimizer, directory)`` and
``adapter_state(model)``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.distributed import ONE_PROCESS, World
from trainer.packing import PackedBatch

TRAINER_STATE = "trainer_state.pt"  # optimizer state (single and ddp checkpoints)
SHARDED_STATE = "sharded"  # torch.distributed.checkpoint directory (fsdp checkpoints)


def load_cpu(path: Path):
    """torch.load onto the CPU: without map_location every rank would load rank 0's tensors onto the GPU
    they were saved from (optimizer.load_state_dict moves the state to each parameter's device)."""
    return torch.load(path, map_location="cpu", weights_only=False)


class Single:
    """One process: nothing to reduce, the model as it is."""

    name = "single"

    def __init__(self, world: World = ONE_PROCESS):
        self.world = world

    def wrap(self, model):
        return model

    def share(self, group: list[PackedBatch]) -> list[tuple[PackedBatch, float]]:
        """This rank's rows of a step's ``group`` as (row, weight of its loss)."""
        return [(b, 1.0) for b in group[self.world.rank :: self.world.size]]

    def unsharded(self, module: torch.nn.Module):
        """A context in which ``module``'s parameters are whole (FSDP gathers them)."""
        return nullcontext()

    def reduce(self, params: list[torch.Tensor], loss: torch.Tensor, interrupt: bool):
        """(the step's loss, whether any rank asked to stop) once every rank holds the summed gradients."""
        return loss, interrupt

    def grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the gradients to ``max_norm`` (inf: no clipping); return their norm before clipping (a
        0-dim tensor on the device, no sync)."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.world.sum(value)

    # -------------------------------------------------------------------------------- checkpoints

    def save_state(self, model, optimizer, directory: Path) -> None:
        """Write the adapter and the optimizer state into ``directory`` (every rank calls this)."""
        if self.world.is_main:
            model.save_pretrained(directory, save_embedding_layers=False)
            torch.save({"optimizer": optimizer.state_dict()}, directory / TRAINER_STATE)

    def load_state(self, model, optimizer, directory: Path) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
        optimizer.load_state_dict(load_cpu(directory / TRAINER_STATE)["optimizer"])

    def adapter_state(self, model) -> dict | None:
        """The adapter's whole state dict on rank 0 (None: the model's own), for ``save_pretrained``."""
        return None


class DataParallel(Single):
    """A full copy per process; gradients summed by one all-reduce per step."""

    name = "ddp"

    def reduce(self, params, loss, interrupt):
        return self.world.all_reduce_step(params, loss, interrupt)


class FullySharded(Single):
    """FSDP2: parameters, gradients and optimizer state sharded across the ranks."""

    name = "fsdp"

    def __init__(
        self, world: World, *, compute_dtype: torch.dtype = torch.float32, cpu_offload: bool = False,
        device: torch.device | None = None,
    ):  # fmt: skip
        super().__init__(world)
        self.compute_dtype = compute_dtype
        self.cpu_offload = cpu_offload
        self.device = device  # where the model computes (None: where wrap finds its head)

    def wrap(self, model):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        # bf16 compute gathers every parameter in bf16 (LoRA's fp32 master copy stays sharded);
        # gradients come back and are summed in fp32
        param_dtype = None if self.compute_dtype == torch.float32 else self.compute_dtype
        # pinned host memory needs CUDA; without it the offload still runs (tests on CPU)
        offload = (
            CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cpu_offload else OffloadPolicy()
        )
        policy = dict(
            mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
            offload_policy=offload,
        )
        base = model.get_base_model()
        decoder = base.get_decoder()
        embed, head = base.get_input_embeddings(), base.get_output_embeddings()
        if self.device is None:  # before sharding: with CPU offload the shards go to the CPU
            self.device = head.weight.device
        for layer in decoder.layers:
            fully_shard(layer, **policy)
        if head.weight is embed.weight:  # tied: one group holds the shared weight for both
            fully_shard([embed, head], **policy)
        else:
            fully_shard(embed, **policy)
            fully_shard(head, **policy)
        fully_shard(decoder, **policy)  # the root of the forward pass: the final norm and what is left
        for module in model.modules():
            if hasattr(module, "set_gradient_divide_factor"):
                # the loss is already divided by the step's global token count: sum, never average
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        return model

    def share(self, group):
        mine = super().share(group)
        # FSDP gathers each layer collectively: every rank runs ceil(len/size) forward passes
        passes = math.ceil(len(group) / self.world.size)
        return mine + [(group[0], 0.0)] * (passes - len(mine))

    @contextmanager
    def unsharded(self, module):
        owner = module if hasattr(module, "unshard") else None
        if owner is None:
            yield
            return
        owner.unshard()
        try:
            yield
        finally:
            owner.reshard()

    def reduce(self, params, loss, interrupt):
        # the gradients were reduce-scattered by FSDP during backward; the loss and the flag remain
        flat = torch.stack([loss.detach().float(), torch.tensor(float(interrupt), device=loss.device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return flat[0], bool(flat[1].item() > 0)

    def grad_norm(self, params, max_norm):
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # with CPU offload a CPU tensor: the process group's gloo reduces it
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        # on the device of the step's loss (the loop stacks the two), also when the gradients are offloaded
        return norm if self.device is None else norm.to(self.device)

    def save_state(self, model, optimizer, directory):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        options = _state_options(full=False)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory / SHARDED_STATE)

    def load_state(self, model, optimizer, directory):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer, options=_state_options(full=False))
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=directory / SHARDED_STATE)
        # not strict: the frozen base is not in the checkpoint; every trainable weight must be
        options = _state_options(full=False, strict=False)
        missing, _ = set_state_dict(model, optimizer, model_state_dict=state["model"],
                                    optim_state_dict=state["optim"], options=options)  # fmt: skip
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if lost := trainable & set(missing):
            raise ValueError(f"{directory}: no saved value for {sorted(lost)[0]} ({len(lost)} weights)")

    def adapter_state(self, model):
        """The LoRA weights gathered whole onto rank 0's CPU (a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_state_options(full=True))
        return state if self.world.is_main else None


def _state_options(full: bool, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen base weights are never saved: they come from the model directory
    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=True, strict=strict)


def make_strategy(
    parallel: str, world: World, *, compute_dtype=torch.float32, cpu_offload=False, device=None
) -> Single:
    """The strategy ``parallel`` (``ddp`` or ``fsdp``) names for ``world``; one process is ``Single``
    whatever it says."""
    if world.size == 1:
        return Single(world)
    if parallel == "fsdp":
        return FullySharded(world, compute_dtype=compute_dtype, cpu_offload=cpu_offload, device=device)
    return DataParallel(world)
