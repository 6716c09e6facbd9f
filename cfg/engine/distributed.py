"""One process per device (torchrun), for the train, sample and evaluate stages.

A stage calls `launch(n)` first: with n > 1 and no torchrun around it, it re-runs itself under
`python -m torch.distributed.run --standalone --nproc-per-node n` (one host); under a torchrun that the user
started (several hosts, a rendezvous) it runs as the rank it was given. `init` then joins the process group
(NCCL on CUDA, gloo on CPU) and picks this rank's device. Rank 0 alone writes outputs and logs to MLflow.

Samples depend only on (seed, example index, w, settings) (`cfg.maths.noise`), so a cell's examples are
split by `shard` and put back in order by `gather_rows`: any number of processes gives the same bytes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from cfg.engine.device import resolve_device


@dataclass(frozen=True)
class Dist:
    """This process's place: rank among world processes, local_rank on its host."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes outputs and logs."""
        return self.rank == 0


def n_processes(devices: int | str, device: str = "auto", key: str = "train.devices") -> int:
    """Processes for params.yaml's `train.devices` or `sample.devices` (`key`; "all" or N) on `train.device`:
    every visible GPU for "all" on CUDA, one process for "all" on CPU; N is checked against the GPUs present."""
    kind = resolve_device(device).type
    if devices == "all":
        return torch.cuda.device_count() if kind == "cuda" else 1
    n = int(devices)
    if kind == "cuda" and n > torch.cuda.device_count():
        raise ValueError(f"{key} = {n} but this host has {torch.cuda.device_count()} GPUs")
    return n


def launch(n: int) -> None:
    """Re-run this script under torchrun with n local processes, unless n is 1 or this already is a rank."""
    if n <= 1 or "LOCAL_RANK" in os.environ:
        return
    # torchrun gives every process one CPU thread unless told otherwise, which starves the CPU parts of a stage
    # (data preparation, metric arithmetic): share the host's cores instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // n)))
    sys.stdout.flush()
    args = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        sys.argv[0],
        *sys.argv[1:],
    ]
    os.execv(sys.executable, [sys.executable, *args])


def init(device: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group torchrun described (no-op for one process); returns (Dist, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    kind = resolve_device(device).type
    if kind == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, world, local), dev


def finish(d: Dist) -> None:
    """Leave the process group (after the last collective)."""
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(n: int, d: Dist, block: int = 1) -> Tensor:
    """This rank's indices of 0 … n − 1: the blocks [k·block, (k+1)·block) with k = rank, rank + world, ….

    With `block` the batch size of the work, each batch a process runs is the very batch (same rows, same
    shape) one process would run, so kernels that round differently per shape give the same numbers."""
    starts = range(d.rank * block, n, d.world * block)
    return torch.cat([torch.arange(a, min(a + block, n)) for a in starts]) if starts else torch.arange(0)


def gather_rows(t: Tensor, d: Dist, n: int, dim: int = 0, block: int = 1) -> Tensor:
    """Undo `shard(n, d, block)` along `dim`: every rank's rows back in the order 0 … n − 1, on every rank
    (on the CPU). One process returns `t` as it is."""
    if d.world == 1:
        return t
    moved = t.movedim(dim, 0).contiguous()
    index = [shard(n, Dist(r, d.world), block) for r in range(d.world)]
    size = max(len(i) for i in index)  # rows of the largest shard; smaller ones are padded for all_gather
    padded = moved.new_zeros((size, *moved.shape[1:]))
    padded[: len(moved)] = moved
    if dist.get_backend() == "nccl":
        padded = padded.cuda()
    parts = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded)
    out = moved.new_empty((n, *moved.shape[1:]))
    for rows, part in zip(index, parts, strict=True):
        out[rows] = part[: len(rows)].cpu()
    return out.movedim(0, dim)


def all_mean(x: Tensor, d: Dist) -> Tensor:
    """The mean of a tensor over the ranks (the rank's own value for one process)."""
    if d.world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / d.world
