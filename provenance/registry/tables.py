"""The plain tables as the signed entries say they must be: derive, compare, name the first difference.

The registry's `entries` are the truth; `licensees`, `models`, `carriers` and `issued_copies`
are caches for look-ups. This module knows, for each of those tables, which columns a signed
statement fixes and how (`expected_*`), compares a stored row with them (`compare`), and
checks every row of every table against the whole log (`verify_tables`, for
`weightmark registry verify`). `SignedIndex` is the compact summary of the log that checked
reads use to notice rows that are missing or that do not belong.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weightmark.errors import RegistryError
from weightmark.registry.backend import Database
from weightmark.registry.envelope import canonical_json
from weightmark.registry.log import LogEntry, statement_kind

LICENSEE_COLUMNS = ("id", "name", "jurisdiction", "email", "created_at", "entry_idx")
MODEL_COLUMNS = ("model_id", "name", "base_path", "format", "files", "created_at", "entry_idx")
ISSUED_COLUMNS = ("entry_idx", "model_id", "licensee_id", "codeword_index", "scheme", "output_format",
                  "variant", "out_path", "digest", "issued_at", "jurisdiction", "policy")
CARRIER_COLUMNS = ("model_id", "ordinal", "name", "dtype", "shape", "row_scale")
JSON_COLUMNS = frozenset({"files", "policy"})  # compared as parsed JSON, not as text


class TableMismatch(RegistryError):
    """A table row differs from its signed entry, lacks one, or a signed entry lacks its row."""


@dataclass(frozen=True)
class Check:
    """An expected value that is a rule rather than one value (e.g. "a path ending in NAME")."""

    ok: Callable[[Any], bool]
    says: str


def show(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def row_dict(columns: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    """A stored row by column name, with the JSON columns parsed (text that is not JSON stays text)."""
    out = dict(zip(columns, row, strict=True))
    for col in JSON_COLUMNS & out.keys():
        value = out[col]
        if isinstance(value, str):
            try:
                out[col] = json.loads(value)
            except ValueError:
                out[col] = Check(lambda _: False, f"text that is not JSON: {value[:40]!r}")
    return out


def compare(where: str, actual: dict[str, Any], expected: dict[str, Any], idx: int, values: bool = True) -> None:
    """Raise TableMismatch naming the first column of `actual` that the signed entry contradicts.

    `values`: say what the row and the entry hold (for `registry verify`); commands that
    refuse a row leave the values out, so that a forged value is never printed.
    """
    bad = None
    for col, have in actual.items():
        if isinstance(have, Check):
            want = expected.get(col)
            bad = col, have.says, want.says if isinstance(want, Check) else show(want)
            break
    else:
        for col, want in expected.items():
            have = actual[col]
            if isinstance(want, Check):
                if not want.ok(have):
                    bad = col, show(have), want.says
                    break
            elif type(have) is not type(want) or have != want:
                bad = col, show(have), show(want)
                break
    if bad is None:
        return
    col, have_text, want_text = bad
    if values:
        raise TableMismatch(f"{where}: {col} is {have_text} but the signed entry {idx} says {want_text}")
    raise TableMismatch(f"{where}: {col} does not match the signed entry {idx}; "
                        "`weightmark registry verify` shows the difference")


# -- rows as the signed statements fix them ------------------------------------------------------


def _subject(stmt: dict[str, Any]) -> tuple[str, str]:
    subject = stmt["subject"][0]
    return subject["name"], subject["digest"]["sha256"]


def expected_licensee(idx: int, stmt: dict[str, Any]) -> dict[str, Any]:
    p = stmt["predicate"]
    return {"id": p["licensee_id"], "name": p["legal_name"], "jurisdiction": p["jurisdiction"],
            "email": p["email"], "created_at": p["created_at"], "entry_idx": idx}


def expected_model(idx: int, stmt: dict[str, Any]) -> dict[str, Any]:
    """The models row, but for where its base files are (see expected_location)."""
    p = stmt["predicate"]
    _, model_id = _subject(stmt)
    row: dict[str, Any] = {"model_id": p["model_id"], "name": p["name"], "format": p["format"],
                           "created_at": p["registered_at"], "entry_idx": idx}
    if model_id != p["model_id"]:
        row["model_id"] = Check(lambda _: False, f"two model ids ({model_id} and {p['model_id']})")
    return row


def expected_location(model_idx: int, model: dict[str, Any], moves: dict[int, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(entry, {base_path, files}) for a models row: from the model's latest signed relocation
    (`moves`: at most one, entry -> statement), else from its model entry.

    Models registered before the model predicate carried `base_path` and `files` have neither
    signed; the two columns are then left out ({}), and the scan checks such a base against the
    model's file stats before it uses it as a reference.
    """
    for idx, stmt in moves.items():
        return idx, {"base_path": stmt["predicate"]["base_path"], "files": stmt["predicate"]["files"]}
    p = model["predicate"]
    if "base_path" not in p:
        return model_idx, {}
    return model_idx, {"base_path": p["base_path"], "files": p["files"]}


def expected_issued(idx: int, stmt: dict[str, Any]) -> dict[str, Any]:
    p = stmt["predicate"]
    name, digest = _subject(stmt)
    if "out_path" in p:
        out_path: Any = p["out_path"]
    else:  # issued before the predicate carried the whole path: the file name is signed
        out_path = Check(lambda v: isinstance(v, str) and Path(v).name == name, f"a path ending in {name}")
    if hashlib.sha256(canonical_json(p["files"])).hexdigest() != digest:
        digest_want: Any = Check(lambda _: False, "a files manifest that does not match its own digest")
    else:
        digest_want = digest
    return {"entry_idx": idx, "model_id": p["model_id"], "licensee_id": p["licensee_id"],
            "codeword_index": p["codeword_index"], "scheme": p["scheme"], "output_format": p["output_format"],
            "variant": p["variant"], "out_path": out_path, "digest": digest_want, "issued_at": p["issued_at"],
            "jurisdiction": p["jurisdiction"], "policy": p.get("policy")}


def row_scale_sha256(carriers: Iterable[tuple[str, str, Sequence[int], bytes]]) -> tuple[str, int, int]:
    """(digest, count, elements) of a carrier table given as (name, dtype, shape, row-scale bytes).

    The digest is the one add_model signs as `row_scale_sha256`.
    """
    table = hashlib.sha256()
    count = elements = 0
    for name, dtype, shape, scale in carriers:
        table.update(canonical_json([name, dtype, list(shape)]))
        table.update(scale)
        count += 1
        elements += int(np.prod(shape)) if len(shape) else 1
    return table.hexdigest(), count, elements


def check_carriers(model_id: str, model_name: str, stmt: dict[str, Any], idx: int,
                   rows: Sequence[Sequence[Any]]) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """Check a model's carrier rows (ordered by ordinal) against its signed model entry."""
    where = f"carriers of model {model_name} ({model_id[:16]})"
    parsed = []
    for i, row in enumerate(rows):
        r = dict(zip(CARRIER_COLUMNS, row, strict=True))
        at = f"carriers row ({model_id[:16]}, {r['name']})"
        if r["ordinal"] != i:
            raise TableMismatch(f"{at}: ordinal is {show(r['ordinal'])} but the signed entry {idx} "
                                f"has {len(rows)} carriers in order (expected {i})")
        try:
            shape = json.loads(r["shape"])
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise ValueError(shape)
        except (TypeError, ValueError):
            raise TableMismatch(f"{at}: shape {show(r['shape'])} is not a list of sizes "
                                f"(signed entry {idx})") from None
        if not isinstance(r["name"], str) or not isinstance(r["dtype"], str) or not isinstance(r["row_scale"], bytes):
            raise TableMismatch(f"{at}: a column has the wrong type (signed entry {idx})")
        parsed.append((r["name"], r["dtype"], tuple(shape), r["row_scale"]))
    p = stmt["predicate"]
    digest, count, elements = row_scale_sha256(parsed)
    if count != p["carriers"]:
        raise TableMismatch(f"{where}: {count} rows but the signed entry {idx} says {p['carriers']}")
    if elements != p["carrier_elements"]:
        raise TableMismatch(f"{where}: {elements} elements but the signed entry {idx} says {p['carrier_elements']}")
    if digest != p["row_scale_sha256"]:
        raise TableMismatch(f"{where}: row-scale table digest is {digest} but the signed entry {idx} "
                            f"says {p['row_scale_sha256']}")
    return parsed


# -- the compact summary of the log that checked reads use ---------------------------------------


@dataclass
class SignedIndex:
    """What the log says exists, in a few small dicts (no payloads kept).

    Built in one pass over every entry whose bytes were recomputed into the leaves of the
    latest signed checkpoint, so it is as trustworthy as that checkpoint.
    """

    size: int
    kinds: list[str] = field(default_factory=list)
    licensees: dict[str, tuple[int, str]] = field(default_factory=dict)  # id -> (entry, jurisdiction)
    models: dict[str, int] = field(default_factory=dict)  # model_id -> entry
    model_names: dict[str, str] = field(default_factory=dict)  # name -> model_id
    locations: dict[str, int] = field(default_factory=dict)  # model_id -> latest relocation entry
    issued: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # entry -> (model, licensee, time)

    def add(self, idx: int, stmt: Any) -> None:
        kind = statement_kind(stmt)
        self.kinds.append(kind)
        p = stmt.get("predicate") if isinstance(stmt, dict) else None
        if not isinstance(p, dict):
            return
        try:
            if kind == "licensee":
                self.licensees[p["licensee_id"]] = (idx, p["jurisdiction"])
            elif kind == "model":
                self.models[p["model_id"]] = idx
                self.model_names[p["name"]] = p["model_id"]
            elif kind == "model-relocation":
                self.locations[p["model_id"]] = idx
            elif kind == "issued-copy":
                self.issued[idx] = (p["model_id"], p["licensee_id"], p["issued_at"])
        except (KeyError, TypeError) as exc:
            raise RegistryError(f"entry {idx}: unreadable {kind} entry ({exc})") from None


# -- verify: every row of every table against the whole log ---------------------------------------


