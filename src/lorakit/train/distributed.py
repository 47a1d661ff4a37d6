"""torch.distributed for training: set up from torchrun's environment, DDP over the trainable parameters."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); a no-op in one process."""
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(minutes=30))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def wrap(model: nn.Module) -> nn.Module:
    """DDP when distributed: it broadcasts rank 0's weights (so every rank starts from the same LoRA
    initialization) and all-reduces only parameters that require gradients, i.e. the adapter."""
    if not dist.is_initialized():
        return model
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    # 4-bit weights are buffers: they never change, so broadcasting them every step would be waste
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
