"""One process per device (torchrun), for the train, sample and evaluate stages.

A stage calls `launch(n)` first: with n > 1 and no torchrun around it, it re-runs itself under
`python -m torch.distributed.run --standalone --nproc-per-node n` (one host); under a torchrun that the user
started (several hosts, a rendezvous) it runs as the rank it was given. `init` then joins the process group
(NCCL on CUDA, gloo on CPU) and picks this rank's device. Rank 0 alone writes outputs and logs to MLflow.

Samples depend only on (seed, example index, w, settings) (`cfg.maths.noise`), so a cell's examples can be
split in any way that keeps its batches whole and put back in order by `gather_rows`: any number of processes
gives the same bytes. `shard` splits them up front, block k to rank k mod world (feature extraction, whose ranks
run alike); `Claims` hands each block to whichever rank asks first (sampling, whose ranks may share their GPUs
with other work).
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Iterator
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


def owns_short_block(n: int, block: int, d: Dist) -> bool:
    """Whether rank d holds the shorter last block of rows 0 … n − 1 (if there is one): `shard`'s rank for it,
    block ⌊n / block⌋ mod world, under `shard` and `Claims` alike."""
    return n % block > 0 and n // block % d.world == d.rank


class Claims:
    """The whole blocks of rows 0 … n − 1 of a cell, each taken by the rank that asks for it first: a counter in the
    process group's store (torchrun's TCPStore) numbers the blocks, so a rank whose GPU is faster or less busy (one
    that trains no model beside its sampling under `cfg-lab repro --parallel`) takes more of them and the ranks end
    together, where `shard`'s fixed split leaves the fast ones idle until the slowest is done.

    The blocks are `shard`'s (block k = rows [k·block, (k+1)·block)), so each batch is the very batch one process
    runs and the bytes do not depend on which rank ran it. The cell's shorter last block, when it has one, is not
    claimed: its `shard` rank takes it after its full blocks, the shapes `cfg.engine.warmup.rank_batches` compiles
    ahead for that rank. One process takes every block in order. Iterate once (all ranks, in the same order of
    Claims, since each Claims' counter is named by its place in that order); `rows()` are the rows this rank took,
    in its order, for `gather_rows`."""

    _made = itertools.count()  # the n-th Claims of every rank share the n-th counter

    def __init__(self, n: int, d: Dist, block: int):
        self.n, self.d, self.block = n, d, block
        self.full = n // block  # the blocks claimed; a shorter last one goes to its shard rank
        self.key = f"cfg-lab/claims/{next(Claims._made)}"
        self.taken: list[Tensor] = []
        self.handed = 0  # blocks handed out over all ranks, as this rank last saw the counter
        self.short_taken = False

    def _owns_short(self) -> bool:
        return owns_short_block(self.n, self.block, self.d)

    def __iter__(self) -> Iterator[Tensor]:
        store = dist.distributed_c10d._get_default_store() if self.d.world > 1 else None
        while True:
            k = store.add(self.key, 1) - 1 if store is not None else len(self.taken)
            self.handed = k + 1
            if k >= self.full:
                break
            self.taken.append(torch.arange(k * self.block, (k + 1) * self.block))
            yield self.taken[-1]
        if self._owns_short():
            self.taken.append(torch.arange(self.full * self.block, self.n))
            self.short_taken = True
            yield self.taken[-1]

    def rows(self) -> Tensor:
        return torch.cat(self.taken) if self.taken else torch.arange(0)

    def expected(self) -> int:
        """Rows this rank will have taken: its own so far, an even share of the blocks not yet handed out, and the
        short last block if it is this rank's. Exact once the counter has run out."""
        done = sum(len(t) for t in self.taken)
        left = math.ceil(max(0, self.full - self.handed) / self.d.world) * self.block
        short = self.n - self.full * self.block if self._owns_short() and not self.short_taken else 0
        return done + left + short


def gather_rows(
    t: Tensor, d: Dist, n: int, dim: int = 0, block: int = 1, rows: Tensor | None = None
) -> Tensor:
    """Every rank's rows of 0 … n − 1 along `dim` put back in that order, on every rank (on the CPU): this rank
    holds `rows` (in t's order; by default `shard(n, d, block)`, as `Claims.rows()` after claiming). One process
    returns `t` as it is. Rows that are not every one of 0 … n − 1 exactly once are an error."""
    if d.world == 1:
        return t
    mine = shard(n, d, block) if rows is None else rows.to(torch.int64).cpu()
    moved = t.movedim(dim, 0).contiguous()
    cuda = dist.get_backend() == "nccl"

    def all_gather(x: Tensor) -> Tensor:  # every rank's x (of one shape on all), stacked, on the CPU
        return all_stack(x.cuda() if cuda else x, d).cpu()

    # every rank's row count and whether it holds that many rows: a mismatch on one rank stops all of them here,
    # rather than leaving the others waiting in the next all_gather
    sizes = [(int(a), int(b)) for a, b in all_gather(torch.tensor([len(mine), len(moved)]))]
    if wrong := [(r, a, b) for r, (a, b) in enumerate(sizes) if a != b]:
        raise ValueError(f"gather_rows: row numbers vs rows per rank (rank, numbers, rows): {wrong}")
    counts = [a for a, _ in sizes]
    size = max(counts)  # rows of the largest part; smaller ones are padded for all_gather
    padded = moved.new_zeros((size, *moved.shape[1:]))
    padded[: len(moved)] = moved
    index = mine.new_zeros(size)
    index[: len(mine)] = mine
    out = moved.new_empty((n, *moved.shape[1:]))
    seen = torch.zeros(n, dtype=torch.int64)
    for c, idx, part in zip(counts, all_gather(index), all_gather(padded), strict=True):
        out[idx[:c]] = part[:c]
        seen.index_add_(0, idx[:c], torch.ones(c, dtype=torch.int64))
    if not bool((seen == 1).all()):
        raise RuntimeError(f"the ranks' rows do not cover 0 … {n - 1} once each (counts {counts})")
    return out.movedim(0, dim)


def all_mean(x: Tensor, d: Dist) -> Tensor:
    """The mean of a tensor over the ranks (the rank's own value for one process)."""
    if d.world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / d.world


def all_stack(x: Tensor, d: Dist) -> Tensor:
    """Every rank's `x` stacked in rank order along a new first dimension, on every rank (x's device); one process
    returns `x` as it is."""
    if d.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts)
