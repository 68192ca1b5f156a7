"""Scanning many suspects: one result per suspect, a suspect that cannot be read never ends the sweep.

`find_suspects` turns the paths an investigator gives into suspects: a file, or a folder that is
itself a checkpoint, is one suspect; any other folder contributes each of its entries. `sweep`
scans them in order (in-process, or one task per suspect on a Dask cluster, see
`weightmark.cluster`) and yields a `SweepItem` per suspect: the scan report's JSON, or the
error that stopped that one suspect (bad or unreadable file, no registered model matches:
`InputFileError`, exit code 3). Errors about the lab itself (registry, keys, an unknown --model)
stop the sweep, since every suspect would fail the same way.

Every p-value is the single-suspect scan's: each suspect is its own question (its own
family-wise bound over that model's licensees); a sweep does not pool them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightmark.errors import InputFileError, UsageError
from weightmark.outputs import OutputKind

if TYPE_CHECKING:
    from weightmark.keys import LabKeys
    from weightmark.registry.store import Registry

__all__ = ["SWEEP_RESULTS", "ScanOptions", "SweepItem", "find_suspects", "is_checkpoint_folder", "scan_one",
           "sweep"]

# A folder holding any of these is one checkpoint (a model repository), not a folder of suspects.
_CHECKPOINT_MARKERS = ("config.json", "model.safetensors.index.json", "quantize_config.json",
                       "quantization_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".npz", ".llamafile")


def is_checkpoint_folder(path: str | os.PathLike[str]) -> bool:
    """Whether a folder is one checkpoint rather than a folder of suspects.

    It is one when it holds a model config or a shard index at its top, or exactly one weight
    file and no subfolder (a bare `model.safetensors` or `.gguf` in a folder). A folder of
    several loose weight files, or of subfolders, is a folder of suspects.
    """
    try:
        entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
    except OSError:
        return False
    if any(e.name in _CHECKPOINT_MARKERS for e in entries):
        return True
    weights = [e for e in entries if e.name.endswith(_WEIGHT_SUFFIXES) and e.is_file()]
    return len(weights) == 1 and not any(e.is_dir() for e in entries)


_RESULTS_LIMIT = 1 << 30  # a results file larger than this is not recognised (never replaced)


def _is_sweep_results(path: Path, _: object) -> bool:
    """An earlier `--out` of a sweep: a JSON Lines file whose every line is an object naming its
    suspect (a scan report or an error line)."""
    try:
        if not path.is_file() or path.stat().st_size > _RESULTS_LIMIT:
            return False
        with open(path, encoding="utf-8") as fh:
            lines = 0
            for line in fh:
                item = json.loads(line)
                if not isinstance(item, dict) or not isinstance(item.get("suspect"), str):
                    return False
                lines += 1
    except (OSError, ValueError):
        return False
    return lines > 0


SWEEP_RESULTS = OutputKind("sweep results file (JSON Lines of scans)", False, _is_sweep_results)


def find_suspects(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The suspects named by `paths`, in the order given (a folder's entries sorted by name).

    A path that does not exist is still a suspect: its scan reports the error.
    """
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not is_checkpoint_folder(path):
            try:
                entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
            except OSError as exc:
                raise InputFileError(path, f"cannot list folder: {exc.strerror}") from None
            out.extend(entries)
        else:
            out.append(path)
    return out


@dataclass(frozen=True)
class ScanOptions:
    """What every scan of a sweep shares (the single-suspect scan's parameters)."""

    model_name: str | None = None
    reference: str | None = None
    blind: bool = False
    threshold: float = 1e-9
    assume_licensees: int = 0
    realign: bool = True


@dataclass
class SweepItem:
    """One suspect's outcome: the scan report as JSON, or the error that stopped its scan."""

    suspect: str
    report: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # {"message": ..., "exit_code": ...}
    summary: str = field(default="", repr=False)

    def to_json(self) -> dict[str, Any]:
        if self.report is not None:
            return self.report
        return {"suspect": self.suspect, "error": self.error}

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def accused(self) -> list[dict[str, Any]]:
        return list(self.report.get("accused", [])) if self.report else []


def _summary(report: dict[str, Any]) -> str:
    """One line: who is accused, or that nobody is, and against which model."""
    model = f"model {report['model']}, {report['mode']}"
    if report["accused"]:
        names = "; ".join(f"{c['name']} ({c['licensee_id']}, {c['jurisdiction']}) family-wise p = "
                          f"{_p(c['log10_family_wise_p_value'])}" for c in report["accused"])
        return f"ACCUSED {names} [{model}]"
    best = report["candidates"][0]["score"] if report["candidates"] else None
    tail = f", best score {best:.2f}" if best is not None else ""
    return f"no licensee accused [{model}{tail}]"


def _p(log10_p: float) -> str:
    return f"{10.0 ** log10_p:.1e}" if log10_p >= -300 else f"10^{log10_p:.1f}"


def item_from_report(suspect: str, report_json: dict[str, Any]) -> SweepItem:
    return SweepItem(suspect, report=report_json, summary=_summary(report_json))


def item_from_error(suspect: str, exc: BaseException) -> SweepItem:
    if isinstance(exc, InputFileError):
        message, code = str(exc), exc.exit_code
    else:  # OSError
        assert isinstance(exc, OSError)
        where = exc.filename if exc.filename else suspect
        message, code = f"{where}: {exc.strerror or exc}", InputFileError.exit_code
    return SweepItem(suspect, error={"message": message, "exit_code": code}, summary=f"Error: {message}")


def scan_one(registry: Registry, keys: Any, suspect: str | os.PathLike[str], options: ScanOptions) -> SweepItem:
    """Scan one suspect; a suspect that cannot be read or matched becomes an error item.

    `keys` needs only `model_key(model_id)` (the lab's keys, or a worker's derived keys).
    """
    from weightmark.scan import scan

    try:
        report = scan(registry, keys, suspect, options.model_name, options.reference, options.blind,
                      options.threshold, options.assume_licensees, realign=options.realign)
    except (InputFileError, OSError) as exc:
        return item_from_error(str(suspect), exc)
    return item_from_report(str(suspect), report.to_json())


def sweep(registry: Registry, keys: LabKeys, suspects: Iterable[str | os.PathLike[str]], options: ScanOptions,
          cluster: Any = None) -> Iterator[SweepItem]:
    """Scan every suspect, yielding one item per suspect in the order given.

    `cluster` (a `weightmark.cluster.Cluster`) runs one task per suspect on its workers;
    without it the scans run here, one after another.
    """
    if options.blind and options.reference is not None:
        raise UsageError("--blind and --reference exclude each other")
    suspects = [Path(s) for s in suspects]
    if cluster is None:
        for suspect in suspects:
            yield scan_one(registry, keys, suspect, options)
        return
    yield from cluster.sweep(registry, keys, suspects, options)