def verify_tables(db: Database, entries: Sequence[LogEntry]) -> None:
    """Re-derive every licensees, models, carriers and issued_copies row from the signed entries
    (already verified by verify_log) and raise TableMismatch at the first row that differs,
    is missing or has no entry. Tables are checked in that order, rows in entry order."""
    statements: dict[int, dict[str, Any]] = {}
    index = SignedIndex(len(entries))
    kinds = db.execute("SELECT idx, kind FROM entries ORDER BY idx")
    for entry, (idx, kind) in zip(entries, kinds, strict=False):
        stmt = json.loads(entry.payload)
        index.add(entry.idx, stmt)
        if idx != entry.idx or kind != index.kinds[-1]:
            raise TableMismatch(f"entries row idx={entry.idx}: kind is {show(kind)} but the signed entry "
                                f"{entry.idx} says {index.kinds[-1]}")
        if index.kinds[-1] in ("licensee", "model", "model-relocation", "issued-copy"):
            statements[entry.idx] = stmt
    try:
        _verify_licensees(db, index, statements)
        _verify_models(db, index, statements)
        _verify_issued(db, index, statements)
    except (KeyError, TypeError, IndexError) as exc:
        raise RegistryError(f"a signed entry lacks a field its table needs ({exc})") from None


def _by_entry(rows: Iterable[Sequence[Any]], columns: Sequence[str], key: str) -> dict[Any, dict[str, Any]]:
    return {r[columns.index(key)]: row_dict(columns, r) for r in rows}


def _verify_licensees(db: Database, index: SignedIndex, statements: dict[int, dict[str, Any]]) -> None:
    rows = db.execute(f"SELECT {', '.join(LICENSEE_COLUMNS)} FROM licensees ORDER BY entry_idx, id").fetchall()
    stored = _by_entry(rows, LICENSEE_COLUMNS, "id")
    for row in stored.values():
        signed = index.licensees.get(row["id"])
        where = f"licensees row id={show(row['id'])}"
        if signed is None:
            raise TableMismatch(f"{where}: no signed licensee entry has this id (an added row)")
        compare(where, row, expected_licensee(signed[0], statements[signed[0]]), signed[0])
    for lid, (idx, _) in sorted(index.licensees.items(), key=lambda kv: kv[1][0]):
        if lid not in stored:
            raise TableMismatch(f"licensees: no row for licensee {lid} of signed entry {idx} (a deleted row)")


def _verify_models(db: Database, index: SignedIndex, statements: dict[int, dict[str, Any]]) -> None:
    rows = db.execute(f"SELECT {', '.join(MODEL_COLUMNS)} FROM models ORDER BY entry_idx, model_id").fetchall()
    stored = _by_entry(rows, MODEL_COLUMNS, "model_id")
    for row in stored.values():
        where = f"models row model_id={show(row['model_id'])}"
        idx = index.models.get(row["model_id"])
        if idx is None:
            raise TableMismatch(f"{where}: no signed model entry has this model id (an added row)")
        compare(where, row, expected_model(idx, statements[idx]), idx)
        moved = index.locations.get(row["model_id"])
        at, location = expected_location(idx, statements[idx], {} if moved is None else {moved: statements[moved]})
        compare(where, row, location, at)
    for model_id, idx in sorted(index.models.items(), key=lambda kv: kv[1]):
        if model_id not in stored:
            raise TableMismatch(f"models: no row for model {model_id} of signed entry {idx} (a deleted row)")
    carrier_rows: dict[Any, list[Sequence[Any]]] = {}
    for r in db.execute(f"SELECT {', '.join(CARRIER_COLUMNS)} FROM carriers ORDER BY model_id, ordinal"):
        carrier_rows.setdefault(r[0], []).append(r)
    for model_id in carrier_rows:
        if model_id not in index.models:
            raise TableMismatch(f"carriers rows of model_id={show(model_id)}: no signed model entry has this id")
    for model_id, idx in sorted(index.models.items(), key=lambda kv: kv[1]):
        stmt = statements[idx]
        check_carriers(model_id, stmt["predicate"]["name"], stmt, idx, carrier_rows.get(model_id, []))


def _verify_issued(db: Database, index: SignedIndex, statements: dict[int, dict[str, Any]]) -> None:
    rows = db.execute(f"SELECT {', '.join(ISSUED_COLUMNS)} FROM issued_copies ORDER BY entry_idx").fetchall()
    for r in rows:
        row = row_dict(ISSUED_COLUMNS, r)
        where = f"issued_copies row entry_idx={show(row['entry_idx'])}"
        idx = row["entry_idx"]
        if idx not in index.issued:
            kind = index.kinds[idx] if isinstance(idx, int) and 0 <= idx < len(index.kinds) else ""
            what = f"a {kind} entry" if kind else "no entry"
            raise TableMismatch(f"{where}: signed entry {show(idx)} is {what}, not an issued copy (an added row)")
        compare(where, row, expected_issued(idx, statements[idx]), idx)
    stored = {r[0] for r in rows}
    for idx in sorted(index.issued):
        if idx not in stored:
            raise TableMismatch(f"issued_copies: no row for the issued copy of signed entry {idx} (a deleted row)")
