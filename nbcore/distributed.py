"""Distributed data parallel set-up: ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; one process
without them. nccl on CUDA, gloo on CPU."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .utils import resolve_device

__all__ = ["init_distributed", "gather_objects"]


def init_distributed(device: str = "auto") -> tuple[int, int, int, torch.device, bool]:
    """``(world size, rank, local rank, device, owns the process group)``: the device is
    ``device`` resolved (``nbcore.utils.resolve_device``), the local rank's GPU under DDP on CUDA;
    a process group is opened when there are several ranks and none is open yet."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    own = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        own = True
    return world, rank, local_rank, dev, own


def gather_objects(obj, world: int) -> list:
    """``obj`` of every rank, in rank order (``all_gather_object``; collective); ``[obj]`` alone."""
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered
