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
        if self.parallel:
            _group().barrier()

    def total(self, n: int) -> int:
        """The sum of ``n`` over all ranks (``n`` in one process)."""
        if not self.parallel:
            return n
        import torch

        dist = _group()
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t)
        return int(t.item())


def _group():
    """torch.distributed with a process group: gloo (it works on any machine, CPU tensors included) unless the
    caller already set one up."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=4))
    return dist


def _better(new: dict, old: dict | None) -> bool:
    """Whether ``new`` should replace ``old`` under the same key: never a judged record by a FAILED one, since a
    crashed run's rank file may still hold a FAILED judgement that a later run has redone."""
    if old is None:
        return True
    return new != old and not (new.get("verdict") == "failed" and old.get("verdict") != "failed")


def _fold(store: ResultStore, paths: list[Path]) -> None:
    """Append to ``store`` each file's records that improve on its own (:func:`_better`), then delete the file."""
    for path in paths:
        store.append([r for k, r in ResultStore(path).records.items() if _better(r, store.records.get(k))])
        path.unlink()  # after the append, which is flushed to disk


def _rank_files(out: Path) -> list[Path]:
    return sorted(out.glob(RANK_FILE.format(rank="*")))


def open_store(out: Path | None, shard: Shard) -> ResultStore:
    """The store this rank reads from and appends to.

    One process: ``results.jsonl``, into which the rank files of a crashed data-parallel run are folded first.
    A data-parallel job: this rank's own file, holding besides its own records every record already in
    ``results.jsonl`` and in any rank file a crashed run left (all reusable, whatever the number of processes).

    Raises:
        ValueError: a data-parallel job without an output folder (ranks merge through files).
    """
    if out is None:
        if shard.parallel:
            raise InputError("a data-parallel evaluate (WORLD_SIZE > 1) merges the ranks' records through files; "
                             "pass out_dir (a folder every process can read).")
        return ResultStore(None)
    if not shard.parallel:
        store = ResultStore(out / "results.jsonl")
        _fold(store, _rank_files(out))
        return store
    store = ResultStore(out / RANK_FILE.format(rank=shard.rank))
    best: dict[str, dict] = {}
    for path in [out / "results.jsonl", *_rank_files(out)]:
        for k, r in ResultStore(path).records.items():
            if _better(r, best.get(k)):
                best[k] = r
    store.records = best
    return store


def merge(out: Path | None, shard: Shard) -> ResultStore:
    """After the last batch: rank 0 folds every rank file into ``results.jsonl``; all ranks get the merged store.

    Returns:
        The store of ``results.jsonl`` with every rank's records.
    """
    if not shard.parallel:
        raise AssertionError("merge is only for data-parallel jobs")
    assert out is not None
    shard.barrier()  # every rank has written its last batch
    if shard.rank == 0:
        _fold(ResultStore(out / "results.jsonl"), _rank_files(out))
    shard.barrier()  # the merged file is complete
    return ResultStore(out / "results.jsonl")
