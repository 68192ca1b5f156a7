"""`weightmark registry ...`: look up signed entries and issued copies."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from weightmark.cli.common import (
    HomeOption,
    JsonOption,
    info,
    open_lab,
    print_json,
    resolve_licensee,
    safe,
)
from weightmark.errors import UsageError
from weightmark.registry import policy
from weightmark.registry.backend import check_url, redact
from weightmark.registry.envelope import envelope
from weightmark.registry.log import b64
from weightmark.registry.merkle import leaf_hash
from weightmark.registry.store import validate_jurisdiction

app = typer.Typer(help="Look up the signed registry.", no_args_is_help=True)

MAX_INDEX = 2**63 - 1  # SQLite's largest integer: a bigger entry number is a usage error


@app.command("show")
def show(
    entry_id: Annotated[int, typer.Argument(help="Registry entry number.", max=MAX_INDEX)],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one signed entry (licensee, model or issued copy) once its signature (under the key
    the log's key chain says was valid at its index), leaf and inclusion in the latest signed
    checkpoint hold; exit 4 naming the entry otherwise.

    Example: weightmark registry show 4 --json
    """
    with open_lab(home) as lab:
        entry = lab.registry.checked_entry(entry_id)
    status = "valid"
    doc = {"entry_id": entry.idx, "kind": entry.kind, "created_at": entry.created_at,
           "key_id": entry.key_id, "signature": status, "statement": entry.statement,
           "envelope": envelope(entry.payload, entry.key_id, entry.signature)}
    if json_out:
        print_json(doc)
        return
    st = entry.statement
    typer.echo(f"entry {entry.idx}: {safe(entry.kind)}, {safe(entry.created_at)}, key {safe(entry.key_id)}, "
               f"signature {safe(status)}")
    typer.echo(f"subject: {safe(st['subject'][0]['name'])} sha256:{safe(st['subject'][0]['digest']['sha256'])}")
    for k, v in st["predicate"].items():
        if k != "files":
            typer.echo(f"  {safe(k)}: {safe(v)}")


@app.command("find")
def find(
    licensee: Annotated[str | None, typer.Option("--licensee", help="Licensee id or legal name (case and spacing ignored).")] = None,
    jurisdiction: Annotated[str | None, typer.Option("--jurisdiction", help="ISO 3166-1 alpha-2 code.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name.")] = None,
    tier: Annotated[str | None, typer.Option("--tier", help="Jurisdiction-policy tier name.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Issued at or after (ISO 8601 date or time, UTC).")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Issued before (ISO 8601 date or time, UTC).")] = None,
    control_class: Annotated[str | None, typer.Option(
        "--control-class", help="Copies whose signed policy record classified the model in this control class.")] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Find issued copies by licensee, jurisdiction, policy tier, control class, model or issue time.

    Example: weightmark registry find --jurisdiction DE --since 2026-01-01 --json
    """
    if jurisdiction:
        validate_jurisdiction(jurisdiction)
    with open_lab(home) as lab:
        if licensee is not None:
            licensee = resolve_licensee(lab, licensee)
        model_id = lab.registry.model(model).model_id if model else None
        countries = None
        if tier is not None:
            installed = policy.current(lab.home)
            if installed is None:
                raise UsageError("--tier needs a jurisdiction policy (weightmark policy set FILE)")
            countries = installed.countries_in(tier)
        names = {m.model_id: m.name for m in lab.registry.models()}
        hits = lab.registry.find_issued(licensee, jurisdiction, model_id, _utc(since, "--since"),
                                        _utc(until, "--until"), countries)
        if control_class is not None:
            hits = lab.issued_in_control_class(hits, control_class)
        voided = lab.registry.voided_issues()
    # A voided issue keeps its codeword (scans still score it) but no copy left the lab.
    rows = [{**copy.to_json(), "model": names.get(copy.model_id), "licensee_name": lic.name,
             "jurisdiction": lic.jurisdiction, "delivered": copy.entry_idx not in voided,
             "void_entry_id": voided.get(copy.entry_idx)} for copy, lic in hits]
    if json_out:
        print_json(rows)
        return
    for r in rows:
        note = "" if r["delivered"] else f"\tnever delivered (entry {r['void_entry_id']})"
        typer.echo(f"entry {r['entry_id']}\t{safe(r['model'])}\t{safe(r['licensee_id'])}\t{safe(r['jurisdiction'])}\t"
                   f"{safe(r['licensee_name'])}\t{safe(r['issued_at'])}{note}")


def _utc(text: str | None, option: str) -> str | None:
    """An ISO 8601 date or time as the registry's UTC timestamp text (for comparisons)."""
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not an ISO 8601 date or time (e.g. 2026-11-01)") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@app.command("verify")
def verify_cmd(
    from_dir: Annotated[Path | None, typer.Option("--from", help="Verify an exported log folder (no database).")] = None,
    trust: Annotated[Path | None, typer.Option("--trust", help="With --from: the trust file you pinned.")] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Recompute every leaf, the tree and every checkpoint, check every signature, and re-derive
    every table row the other commands read from the signed entries.

    Also runs SQLite's integrity and foreign-key checks first. Exit 0 when everything holds;
    exit 4 naming the first bad entry, checkpoint or table row otherwise.

    Example: weightmark registry verify   |   weightmark registry verify --from ./log-export
    """
    if from_dir is not None:
        from weightmark.evidence import verify_export

        result = verify_export(from_dir, trust)
    else:
        if trust is not None:
            raise UsageError("--trust goes with --from")
        with open_lab(home) as lab:
            result = lab.verify_log()
    doc = {"ok": True, "entries": result.size, "checkpoints": result.checkpoints, "root": b64(result.root),
           "origin": result.trust.origin, "keys": [k.key_id for k in result.trust.keys]}
    if json_out:
        print_json(doc)
    else:
        typer.echo(f"Log verified: {result.size} entries, {result.checkpoints} signed checkpoints, "
                   f"root {doc['root']} ({safe(result.trust.origin)})")


@app.command("proof")
def proof(
    entry_id: Annotated[int, typer.Argument(help="Registry entry number.", max=MAX_INDEX)],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Inclusion proof of an entry in the latest signed checkpoint (RFC 9162 audit path).

    Example: weightmark registry proof 4 --json
    """
    with open_lab(home) as lab:
        size, root, note = lab.registry.latest_checkpoint()
        found = lab.registry.log_entries(entry_id, entry_id + 1)
        if not found:
            raise UsageError(f"no registry entry {entry_id}")
        entry = found[0]
        path = lab.registry.inclusion_proof(entry_id, size)
    doc = {"entry_id": entry_id, "tree_size": size, "root": b64(root), "leaf_hash": b64(leaf_hash(entry.data)),
           "proof": [b64(h) for h in path], "checkpoint": note.decode()}
    if json_out:
        print_json(doc)
        return
    typer.echo(f"entry {entry_id} in tree of {size}: leaf {doc['leaf_hash']}")
    for h in doc["proof"]:
        typer.echo(f"  {h}")
    typer.echo(f"root {doc['root']}")


@app.command("consistency")
def consistency(
    old_size: Annotated[int, typer.Argument(help="Size of the older checkpoint.", max=MAX_INDEX)],
    new_size: Annotated[int | None, typer.Argument(help="Size of the newer one (default: latest).", max=MAX_INDEX)] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Consistency proof between two signed checkpoints: the older log is a prefix of the newer.

    Example: weightmark registry consistency 10 25
    """
    with open_lab(home) as lab:
        latest = lab.registry.latest_checkpoint()[0]
        new = latest if new_size is None else new_size
        if not 0 < old_size <= new <= latest:
            raise UsageError(f"need 0 < OLD_SIZE <= NEW_SIZE <= {latest}")
        root1, _ = lab.registry.checkpoint(old_size)
        root2, note2 = lab.registry.checkpoint(new)
        path = lab.registry.consistency_proof(old_size, new)
    doc = {"old_size": old_size, "new_size": new, "old_root": b64(root1), "new_root": b64(root2),
           "proof": [b64(h) for h in path], "new_checkpoint": note2.decode()}
    if json_out:
        print_json(doc)
        return
    typer.echo(f"{old_size} -> {new}: {doc['old_root']} -> {doc['new_root']}")
    for h in doc["proof"]:
        typer.echo(f"  {h}")


@app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", help="Folder to create with the log's files (must not exist).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier log export at --out (a folder holding "
                                        "exactly entries.jsonl, checkpoints.jsonl, trust.json); nothing else.")] = False,
    home: HomeOption = None,
) -> None:
    """Export the log (entries, checkpoints, trust file) for offline verification by others.

    Example: weightmark registry export --out ./log-export && weightmark registry verify --from ./log-export
    """
    with open_lab(home) as lab:
        count = lab.export_log(out, overwrite=force)
    info(f"Exported {count} entries to {out}")
    typer.echo(safe(out))


@app.command("migrate")
def migrate(
    to: Annotated[str, typer.Option("--to", help="An empty PostgreSQL database: postgresql://[user@]host[:port]/db "
                                    "(no password in it: libpq reads PGPASSFILE / ~/.pgpass).")],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Copy the home's SQLite registry into PostgreSQL, verify the copy in full, then switch the
    home to it (registry.location). The SQLite file is left as it was.

    Example: weightmark registry migrate --to postgresql://weightmark@db.lab.example/registry
    """
    check_url(to)
    with open_lab(home) as lab:
        result = lab.migrate_registry(to)
    doc = {"ok": True, "entries": result.size, "root": b64(result.root), "registry": redact(to)}
    if json_out:
        print_json(doc)
        return
    info(f"Copied and verified {result.size} entries; the home now uses {redact(to)}")
    typer.echo(safe(redact(to)))


@app.command("grant")
def grant(
    appender: Annotated[str | None, typer.Option("--appender", help="Role that may append (made if missing).")] = None,
    reader: Annotated[str | None, typer.Option("--reader", help="Role that may only read (made if missing).")] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """PostgreSQL registry: create an appending role and a read-only role and grant each only what
    it needs (run as the registry's owner). Neither may UPDATE or DELETE an entry or checkpoint.

    Example: weightmark registry grant --appender wm_signer --reader wm_auditor
    """
    if appender is None and reader is None:
        raise UsageError("give --appender ROLE, --reader ROLE or both")
    with open_lab(home) as lab:
        statements = lab.registry.grant(appender, reader)
    if json_out:
        print_json({"ok": True, "appender": appender, "reader": reader, "statements": statements})
        return
    for stmt in statements:
        typer.echo(safe(stmt))
