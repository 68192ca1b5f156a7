"""Running scans and stamps on a Dask cluster (`--workers N`, `--scheduler ADDRESS`).

Dask (`pip install 'weightmark[cluster]'`) is the engine for more than one process or machine;
without it everything runs in-process. Tasks:

- a sweep: one task per suspect, each a whole single-suspect scan on a worker;
- a single sharded suspect: one task per shard computes that shard's additive (num, den) sums;
  the coordinator estimates the re-alignment once, ships it with the tasks and adds the sums;
- a stamp: one task per output shard: the worker reads its base shard, stamps it, writes it
  atomically into the staging folder and returns its digest and size; the coordinator appends
  the registry entry only when every shard is in (no copy without an entry).

What a worker gets: paths, tensor names and the ONE model's derived key (`keys.model_key`),
never the master secret nor the signing key; only the coordinator signs and appends. Workers
are processes with one thread (numba's default threading layer aborts when parallel kernels
run in several threads of one process), and each sets numba's thread count to its share of
its machine's cores. The work is the serial path's, tensor by tensor in the same order, so
stamped bytes and scores are identical.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from weightmark.errors import InputFileError, KeyProblem, UsageError

__all__ = ["SCHEDULER_ENV", "Cluster", "DerivedKeys", "open_cluster"]

SCHEDULER_ENV = "WEIGHTMARK_SCHEDULER"

# Set on each worker by Cluster: numba threads for this worker process.
_WORKER_THREADS: int | None = None


class DerivedKeys:
    """What a worker holds instead of the lab keys: the derived keys of the models it may scan
    or stamp. Asking for another model's key is a KeyProblem."""

    def __init__(self, model_keys: dict[str, bytes], refusals: dict[str, str] | None = None) -> None:
        self._keys = dict(model_keys)
        self._refusals = dict(refusals or {})  # why the coordinator could not ship a model's key

    def model_key(self, model_id: str) -> bytes:
        try:
            return self._keys[model_id]
        except KeyError:
            reason = self._refusals.get(model_id, f"this worker holds no key for model {model_id[:16]}")
            raise KeyProblem(reason) from None


