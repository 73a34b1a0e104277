"""Data parallelism on PyTorch's own engines: DDP, or FSDP2 (``fully_shard``) for large models.

``torchrun --nproc_per_node N -m lmlab pretrain ...`` sets ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK``; :func:`setup` joins the process group (NCCL on GPUs, gloo on CPUs).  Every rank
builds its own slice of each global batch (see :mod:`lmlab.train.data`); only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmlab.models.families import family_of


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return Dist(rank, world, local, dev, owns)


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device, or a one-line error when this machine cannot train on it."""
    from lmlab.errors import LmlabError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LmlabError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise LmlabError(f"--device {device}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LmlabError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise LmlabError(f"--device {device}: lmlab pretrain trains on cpu or cuda devices")
    return dev


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, FSDP2's sharding units, as the model's family lists them."""
    return family_of(model).blocks(model)


def shard_(model: torch.nn.Module, d: Dist) -> None:
    """FSDP2: shard each transformer block, then the rest, in place (no-op on one process)."""
    if d.world == 1 and not dist.is_initialized():
        return
    from torch.distributed.fsdp import fully_shard

    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)


def wrap_ddp(module: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP around ``module`` on several ranks; ``module`` itself on one."""
    if d.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def no_sync(model: torch.nn.Module, fsdp: bool, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last.

    ``model``: the FSDP-sharded model, or the DDP wrapper."""
    if sync:
        return contextlib.nullcontext()
    if fsdp and hasattr(model, "set_requires_gradient_sync"):

        @contextlib.contextmanager
        def ctx():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return ctx()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool):
    """Full (unsharded) model and optimizer state dicts on CPU; a collective under FSDP."""
    if not fsdp or not dist.is_initialized():
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state(model, optimizer, model_state, optim_state, fsdp: bool) -> None:
    if not fsdp or not dist.is_initialized():
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
