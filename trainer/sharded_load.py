"""Loading a model for FSDP (``parallel: fsdp`` on several ranks) without any rank holding it whole on its
device: a 70B model in bf16 (141 GB) must start on 80 GB cards.

Rank 0 reads the checkpoint into host memory, once, and sets it up as one process would (probe, checks,
attention plan, LoRA). Every rank, rank 0 included, builds the same model on the meta device (no memory)
and plans it from what rank 0's probe saw, so all ranks plan alike. FSDP then shards the skeleton layer by
layer (``FullySharded.wrap``), and :func:`fill_shards` gives each rank storage for its shards only and
fills them from rank 0's host copy, one tensor broadcast at a time (``set_model_state_dict(...,
broadcast_from_rank0=True)``), as torchtitan and torchtune do. Per rank: its shards and one tensor in
flight; host: one copy, on rank 0, dropped once the shards are filled.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from trainer.distributed import World
from trainer.model import (
    HeadSpec,
    prepare_model,
    probe_record,
    resolve_device,
    resolve_dtype,
    set_probe_record,
)


@dataclasses.dataclass
class HostCopy:
    """Rank 0's whole model in host memory, until :func:`fill_shards` has sent it (None elsewhere)."""

    state: dict[str, torch.Tensor] | None
    buffers: dict[str, torch.Tensor] | None


def load_skeleton(cfg, world: World, tokenizer, say) -> tuple[torch.nn.Module, object, HeadSpec, HostCopy]:
    """(skeleton on the meta device, tokenizer, head spec, rank 0's host copy). A failure of rank 0's
    load (a missing file, an unsupported head) ends every rank with rank 0's one line."""
    target = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, target)
    host_cfg = dataclasses.replace(cfg, device="cpu", dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    full = facts = None
    with world.all_or_none():
        if world.is_main:
            full, tokenizer, _ = prepare_model(host_cfg, tokenizer=tokenizer, plan_device=target, log=_quiet)
            facts = (full.get_base_model().config, full.get_base_model().name_or_path, probe_record(full))
    config, name, record = world.from_main(facts)
    with world.all_or_none(), torch.random.fork_rng(devices=[]):  # its LoRA init is overwritten by rank 0's
        skeleton = _meta_model(config, dtype, cfg.trust_remote_code)
        skeleton.name_or_path = name
        set_probe_record(skeleton, record)
        skeleton_cfg = dataclasses.replace(host_cfg, device="meta")
        skeleton, _, head = prepare_model(
            skeleton_cfg, model=skeleton, tokenizer=tokenizer, plan_device=target, log=say
        )
    torch.set_rng_state(world.from_main(torch.get_rng_state()))  # as after rank 0's LoRA init, everywhere
    host = HostCopy(None, None)
    if full is not None:
        host = HostCopy(dict(full.state_dict()), {n: b for n, b in full.named_buffers()})
    return skeleton, tokenizer, head, host


def _meta_model(config, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config._attn_implementation = None  # rank 0's says packed attention, not registered here yet
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def _quiet(line: str) -> None:
    """Rank 0's host copy plans like the skeleton; the skeleton's plan is the one printed."""


def fill_shards(model: torch.nn.Module, host: HostCopy, world: World, device: torch.device, *,
                offload: bool = False) -> None:  # fmt: skip
    """After ``fully_shard``: storage for this rank's shards (on the host under CPU offload), filled with
    rank 0's weights, and every buffer (rotary frequencies, which no state dict holds) from rank 0."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device="cpu" if offload else device)
    if offload:  # parameters stay on the host; buffers are used where the computation runs
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, host.state if world.is_main else {}, options=options)
    for name, buf in model.named_buffers():
        if world.is_main:
            buf.copy_(host.buffers[name])
        dist.broadcast(buf, src=0)
    host.state = host.buffers = None
