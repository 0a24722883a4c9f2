"""Data-parallel evaluation: the same :func:`sa_lens.evaluate` call in every process of a ``torchrun`` /
``accelerate launch`` job, each process doing every n-th batch.

Batches are fixed by the data set and ``batch_size`` (and fix the sampling seeds), so a batch's records do not
depend on which process ran it: the merged records equal one process's. Each rank appends its records to
``results.rank{r}.jsonl`` beside ``results.jsonl``; after the last batch rank 0 moves them into ``results.jsonl``
and every rank reads the merged file, so all ranks return the same report and rank 0 writes it. A rerun after a
crash reuses every record written by any rank (also with another number of processes).

The job is found from the environment both launchers set (``RANK``, ``WORLD_SIZE``); the processes meet at
``torch.distributed`` barriers (gloo, initialised here unless the caller already did).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from sa_lens.errors import InputError
from sa_lens.evaluation.store import ResultStore

__all__ = ["Shard", "merge", "open_store"]

RANK_FILE = "results.rank{rank}.jsonl"


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel job (rank 0 of 1 when there is none)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        """Read ``RANK`` / ``WORLD_SIZE`` (set by torchrun and accelerate launch).

        Raises:
            ValueError: values that are not integers with 0 ≤ RANK < WORLD_SIZE.
        """
        rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
        try:
            shard = cls(int(rank), int(world))
        except ValueError:
            raise InputError(f"RANK={rank!r} and WORLD_SIZE={world!r} must be integers (set by torchrun).") from None
        if not 0 <= shard.rank < shard.world:
            raise InputError(f"RANK={shard.rank} is outside WORLD_SIZE={shard.world}.")
        return shard

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def mine(self, batch_number: int) -> bool:
        """Whether the job's ``batch_number``-th batch (counted over states, sets and batches) is this rank's."""
        return batch_number % self.world == self.rank

    def barrier(self) -> None:
        """Wait for every rank (a no-op in one process)."""
        if not self.parallel:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            # gloo works on any machine; a job that set up NCCL itself keeps its own group.
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=4))
        dist.barrier()


def open_store(out: Path | None, shard: Shard) -> ResultStore:
    """The store this rank reads from and appends to.

    One process: ``results.jsonl``. A data-parallel job: this rank's own file, holding besides its own records
    every record already in ``results.jsonl`` and in any rank file a crashed run left (all reusable).

    Raises:
        ValueError: a data-parallel job without an output folder (ranks merge through files).
    """
    if not shard.parallel:
        return ResultStore(out / "results.jsonl" if out else None)
    if out is None:
        raise InputError("a data-parallel evaluate (WORLD_SIZE > 1) merges the ranks' records through files; "
                         "pass out_dir.")
    store = ResultStore(out / RANK_FILE.format(rank=shard.rank))
    earlier: dict[str, dict] = {}
    for path in [out / "results.jsonl", *sorted(out.glob(RANK_FILE.format(rank="*")))]:
        earlier |= ResultStore(path).records
    store.records = earlier | store.records
    return store


def merge(out: Path | None, shard: Shard) -> ResultStore:
    """After the last batch: rank 0 moves every rank file into ``results.jsonl``; all ranks get the merged store.

    Returns:
        The store of ``results.jsonl`` with every rank's records.
    """
    if not shard.parallel:
        raise AssertionError("merge is only for data-parallel jobs")
    assert out is not None
    shard.barrier()  # every rank has written its last batch
    if shard.rank == 0:
        merged = ResultStore(out / "results.jsonl")
        for path in sorted(out.glob(RANK_FILE.format(rank="*"))):
            new = [r for k, r in ResultStore(path).records.items() if merged.records.get(k) != r]
            merged.append(new)  # flushed to disk before the rank file goes
            path.unlink()
    shard.barrier()  # the merged file is complete
    return ResultStore(out / "results.jsonl")
