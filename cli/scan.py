"""`weightmark scan`: name the licensee a suspect checkpoint came from."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from weightmark.cli import EXIT_ACCUSED
from weightmark.cli.common import (
    BarProgress,
    HomeOption,
    JsonOption,
    format_p,
    info,
    open_lab,
    print_json,
    safe,
    warn,
)
from weightmark.cli.sweep import run_sweep
from weightmark.cluster import SCHEDULER_ENV, open_cluster
from weightmark.errors import UsageError
from weightmark.outputs import EVIDENCE
from weightmark.registry.store import country_name
from weightmark.scheme import DEFAULT_THRESHOLD
from weightmark.sweep import ScanOptions, find_suspects, is_checkpoint_folder

if TYPE_CHECKING:
    from weightmark.scan import ScanReport


def scan(
    suspects: Annotated[list[Path], typer.Argument(metavar="SUSPECT...", help="The suspect checkpoint: safetensors file or folder, GGUF file, or a GPTQ/AWQ/compressed-tensors/bitsandbytes folder. Several paths, or a folder of such checkpoints, scan each one (a sweep).")],
    model: Annotated[str | None, typer.Option("--model", help="Registered model (default: found by tensor names and shapes).")] = None,
    reference: Annotated[Path | None, typer.Option("--reference", help="Unstamped reference weights (default: the registered base).")] = None,
    blind: Annotated[bool, typer.Option("--blind", help="Scan without any reference weights.")] = False,
    threshold: Annotated[float, typer.Option("--threshold", help="Accuse when the family-wise p-value is at most this.")] = DEFAULT_THRESHOLD,
    assume_licensees: Annotated[int, typer.Option("--assume-licensees", help="Correct for at least this many licensees.")] = 0,
    realign: Annotated[bool, typer.Option("--realign/--no-realign", help="Undo permutations, rescaling, rotation and renamed or transposed tensors before a non-blind scan.")] = True,
    evidence: Annotated[Path | None, typer.Option("--evidence", help="Write a signed evidence bundle of the accusations here (must not exist).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Let --evidence replace an earlier evidence bundle (JSON of the weightmark evidence format), or a sweep's --out replace an existing file; nothing else, and nothing in the lab home.")] = False,
    fail_on_accuse: Annotated[bool, typer.Option("--fail-on-accuse", help="Exit 10 when someone is accused (for scripts).")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Sweep: also write one JSON line per suspect to this file (JSON Lines).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Run on a local Dask cluster of this many worker processes (needs the cluster extra).")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help=f"Run on the Dask cluster of this scheduler address (default: ${SCHEDULER_ENV}, unless --workers is given).")] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Scan SUSPECT, score every copy issued of its model, and accuse only on a sound p-value.

    Exit 0 whenever the scan ran, whatever it found; with --fail-on-accuse, exit 10 when a
    licensee is accused. A sweep (several paths, a folder of checkpoints, or --out) prints one
    line per suspect (one JSON object per line with --json); a suspect that cannot be read is a
    line with its error and the sweep goes on; it exits 0 when every suspect was scanned and 3
    when any could not be (--fail-on-accuse applies to single scans).

    Example: weightmark scan ./leaked-model --json
    Example: weightmark scan ./uploads/ --json --out findings.jsonl --workers 4
    """
    if len(suspects) != 1 or out is not None or (suspects[0].is_dir() and not is_checkpoint_folder(suspects[0])):
        if evidence is not None:
            raise UsageError("--evidence takes a single suspect; scan it on its own")
        options = ScanOptions(model, str(reference) if reference else None, blind, threshold, assume_licensees, realign)
        with open_lab(home) as lab, open_cluster(workers, scheduler) or nullcontext() as cluster:
            code = run_sweep(lab, find_suspects(suspects), options, out, force, cluster, json_out)
        raise typer.Exit(code)
    suspect = suspects[0]
    with open_lab(home) as lab, open_cluster(workers, scheduler) or nullcontext() as cluster:
        if evidence is not None:
            lab.output(evidence, EVIDENCE, force)  # refuse a bad --evidence before the scan, not after
        report = lab.scan(suspect, model, reference, blind, threshold, assume_licensees, progress=BarProgress(),
                          realign=realign, cluster=cluster)
        if report.reference_warning:
            warn(report.reference_warning)
        if report.ambiguous:
            warn("the suspect matches several registered models equally well "
                 f"({', '.join(m['model'] for m in report.models)}); each was considered and the "
                 f"p-values cover all {report.models_considered}")
        if evidence is not None:
            lab.evidence(report, evidence, suspect, overwrite=force)
            what = "its accusations" if report.accused else "that nobody was accused"
            info(f"Evidence bundle stating {what} written to {evidence} (verify: weightmark evidence "
                 f"verify {evidence} --pubkey LAB.pub --suspect {suspect})")
    if json_out:
        print_json(report.to_json())
    else:
        _print_report(report)
    if fail_on_accuse and report.accused:
        raise typer.Exit(EXIT_ACCUSED)


def _print_report(report: ScanReport) -> None:
    echo = typer.echo
    against = f"non-blind, against {report.reference}" if report.reference else "blind"
    echo(f"Suspect:  {safe(report.suspect)} ({safe(report.format)}; {safe(against)})")
    echo(f"Model:    {safe(report.model)} ({report.model_id[:16]}), {report.carriers_used}/{report.carriers_total} "
         f"carriers, {report.elements_used:,} elements")
    if report.missing_shards:
        echo(f"Partial:  {len(report.missing_shards)} shard(s) listed by the index are absent; scanned what is here")
    if len(report.models) > 1:
        tried = ", ".join(f"{m['model']} ({m['accused']} accused)" for m in report.models_scanned)
        echo(f"Models:   {len(report.models)} registered models match; scanned {safe(tried)}; "
             f"p-values cover {report.models_considered} candidate models")
    for line in report.aligned:
        echo(f"Aligned:  {safe(line)}")
    present = "yes" if report.watermark_present else "not shown"
    echo(f"Watermark of this model's key present: {present} (p = {format_p(report.presence_log10_p)})")
    if report.accused:
        for c in report.accused:
            undelivered = "" if c.delivered else " (recorded as never delivered)"
            echo(f"ACCUSED:  {safe(c.name)} ({safe(c.licensee_id)}), jurisdiction {safe(c.jurisdiction)} "
                 f"({country_name(c.jurisdiction)}), registry entry {c.entry_id}{undelivered}")
            echo(f"          score {c.score:.1f}, p = {format_p(c.log10_p)}, family-wise p = "
                 f"{format_p(c.log10_family_wise_p)} over {report.family_size} issued codewords"
                 + (f" x {report.models_considered} models" if report.models_considered > 1 else ""))
    else:
        echo(f"No licensee accused (threshold: family-wise p <= {report.threshold:g}).")
    if report.candidates:
        echo("Best scores:")
        for c in report.candidates[:5]:
            echo(f"  {c.score:8.2f}  family-wise p = {format_p(c.log10_family_wise_p):>10}  {safe(c.name)} ({safe(c.licensee_id)}, {safe(c.jurisdiction)})")
