"""The process's place in a torchrun job, and the collectives the training uses.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE; without them the process is
rank 0 of 1 and every collective is a no-op.  NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import gc
import os

import torch


class Dist:
    """The process's place in a torchrun job (a single process is rank 0 of 1)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.enabled = self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if not self.enabled or torch.distributed.is_initialized():
            return
        if device.type == "cuda":
            # Needed for capturing DDP's all-reduce in a CUDA graph (PyTorch's CUDA-graph notes).
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            # DDP's reducer holds gloo work objects; freeing them during interpreter shutdown,
            # after the process group is gone, can abort the process (SIGABRT).  Free them now.
            gc.collect()
            torch.distributed.destroy_process_group()


def resolve_device(cfg, dist: Dist) -> torch.device:
    """This process's device: CPU, or its local rank's GPU."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not cuda:
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank % max(torch.cuda.device_count(), 1))