def _set_worker_threads(per_host: dict[str, int]) -> int:
    """Run on every worker: its numba thread count is its share of this host's cores."""
    import socket

    global _WORKER_THREADS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        from distributed import get_worker

        host = get_worker().address.split("://")[-1].rsplit(":", 1)[0]
    except (ImportError, ValueError):
        host = socket.gethostname()
    _WORKER_THREADS = max(1, cores // max(1, per_host.get(host, 1)))
    return _WORKER_THREADS


def _numba_threads() -> None:
    """numba's thread count is per calling thread: set it in the task's own thread."""
    if _WORKER_THREADS is not None:
        import numba

        numba.set_num_threads(min(_WORKER_THREADS, numba.config.NUMBA_NUM_THREADS))


def _registry_at(where: str, anchor: Any = None) -> Any:
    """The coordinator's registry, on a worker: read-only with the coordinator's anchor when the
    coordinator's is (an investigator's home; `where` is its database file or PostgreSQL URL), else as a lab home
    opens it (`where` is the home: its SQLite file, or the PostgreSQL URL it records)."""
    from weightmark.registry.store import Registry

    if anchor is not None:
        return Registry.open_read_only(where, anchor)
    return Registry.open(Path(where))


def _scan_task(where: str, suspect: str, model_keys: dict[str, bytes], options: Any, anchor: Any = None,
               refusals: dict[str, str] | None = None) -> Any:
    """One suspect of a sweep, on a worker."""
    from weightmark.sweep import scan_one

    _numba_threads()
    registry = _registry_at(where, anchor)
    try:
        return scan_one(registry, DerivedKeys(model_keys, refusals), suspect, options)
    finally:
        registry.close()


def _stamp_shard_task(shard_path: str, target: str, carriers: dict[str, Any], code: Any, model_key: bytes,
                      alpha: float) -> tuple[str, int]:
    """One output shard of a stamped copy, on a worker: read the base shard, embed the codeword in
    its carriers, write `target` through a temporary name (fsynced, then renamed)."""
    import numpy as np

    from weightmark.formats.safetensors import SafetensorsFile, _ScratchBuffers, _write_shard
    from weightmark.stamp import embed_tensor

    _numba_threads()
    final = Path(target)
    part = final.with_name(f".{final.name}.part")
    with SafetensorsFile(shard_path) as shard:

        def transform(name: str, info: Any, raw: np.ndarray, out: np.ndarray) -> np.ndarray:
            return embed_tensor(name, info, raw, out, carriers, code, model_key, alpha, shard.path)

        try:
            digest = _write_shard(shard, shard, part, transform, None, None, _ScratchBuffers())
            os.replace(part, final)
        finally:
            part.unlink(missing_ok=True)
    return digest, final.stat().st_size


def _carrier_sums_task(suspect_path: str, reference_path: str | None, items: list[tuple[Any, str, Any]],
                       aligned: bool, model_key: bytes, code_lengths: list[int]) -> list[Any]:
    """One suspect shard's carriers, on a worker: each carrier's own (num, den) per code length,
    read through the alignment the coordinator estimated (its plans for these carriers)."""
    from weightmark.align import Alignment
    from weightmark.formats import open_suspect
    from weightmark.scan import TensorTables, _carrier_sums

    _numba_threads()
    suspect = open_suspect(suspect_path)
    reference = open_suspect(reference_path) if reference_path is not None else None
    try:
        alignment = Alignment(suspect, {c.name: plan for c, _, plan in items}) if aligned else None
        metas = TensorTables(suspect, reference)
        return [_carrier_sums(suspect, reference, alignment, carrier, own, model_key, code_lengths, metas)
                for carrier, own, _ in items]
    finally:
        suspect.close()
        if reference is not None:
            reference.close()


class Cluster:
    """A Dask client on a LocalCluster of `workers` processes, or on the scheduler at `scheduler`."""

    def __init__(self, workers: int | None = None, scheduler: str | None = None) -> None:
        if workers is not None and scheduler:
            raise UsageError("--workers and --scheduler exclude each other")
        if workers is not None and workers < 1:
            raise UsageError(f"--workers must be at least 1, got {workers}")
        try:
            import distributed
        except ImportError:
            raise UsageError("--workers and --scheduler need Dask: pip install 'weightmark[cluster]'") from None
        self._local = None
        if scheduler:
            try:
                self.client = distributed.Client(scheduler, timeout="20s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise UsageError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        else:
            self._local = distributed.LocalCluster(n_workers=workers, processes=True, threads_per_worker=1,
                                                   dashboard_address=None, silence_logs=40)
            self.client = distributed.Client(self._local)
        hosts = Counter(addr.split("://")[-1].rsplit(":", 1)[0]
                        for addr in self.client.scheduler_info()["workers"])
        self.client.run(_set_worker_threads, dict(hosts))

    @property
    def workers(self) -> int:
        return len(self.client.scheduler_info()["workers"])

    def close(self) -> None:
        self.client.close()
        if self._local is not None:
            self._local.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- sweep ---------------------------------------------------------------------------------

    def sweep(self, registry: Any, keys: Any, suspects: Sequence[Path], options: Any) -> Iterator[Any]:
        """One task per suspect, results in the order given. The coordinator opens each suspect
        only to find the registered models it may be a copy of, and ships those models' keys."""
        from weightmark.sweep import item_from_error

        pending: list[Any] = []
        for suspect in suspects:
            try:
                ids = _candidate_ids(registry, suspect, options.model_name)
            except (InputFileError, OSError) as exc:
                pending.append(item_from_error(str(suspect), exc))
                continue
            # A home that holds only some models' keys (an investigator's) ships those; a worker
            # that needs another says why, as the in-process scan would.
            derived, refusals = {}, {}
            for model_id in ids:
                try:
                    derived[model_id] = keys.model_key(model_id)
                except KeyProblem as exc:
                    refusals[model_id] = str(exc)
            anchor = registry.anchor if registry.read_only else None
            where = registry.location if registry.read_only else registry.home
            pending.append(self.client.submit(_scan_task, str(where), str(suspect), derived, options,
                                              anchor, refusals, pure=False))
        for entry in pending:
            yield entry if not hasattr(entry, "result") else entry.result()


    # -- one sharded suspect ---------------------------------------------------------------------

    def carrier_sums(self, suspect: Any, reference: Any, alignment: Any, carriers: Sequence[Any],
                     aliases: dict[str, str], model_key: bytes, code_lengths: list[int]) -> list[Any]:
        """Per carrier (in order), why it was skipped or its own sums: one task per suspect shard
        holding some of them. The alignment's plans go with the carriers they concern."""
        checkpoint = suspect.checkpoint
        groups: dict[str, list[tuple[int, Any, str, Any]]] = {}
        results: list[Any] = [None] * len(carriers)
        for i, carrier in enumerate(carriers):
            own = aliases.get(carrier.name)
            if own is None:
                results[i] = ("missing", {})
                continue
            plan = alignment.plans.get(carrier.name) if alignment is not None else None
            shard = checkpoint.shard_of(own).path.name
            groups.setdefault(shard, []).append((i, carrier, own, plan))
        reference_path = None if reference is None else str(reference.path)
        futures = {shard: self.client.submit(_carrier_sums_task, str(suspect.path), reference_path,
                                             [(c, own, plan) for _, c, own, plan in items], alignment is not None,
                                             model_key, code_lengths, pure=False)
                   for shard, items in groups.items()}
        for shard, items in groups.items():
            for (i, *_), result in zip(items, futures[shard].result(), strict=True):
                results[i] = result
        return results

    # -- stamp ---------------------------------------------------------------------------------

    def shard_stamper(self, base: Any, carriers: dict[str, Any], code: Any, model_key: bytes, alpha: float,
                      advance: Any = None) -> Any:
        """A `write_like(write_shards=...)` that stamps one output shard per task. Each task gets
        its shard's path, its target, the carriers of that shard, the codeword and the model key."""

        def write_shards(pairs: list[tuple[Any, Path]]) -> list[str]:
            futures = []
            for shard, target in pairs:
                # a fused expert tensor's units `<name>[e]` go with the shard holding the tensor
                mine = {name: c for name, c in carriers.items() if _stored_name(name) in shard.tensors}
                futures.append(self.client.submit(_stamp_shard_task, str(shard.path), str(target), mine, code,
                                                  model_key, alpha, pure=False))
            digests = []
            try:
                for (shard, _), future in zip(pairs, futures, strict=True):
                    digest, _size = future.result()
                    digests.append(digest)
                    if advance is not None:
                        advance(sum(info.nbytes for info in shard.tensors.values()))
            except BaseException:
                # Nothing may still be writing into the staging folder once it is rolled back.
                self.client.cancel(futures)
                from distributed import wait

                wait(futures)
                raise
            return digests

        return write_shards


def _stored_name(name: str) -> str:
    """The stored tensor a carrier lives in: itself, or the fused tensor of an expert unit."""
    from weightmark.moe import split_unit

    unit = split_unit(name)
    return name if unit is None else unit[0]


def _candidate_ids(registry: Any, suspect: Path, model_name: str | None) -> list[str]:
    """The registered models a suspect may be scanned against (what the scan itself will try)."""
    from weightmark.formats import open_suspect
    from weightmark.scan import candidate_models

    if model_name:
        return [registry.model(model_name).model_id]
    opened = open_suspect(suspect)
    try:
        matches = candidate_models(registry, opened)
    finally:
        opened.close()
    if not matches:
        raise InputFileError(suspect, "matches no registered model by tensor names and shapes; pass --model NAME")
    return [m.model.model_id for m in matches]


def open_cluster(workers: int | None, scheduler: str | None) -> Cluster | None:
    """A cluster when --workers or --scheduler (or $WEIGHTMARK_SCHEDULER) asks for one, else None."""
    scheduler = scheduler or (os.environ.get(SCHEDULER_ENV) if workers is None else None) or None
    if workers is None and not scheduler:
        return None
    return Cluster(workers, scheduler)
