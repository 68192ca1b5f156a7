"""`weightmark scan PATH [PATH ...]` over many suspects: one line per suspect, JSON Lines with --json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from weightmark.cli import EXIT_BAD_INPUT, EXIT_OK
from weightmark.cli.common import safe
from weightmark.fsutil import staged_output
from weightmark.lab import Lab
from weightmark.sweep import SWEEP_RESULTS, ScanOptions, SweepItem, sweep


def run_sweep(lab: Lab, suspects: list[Path], options: ScanOptions, out: Path | None, force: bool,
              cluster: Any, json_out: bool) -> int:
    """Scan every suspect, print one line each (stdout), write them to `out` as JSON Lines.

    Returns the exit code: 0 when every suspect was scanned, 3 when any could not be.
    """
    counts = {"accused": 0, "clean": 0, "failed": 0}

    def emit(item: SweepItem, sink: Any) -> None:
        line = json.dumps(item.to_json(), ensure_ascii=False, separators=(",", ":"))
        if sink is not None:
            sink.write(line + "\n")
            sink.flush()
        typer.echo(line if json_out else f"{safe(item.suspect)}: {safe(item.summary)}")
        counts["failed" if item.failed else "accused" if item.accused else "clean"] += 1

    registry, keys = lab.registry, lab.scan_keys()
    # Checked before any scan: nothing is replaced without --force, and --force replaces only an
    # earlier sweep's results, never the lab's files or a registered base.
    target = lab.output(out, SWEEP_RESULTS, force) if out is not None else None
    if target is None:
        for item in sweep(registry, keys, suspects, options, cluster):
            emit(item, None)
    else:
        with staged_output(target.final, is_dir=False, overwrite=target.replace) as staging:
            with open(staging.path, "x", encoding="utf-8") as sink:
                for item in sweep(registry, keys, suspects, options, cluster):
                    emit(item, sink)
                sink.flush()
                os.fsync(sink.fileno())
            target.recheck()
            staging.publish()
    typer.echo(f"{len(suspects)} suspects: {counts['accused']} with an accusation, {counts['clean']} without, "
               f"{counts['failed']} could not be scanned" + (f"; results in {out}" if out else ""), err=True)
    return EXIT_BAD_INPUT if counts["failed"] else EXIT_OK
