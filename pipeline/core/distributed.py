"""torch.distributed helpers: the process context, and partitions of store rows on chunk boundaries.

Under torchrun every rank trains its shard of each epoch (DistributedSampler over the dataset's (x, y,
index) items, so each rank looks its targets up by index exactly as a single process does) and exports
its own whole chunks of the store: zarr writers in different processes are safe only on disjoint chunks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Rank and world size of this process (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistContext()


def context_from_env(env: Mapping[str, str]) -> DistContext:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (the caller passes os.environ)."""
    world = int(env.get("WORLD_SIZE", "1"))
    return DistContext(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")))


def init(ctx: DistContext, backend: str = "auto") -> None:
    """Join the process group: nccl on CUDA, gloo on CPU (unless `backend` names one)."""
    if not ctx.enabled or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()


def broadcast(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's `obj`, on every rank."""
    if not (ctx.enabled and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def partition_rows(num_rows: int, chunk_rows: int, world_size: int) -> list[tuple[int, int]]:
    """Split rows [0, num_rows) into `world_size` contiguous ranges of whole chunks (some may be empty)."""
    chunks = -(-num_rows // chunk_rows)
    per, extra = divmod(chunks, world_size)
    plan, chunk = [], 0
    for r in range(world_size):
        n = per + (1 if r < extra else 0)
        plan.append((min(chunk * chunk_rows, num_rows), min((chunk + n) * chunk_rows, num_rows)))
        chunk += n
    check_partition(plan, num_rows, chunk_rows)
    return plan


def check_partition(plan: list[tuple[int, int]], num_rows: int, chunk_rows: int) -> None:
    """Refuse a plan whose ranges overlap, leave gaps, or start or end inside a chunk."""
    pos = 0
    for rank, (start, stop) in enumerate(plan):
        if start != pos or stop < start:
            raise ValueError(f"partition {plan}: rank {rank} covers [{start}, {stop}), expected to start at {pos}")
        for edge in (start, stop):
            if edge % chunk_rows and edge != num_rows:
                raise ValueError(
                    f"partition {plan}: rank {rank}'s boundary {edge} falls inside a chunk of {chunk_rows} rows; "
                    f"two writers would share that chunk and one would lose its rows"
                )
        pos = stop
    if pos != num_rows:
        raise ValueError(f"partition {plan}: covers rows up to {pos}, the store has {num_rows}")
