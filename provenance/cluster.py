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

    def __init__(self, model_keys: dict[str, bytes]) -> None:
        self._keys = dict(model_keys)

    def model_key(self, model_id: str) -> bytes:
        try:
            return self._keys[model_id]
        except KeyError:
            raise KeyProblem(f"this worker holds no key for model {model_id[:16]}") from None


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


def _registry_at(db_path: str) -> Any:
    from weightmark.registry.store import Registry

    return Registry(Path(db_path))


def _scan_task(db_path: str, suspect: str, model_keys: dict[str, bytes], options: Any) -> Any:
    """One suspect of a sweep, on a worker."""
    from weightmark.sweep import scan_one

    _numba_threads()
    registry = _registry_at(db_path)
    try:
        return scan_one(registry, DerivedKeys(model_keys), suspect, options)
    finally:
        registry.close()


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
            derived = {model_id: keys.model_key(model_id) for model_id in ids}
            pending.append(self.client.submit(_scan_task, str(registry.path), str(suspect), derived, options,
                                              pure=False))
        for entry in pending:
            yield entry if not hasattr(entry, "result") else entry.result()


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
