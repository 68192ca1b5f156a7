"""Case reports: a verified evidence bundle rendered as one self-contained HTML file for people.

The reader is a judge, general counsel or an export-control officer, not a CLI user. Following
forensic practice (ISO/IEC 27037 and 27042), the report states what was examined (hashes), with
which tool and version, by which method, with which error rates, what was found, the limits of
the finding, the chain of custody, and how anyone can repeat the check with only the bundle and
the lab's public key.

Nothing is rendered from a bundle that does not verify. Every string taken from the bundle is
HTML-escaped and its control characters are made visible. Innocent licensees appear only as
counts and statistics; a v1 bundle's `candidates` list (names of the top scorers) is never read.

    case = open_case(Path("evidence.json").read_bytes(), public_key, "evidence.json")
    write_report(case, Path("case.html"), force=False)
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import math
import re
import unicodedata
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from weightmark.bounded import MAX_PEM_BYTES, read_bounded
from weightmark.errors import InputFileError, UsageError
from weightmark.evidence import VerifiedEvidence, verify_bundle
from weightmark.fsutil import write_bytes_atomic
from weightmark.keys import key_id

REPORT_MARKER = "weightmark case report"
MARKER_TAG = f'<meta name="generator" content="{REPORT_MARKER}">'
PDF_MARKER = b"weightmark-case-report"
FORMATS = ("html", "pdf")
MEASURED_DATA = "false_accusations.json"
P = ParamSpec("P")
R = TypeVar("R")


# -- text for people --------------------------------------------------------------------------


def format_p(log10_p: float) -> str:
    """A p-value for people: 3.1e-07, or 10^-888.9 below what a double can hold."""
    if log10_p >= -300:
        p = 10.0**log10_p
        return "1" if p >= 0.9995 else f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"
    return f"10^{log10_p:.1f}"


def printable(value: object) -> str:
    """`value` as text with control and format characters (ANSI escapes, bidi overrides, NUL)
    spelled out as \\x1b or \\u202e, so a name cannot move the cursor or reorder what it shows."""
    text = str(value)
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") or ch == "\\":
            out.append("\\\\" if ch == "\\" else f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _e(value: object) -> str:
    """Bundle text for HTML: control characters made visible, then every markup character escaped."""
    return html.escape(printable(value), quote=True)


def country_name(code: str) -> str:
    import pycountry

    country = pycountry.countries.get(alpha_2=str(code))
    return country.name if country is not None else "unknown country code"


def _stat(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# -- the verified case ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A bundle that verified, with what the report needs to say where it came from."""

    source: str
    bundle_sha256: str
    bundle_bytes: int
    signer_key_id: str
    content: dict[str, Any]
    verified: VerifiedEvidence

    @property
    def version(self) -> int:
        return 2 if self.content.get("format") == "weightmark-evidence/v2" else 1

    @property
    def scan(self) -> dict[str, Any]:
        return self.verified.scan

    @property
    def parameters(self) -> dict[str, Any]:
        return _dict(self.content.get("parameters"))

    @property
    def accused(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(the scan's claim, the signed issued-copy predicate) per accused licensee."""
        return list(zip(self.scan.get("accused") or [], self.verified.accused, strict=True))

    def param(self, name: str, default: Any = None) -> Any:
        """A scan parameter: the v2 `parameters` block first, then the scan result itself."""
        value = self.parameters.get(name)
        return self.scan.get(name, default) if value is None else value

    @property
    def scheme(self) -> str:
        return str(self.param("scheme", "") or "")

    @property
    def tardos(self) -> bool:
        return self.scheme.startswith("tardos")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The lab's Ed25519 public key from a PEM file, or InputFileError naming the file."""
    data = read_bounded(path, MAX_PEM_BYTES, "public key")  # a FIFO or /dev/zero fails at once
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise InputFileError(path, "not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputFileError(path, "not an Ed25519 public key")
    return key


def open_case(data: bytes, public_key: Ed25519PublicKey, source: str = "bundle") -> Case:
    """Verify the bundle (EvidenceError, exit 3, when it does not) and hold it for rendering."""
    verified = verify_bundle(data, public_key, source)
    content = json.loads(data.decode("utf-8"))["bundle"]
    return Case(source, hashlib.sha256(data).hexdigest(), len(data), key_id(public_key), content, verified)


def measured_false_accusations() -> dict[str, Any]:
    """The false-accusation measurements shipped with the package (from `make eval`)."""
    text = resources.files("weightmark").joinpath("data", MEASURED_DATA).read_text(encoding="utf-8")
    return json.loads(text)


# -- the finding in words ---------------------------------------------------------------------


def _accused_phrase(claim: dict[str, Any]) -> str:
    code = str(claim.get("jurisdiction", ""))
    return (f"{printable(claim.get('name', ''))} (licensee {printable(claim.get('licensee_id', ''))}, "
            f"jurisdiction {printable(code)}, {country_name(code)}; registry entry {claim.get('entry_id')})")


def finding(case: Case) -> str:
    """The finding in one sentence a non-specialist can read (plain text, already printable)."""
    family = case.param("family_size")
    over = f", over the {family} copies issued of this model" if family else ""
    threshold = case.param("threshold")
    if not case.accused:
        present = _dict(case.scan.get("watermark_present")).get("present")
        tail = " A watermark of this model's key is present nonetheless." if present else ""
        return (f"No licensee accused: no issued copy's score reached the accusation threshold "
                f"(family-wise p <= {threshold:g}){over}.{tail}")
    claims = [c for c, _ in case.accused]
    worst = max(float(c.get("log10_family_wise_p_value", 0.0)) for c in claims)
    chance = (f"the probability that a licensee who did not receive {'this copy' if len(claims) == 1 else 'these copies'} "
              f"scores this high is at most {format_p(worst)} (family-wise{over})")
    if len(claims) == 1:
        return (f"The examined checkpoint carries the watermark of the copy issued to "
                f"{_accused_phrase(claims[0])}; {chance}.")
    names = "; ".join(_accused_phrase(c) for c in claims)
    return (f"The examined checkpoint carries the watermarks of {len(claims)} issued copies, mixed together: "
            f"{names}; for each, {chance}.")


def _renderable(fn: Callable[Concatenate[Case, P], R]) -> Callable[Concatenate[Case, P], R]:
    """A signed bundle whose fields have unexpected types is refused with one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(case: Case, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(case, *args, **kwargs)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
            raise InputFileError(case.source, f"verifies, but a field cannot be shown ({type(exc).__name__}: "
                                              f"{printable(exc)})") from None

    return wrapper


@_renderable
def summary_lines(case: Case) -> list[str]:
    """The report's summary as plain terminal lines (for `weightmark evidence show`)."""
    scan = case.scan
    lines = [f"Evidence bundle: {printable(case.source)} (sha256 {case.bundle_sha256})",
             f"Verified: signed by lab key {case.signer_key_id}; log {printable(case.verified.origin)} "
             f"of {case.verified.tree_size} entries",
             f"Finding:  {finding(case)}"]
    for claim, predicate in case.accused:
        lines.append(f"ACCUSED:  {_accused_phrase(claim)}, issued {printable(predicate.get('issued_at', '?'))}")
        lines.append(f"          score {float(claim['score']):.1f}, p = {format_p(float(claim['log10_p_value']))}, "
                     f"family-wise p = {format_p(float(claim['log10_family_wise_p_value']))}")
    examined = _dict(case.content.get("examined"))
    if examined:
        lines.append(f"Examined: {printable(examined.get('path', '?'))} ({printable(examined.get('format', '?'))}, "
                     f"{_size(int(examined.get('total_bytes', 0)))})")
        for f in _list(examined.get("files")):
            lines.append(f"          {printable(f.get('path'))}  sha256 {printable(f.get('sha256'))}  {int(f.get('size', 0)):,} bytes")
    else:
        lines.append(f"Examined: {printable(scan.get('suspect', '?'))} (file hashes not recorded in a v1 bundle)")
    lines.append(f"Model:    {printable(case.param('model', '?'))} ({printable(case.param('model_id', '?'))})")
    lines.append(f"Method:   {printable(case.param('mode', '?'))} scan, scheme {printable(case.scheme)}, "
                 f"threshold {case.param('threshold')}, {case.param('family_size')} issued codewords")
    present = _dict(scan.get("watermark_present"))
    if present:
        lines.append(f"Watermark of this model's key present: {'yes' if present.get('present') else 'not shown'} "
                     f"(p = {format_p(float(present.get('log10_p_value', 0)))})")
    if warning := _reference_warning(case):
        lines.append(f"WARNING:  {warning}")
    innocents = _dict(scan.get("innocents"))
    if innocents:
        lines.append(f"Innocents: {innocents.get('count')} codewords (counts only), highest score "
                     f"{_stat(innocents.get('score_max'))}")
    tool = _dict(case.content.get("tool"))
    if tool:
        lines.append(f"Tool:     {printable(tool.get('name'))} {printable(tool.get('version'))} "
                     f"(Python {printable(tool.get('python'))}, numpy {printable(tool.get('numpy'))}, "
                     f"numba {printable(tool.get('numba'))})")
    lines.append(f"Created:  {printable(case.content.get('created_at', '?'))}")
    return lines


# -- HTML -------------------------------------------------------------------------------------

_CSS = """
@page { size: auto; margin: 16mm 15mm 18mm 15mm;
  @bottom-right { content: "page " counter(page) " of " counter(pages); font: 8pt sans-serif; color: #555; } }
:root { --ink: #1b1f24; --muted: #5a6270; --rule: #c9ced6; --accent: #1f4e79; --alarm: #b3261e; }
* { box-sizing: border-box; }
html { font: 10.5pt/1.45 "DejaVu Serif", Georgia, "Times New Roman", serif; color: var(--ink); }
body { margin: 0 auto; max-width: 180mm; padding: 10mm 6mm; background: #fff; }
h1 { font: 600 19pt/1.2 "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 0 0 2mm; color: var(--accent); }
h2 { font: 600 13pt/1.3 "DejaVu Sans", Helvetica, Arial, sans-serif; color: var(--accent);
  border-bottom: 1.5pt solid var(--accent); padding-bottom: 1mm; margin: 8mm 0 3mm; }
h3 { font: 600 10.5pt "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 5mm 0 2mm; }
p { margin: 0 0 2.5mm; }
.sub { color: var(--muted); font: 9pt "DejaVu Sans", Helvetica, Arial, sans-serif; margin-bottom: 6mm; }
.finding { border: 1.5pt solid var(--accent); border-left-width: 5pt; padding: 3mm 4mm; margin: 4mm 0;
  font-size: 11.5pt; background: #f4f7fb; }
.finding.accused { border-color: var(--alarm); background: #fbf3f2; }
table { border-collapse: collapse; width: 100%; margin: 2mm 0 4mm;
  font: 8.5pt/1.35 "DejaVu Sans", Helvetica, Arial, sans-serif; }
th, td { text-align: left; vertical-align: top; padding: 1.2mm 2mm; border-bottom: 0.6pt solid var(--rule); }
th { background: #eef1f5; font-weight: 600; }
table.kv th { width: 32%; background: none; }
tr { break-inside: avoid; }
thead { display: table-header-group; }
code, .hash, pre { font: 8pt/1.35 "DejaVu Sans Mono", Menlo, Consolas, monospace; }
.hash { word-break: break-all; }
.id { font: 8pt/1.35 "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: nowrap; }
pre { white-space: pre-wrap; word-break: break-all; background: #f6f7f9; border: 0.6pt solid var(--rule);
  padding: 2mm 3mm; margin: 2mm 0 4mm; }
figure { margin: 4mm 0; break-inside: avoid; page-break-inside: avoid; }
figure img { display: block; width: 100%; height: auto; max-height: 210mm; object-fit: contain; }
figcaption { font: 8.5pt/1.35 "DejaVu Sans", Helvetica, Arial, sans-serif; color: var(--muted); margin-top: 1.5mm; }
.note { color: var(--muted); font-size: 9.5pt; }
.absent { color: var(--muted); font-style: italic; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
section { break-before: page; page-break-before: always; }
section.first { break-before: auto; page-break-before: auto; }
ul { margin: 0 0 3mm 5mm; padding-left: 4mm; }
@media print {
  body { max-width: none; padding: 0; }
  a { color: inherit; text-decoration: none; }
}
"""


class _Html:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, *chunks: str) -> None:
        self.parts.extend(chunks)

    def kv(self, rows: Iterable[tuple[str, str]]) -> None:
        """A two-column table; keys are ours (plain), values are already-escaped HTML."""
        self.add('<table class="kv"><tbody>')
        for key, value in rows:
            self.add(f"<tr><th>{html.escape(key)}</th><td>{value}</td></tr>")
        self.add("</tbody></table>")

    def table(self, head: list[str], rows: Iterable[list[str]], numeric: Iterable[int] = ()) -> None:
        nums = set(numeric)
        self.add("<table><thead><tr>", *(f"<th>{html.escape(h)}</th>" for h in head), "</tr></thead><tbody>")
        for row in rows:
            self.add("<tr>", *(f'<td class="num">{c}</td>' if i in nums else f"<td>{c}</td>" for i, c in enumerate(row)),
                     "</tr>")
        self.add("</tbody></table>")

    def figure(self, svg: bytes, alt: str, caption: str) -> None:
        data = base64.b64encode(svg).decode("ascii")
        self.add(f'<figure><img src="data:image/svg+xml;base64,{data}" alt="{html.escape(alt)}">'
                 f"<figcaption>{caption}</figcaption></figure>")

    def absent(self, what: str) -> None:
        self.add(f'<p class="absent">{html.escape(what)}</p>')


def _code(value: object) -> str:
    return f'<span class="hash">{_e(value)}</span>'


def _pre(text: str) -> str:
    """Preformatted bundle text: line breaks kept, everything else escaped."""
    return "<pre>" + "\n".join(_e(line) for line in text.rstrip("\n").split("\n")) + "</pre>"


def _labels(case: Case) -> list[str]:
    return [f"A{i + 1}" for i in range(len(case.accused))]


@_renderable
def render_html(case: Case, measured: dict[str, Any] | None = None) -> str:
    """The whole report as one HTML document: no external resources, figures as data: URIs."""
    if measured is None:
        measured = measured_false_accusations()
    out = _Html()
    title = "Forensic case report: tracing a model checkpoint to its licensee"
    out.add("<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', MARKER_TAG,
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>")
    out.add(f"<h1>{html.escape(title)}</h1>")
    out.add(f'<div class="sub">Evidence bundle <span class="hash">{case.bundle_sha256}</span> (sha256), '
            f"created {_e(case.content.get('created_at', '?'))}, signed by lab key {_e(case.signer_key_id)}; "
            f"verified before rendering. Bundle format {_e(case.content.get('format'))}.</div>")
    _summary(out, case)
    _examined(out, case)
    _method(out, case)
    _results(out, case)
    _error_rates(out, case, measured)
    _limitations(out, case)
    _custody(out, case)
    _verify(out, case)
    out.add("</body></html>\n")
    return "".join(out.parts)


def _summary(out: _Html, case: Case) -> None:
    out.add('<section class="first"><h2>1. Summary</h2>')
    cls = "finding accused" if case.accused else "finding"
    out.add(f'<p class="{cls}">{html.escape(finding(case))}</p>')
    if case.accused:
        rows = []
        for label, (claim, predicate) in zip(_labels(case), case.accused, strict=True):
            code = str(claim.get("jurisdiction", ""))
            rows.append([label, _e(claim.get("name")), f'<span class="id">{_e(claim.get("licensee_id"))}</span>',
                         f"{_e(code)} ({_e(country_name(code))})", _e(claim.get("entry_id")),
                         _e(predicate.get("issued_at", "?")),
                         _e(format_p(float(claim["log10_family_wise_p_value"])))])
        out.table(["", "Accused licensee", "Licensee id", "Jurisdiction", "Registry entry", "Copy issued",
                   "Family-wise p"], rows)
        out.add('<p class="note">Each accused entry is a signed record of the lab\'s registry; its signature, its '
                "place in the append-only log and the log's signed checkpoint were verified (section 7).</p>")
    present = _dict(case.scan.get("watermark_present"))
    if present:
        out.add(f"<p>Is a watermark of this model's key present at all (whoever it was issued to)? "
                f"<b>{'Yes' if present.get('present') else 'Not shown'}</b>: chi-square statistic "
                f"{float(present.get('statistic', 0)):.1f} on {_e(present.get('degrees_of_freedom'))} degrees of "
                f"freedom, p = {_e(format_p(float(present.get('log10_p_value', 0))))}.</p>")
    if case.scan.get("summary"):
        out.add(f"<p class=\"note\">The scan's own summary: {_e(case.scan['summary'])}</p>")
    out.add("</section>")


def _examined(out: _Html, case: Case) -> None:
    out.add('<section><h2>2. What was examined</h2>')
    examined = _dict(case.content.get("examined"))
    if examined:
        out.kv([("Suspect checkpoint", _code(examined.get("path"))),
                ("Format found", _e(examined.get("format"))),
                ("Total size", f"{int(examined.get('total_bytes', 0)):,} bytes ({_size(int(examined.get('total_bytes', 0)))})")])
        out.add("<h3>Files, by content hash</h3>")
        out.table(["File", "SHA-256", "Size (bytes)"],
                  ([_code(f.get("path")), _code(f.get("sha256")), f"{int(f.get('size', 0)):,}"]
                   for f in _list(examined.get("files"))), numeric=[2])
    else:
        out.kv([("Suspect checkpoint", _code(case.scan.get("suspect"))), ("Format found", _e(case.scan.get("format", "?")))])
        out.absent("This is a v1 bundle: it does not record the examined files' hashes or sizes. Hash the files "
                   "yourself (sha256sum) before relying on their identity.")
    out.add("<h3>Model and reference</h3>")
    reference = _dict(case.content.get("reference"))
    ref_status = {"ok": "the registered unstamped base, found and unchanged", "given": "given by the investigator",
                  "missing": "the registered base could not be found", "changed": "the registered base has changed",
                  "none": "no reference (blind scan)"}
    rows = [("Registered model", f"{_e(case.param('model'))}"), ("Model id (sha256 of its tensor manifest)", _code(case.param("model_id")))]
    if reference:
        status = str(reference.get("status"))
        rows.append(("Reference weights", f"{_e(ref_status.get(status, status))}"
                     + (f": {_code(reference.get('path'))}" if reference.get("path") else "")))
        if reference.get("model_id"):
            rows.append(("Reference model id", _code(reference.get("model_id"))))
    else:
        rows.append(("Reference weights", _e(case.scan.get("reference") or "none (blind scan)")))
    rows.append(("Examined at (bundle created)", _e(case.content.get("created_at", "?"))))
    out.kv(rows)
    out.add("<h3>Tool</h3>")
    tool = _dict(case.content.get("tool"))
    if tool:
        labels = {"name": "Program", "version": "Version", "python": "Python", "numpy": "numpy",
                  "numba": "numba", "platform": "Platform"}
        out.kv([(label, _e(tool[k])) for k, label in labels.items() if k in tool])
    else:
        out.absent("This is a v1 bundle: it does not record the tool's version or platform.")
    out.add("</section>")


def _alpha_words(case: Case) -> str:
    found = re.search(r"(?:^|;)alpha=([0-9.eE+-]+)(?:;|$)", case.scheme)
    return f"a fraction alpha = {html.escape(found.group(1))}" if found else "a small fraction"


def _reference_warning(case: Case) -> str | None:
    reference = _dict(case.content.get("reference"))
    status = reference.get("status")
    if status in ("missing", "changed"):
        return (f"The registered base weights were {'missing' if status == 'missing' else 'changed since registration'}"
                f" at {printable(reference.get('path'))}: this scan ran blind, with much less power.")
    return None


def _method(out: _Html, case: Case) -> None:
    out.add('<section><h2>3. Method</h2>')
    out.add("<p>Before it handed out each copy of the model, the lab added to its weights a faint pattern that "
            "is different for every licensee: a secret sequence of +1 and -1 values (the licensee's "
            f"<i>codeword</i>), spread over millions of weights, each weight nudged by {_alpha_words(case)} of "
            "its row's typical size. The pattern does not change what the model does in any noticeable way, and "
            "it survives re-quantization, format conversion and mixing of copies. The lab records in a signed, "
            "append-only registry which codeword went to which licensee.</p>")
    out.add("<p>The scan subtracts the unstamped base weights from the suspect (a <i>non-blind</i> scan) or works "
            "on the suspect alone (a <i>blind</i> scan), and measures for each of the codeword's positions how "
            "strongly the nudges point up or down: one statistic <i>z</i> per position, which follows a standard "
            "normal distribution when the checkpoint carries no watermark of this key. Each issued codeword then "
            "gets a <i>score</i>: how well it agrees with the observed z values.</p>")
    if case.tardos:
        bound = ("The codes are Tardos fingerprinting codes (secret per-position biases), built to catch "
                 "several licensees who mix their copies. Given the biases and the observed z, an innocent "
                 "licensee's codeword is independent of z, so its score is a sum of independent bounded terms; "
                 "the exact Chernoff bound of that sum (the best exponential bound, computed from the actual z and "
                 "biases) is the p-value reported: P(innocent score &ge; s) &le; min over &lambda; of "
                 "exp(K(&lambda;) &minus; &lambda;s). It holds whatever the weights and whatever was done to "
                 "them, because it rests only on the innocent's codeword being random and secret.")
    else:
        bound = ("The codes are uniform random &plusmn;1 codewords. The score is the codeword's correlation with "
                 "the normalised z, S = c&middot;z/&#8214;z&#8214;. An innocent licensee's codeword is uniform and "
                 "independent of z, so by Hoeffding's inequality P(S &ge; t) &le; exp(&minus;t&sup2;/2), whatever "
                 "z is: that bound is the p-value reported.")
    out.add(f"<p>{bound}</p>")
    out.add("<p>The <i>family-wise</i> p-value multiplies by the number of issued codewords scored (Bonferroni: "
            "valid whatever the dependence between scores), so that checking many licensees cannot produce an "
            "accusation by chance. A licensee is accused only when the family-wise p-value is at or below the "
            "threshold.</p>")
    rows = [("Scan mode", _e(case.param("mode"))),
            ("Scheme (every parameter of the watermark)", _code(case.scheme or "not recorded")),
            ("Statistic", _e("soft Tardos score with the exact Chernoff bound" if case.tardos
                             else "normalised correlation with the Hoeffding bound")),
            ("Issued codewords scored (family size)", _e(case.param("family_size"))),
            ("Threshold (family-wise p at most)", _e(case.param("threshold"))),
            ("Licensees assumed for the correction", _e(case.param("assume_licensees", "not recorded"))),
            ("Registered models tried", _e(case.param("models_tried", "not recorded")))]
    if case.param("models_considered") is not None:
        rows.append(("Candidate models covered by the correction", _e(case.param("models_considered"))))
    missing = _list(case.param("missing_shards"))
    if missing:
        rows.append(("Shards listed by the suspect but absent", "<br>".join(_code(m) for m in missing)))
    carriers = _dict(case.scan.get("carriers"))
    used = case.param("carriers_used", carriers.get("used"))
    registered = case.param("carriers_registered", carriers.get("registered"))
    rows.append(("Carrier tensors used / registered", f"{_e(used)} / {_e(registered)}"))
    if case.param("elements_used") is not None:
        rows.append(("Weights read", f"{int(case.param('elements_used')):,}"))
    rows.append(("Re-alignment to the reference", _e({True: "on", False: "off"}.get(case.param("realign"), "not recorded"))))
    out.kv(rows)
    aligned = _list(case.param("aligned"))
    out.add("<h3>Alignment steps undone</h3>")
    if aligned:
        out.add("<ul>", *(f"<li>{_e(a)}</li>" for a in aligned), "</ul>")
    else:
        out.add("<p>None: the suspect's tensors lined up with the reference as they were.</p>")
    skipped = _list(case.param("carriers_skipped", carriers.get("skipped")))
    out.add("<h3>Carriers skipped</h3>")
    if skipped:
        out.add("<ul>", *(f"<li>{_e(s)}</li>" for s in skipped), "</ul>")
    else:
        out.add("<p>None: every registered carrier tensor was read.</p>")
    out.add("</section>")


def _results(out: _Html, case: Case) -> None:
    from weightmark import report_figures as figs

    out.add('<section><h2>4. Results</h2>')
    labels = _labels(case)
    if case.accused:
        out.table(["", "Accused licensee", "Codeword", "Score", "p", "Family-wise p"],
                  ([label, _e(claim.get("name")), _e(claim.get("codeword_index", "?")),
                    f"{float(claim['score']):.2f}", _e(format_p(float(claim["log10_p_value"]))),
                    _e(format_p(float(claim["log10_family_wise_p_value"])))]
                   for label, (claim, _) in zip(labels, case.accused, strict=True)), numeric=[3])
    innocents = _dict(case.scan.get("innocents"))
    if innocents:
        out.add(f"<p>The other {int(innocents.get('count', 0)):,} issued codewords (licensees not accused, shown "
                f"only as numbers): highest score {_stat(innocents.get('score_max'))}, mean "
                f"{_stat(innocents.get('score_mean'))}, standard deviation {_stat(innocents.get('score_std'))}.</p>")
    marks = [figs.Mark(label, float(c["score"]), float(c["log10_p_value"]))
             for label, (c, _) in zip(labels, case.accused, strict=True)]
    curve = _list(case.scan.get("bound_curve"))
    if not curve and not case.tardos and marks:
        top = max(m.score for m in marks) * 1.1
        curve = [[s, -s * s / 2 / math.log(10)] for s in (top * i / 200 for i in range(201))]
    threshold, family = case.param("threshold"), case.param("family_size")
    factor = max(1, int(family or 0)) * max(1, int(case.param("models_considered", 1) or 1))
    line = math.log10(float(threshold)) - math.log10(factor) if threshold else None
    if innocents or marks:
        out.figure(figs.scores_figure([float(s) for s in _list(innocents.get("scores"))], marks, curve, line),
                   "Scores of the issued codewords and the innocents' bound",
                   "Figure 1. Top: the score of every issued codeword; licensees not accused appear only as counts, "
                   "the accused (A1...) as red lines. Bottom: the bound on the p-value of a licensee who did not "
                   "leak, as a function of the score; a codeword is accused only below the dashed line."
                   + ("" if innocents else " This v1 bundle records no innocents' scores: only the accused are drawn."))
    z = _list(case.scan.get("z"))
    if z:
        out.figure(figs.z_figure([float(v) for v in z]), "z statistics against the standard normal",
                   "Figure 2. The z statistic of every code position against the standard normal N(0,1) it follows "
                   "when no watermark of this key is present. A watermark shows as extra spread: the tails move "
                   "off the dashed line of the QQ plot.")
    else:
        out.absent("The z statistics are not recorded in this bundle (v1): no z figure.")
    signal = _list(case.scan.get("carrier_signal"))
    if signal and case.accused:
        out.figure(figs.carrier_figure([str(c.get("name")) for c in signal],
                                       [[float(v) for v in _list(c.get("scores"))] for c in signal], labels),
                   "Each accused codeword's score per carrier tensor",
                   "Figure 3. Each accused codeword scored on every carrier tensor alone. A tensor that does not "
                   "carry the codeword gives a score of about N(0,1), inside the grey band; the mark shows in "
                   "tensor after tensor, spread through the whole model. An illustration, not a p-value.")
        out.table(["Carrier tensor", "Weights", *labels],
                  ([_code(c.get("name")), f"{int(c.get('elements', 0)):,}",
                    *(f"{float(v):.2f}" for v in _list(c.get("scores")))] for c in signal),
                  numeric=range(1, 2 + len(labels)))
    elif case.accused:
        out.absent("The signal per carrier tensor is not recorded in this bundle (v1): no carrier figure.")
    out.add("</section>")


def _error_rates(out: _Html, case: Case, measured: dict[str, Any]) -> None:
    out.add('<section><h2>5. Error rates</h2>')
    threshold = case.param("threshold")
    out.add(f"<p><b>Guarantee.</b> For any licensee who did not leak, the probability of being accused is at most "
            f"the threshold, {_e(threshold)}, whatever was done to the weights: the bound in section 3 holds for "
            f"every value of the observed statistics, and the family-wise correction covers every issued "
            f"codeword scored. The bound is conservative (the true chance is smaller), never optimistic.</p>")
    rows = _list(measured.get("rows"))
    out.add(f"<p><b>Measured.</b> {int(measured.get('codewords_per_scan', 0)):,} codewords that were never issued "
            f"were scored against real scans of {_e(measured.get('model'))}, with the same score and bound as "
            f"issued codewords; a valid bound keeps the share of p-values at or below 10<sup>x</sup> under "
            f"10<sup>x</sup>. Measured on {_e(measured.get('measured_on'))} with weightmark "
            f"{_e(measured.get('weightmark_version'))} ({_e(measured.get('source'))}).</p>")
    if rows:
        levels = _list(rows[0].get("thresholds"))
        head = ["Scan", *(f"share p \u2264 1e{float(x):g}" for x in levels), "Lowest p", "Under the bound"]
        body = [["<b>bound</b>", *(f"{float(b):.0e}" for b in _list(rows[0].get("bound"))), "", ""]]
        for r in rows:
            body.append([_e(r.get("scan")), *(f"{float(v):.1e}" for v in _list(r.get("observed"))),
                         _e(format_p(float(r.get("min_log10_p", 0)))), "yes" if r.get("consistent") else "<b>NO</b>"])
        out.table(head, body, numeric=range(1, len(levels) + 2))
        measured_scheme = str(rows[0].get("scheme", ""))
        note = f"Scheme measured: {_code(measured_scheme)}."
        if all(float(r.get("min_log10_family_wise_p", -1)) >= 0 for r in rows):
            note += " No family-wise p-value of a never-issued codeword fell below 1 in any of these scans."
        if case.scheme and case.scheme != measured_scheme:
            note += (f" This scan used {_code(case.scheme)}: the guarantee above holds for it, but these "
                     "measured figures are for the scheme measured.")
        out.add(f'<p class="note">{note}</p>')
    out.add("</section>")


def _limitations(out: _Html, case: Case) -> None:
    out.add('<section><h2>6. Limitations</h2><ul>')
    if warning := _reference_warning(case):
        out.add(f"<li><b>{html.escape(warning)}</b></li>")
    mode = case.param("mode")
    blind_note = (" <b>This scan was blind.</b>" if mode == "blind" else "")
    out.add(f"<li>Blind scans (without the unstamped base) see the base weights themselves as noise: their "
            f"scores are several times smaller than non-blind ones, so a blind scan can miss a leak that a "
            f"non-blind one finds. It cannot produce a false accusation more easily: the bound is the same.{blind_note}</li>")
    out.add("<li>Attacks not evaluated: distillation into another model, training a new model on this one's "
            "outputs, heavy fine-tuning far beyond the evaluated runs, pruning of whole layers or heads, and "
            "architectural surgery. A stamp that did not survive such a transformation gives no accusation, "
            "never a wrong one; robustness figures are in benchmarks/results/ of the weightmark source.</li>")
    out.add("<li>A score names the copy the weights came from, not who leaked it: a licensee's copy may have been "
            "stolen from them. The registry records to whom it was issued and when.</li>")
    out.add("<li>Several copies mixed together (collusion) lower each colluder's score; codes are sized for a "
            "stated number of colluders (the scheme's c), beyond which some colluders may go unnamed.</li>")
    if case.version == 1:
        out.add("<li>This is a v1 bundle: it does not record the examined files' hashes, the tool's version, the "
                "innocents' scores, the z statistics or the per-carrier signal; those parts of the report are "
                "absent.</li>")
    out.add("</ul></section>")


def _custody(out: _Html, case: Case) -> None:
    out.add('<section><h2>7. Chain of custody</h2>')
    out.add(f"<p>The whole bundle (scan result, registry entries, proofs, checkpoint, trust file) is signed by "
            f"the lab's Ed25519 key {_e(case.signer_key_id)}; the signature covers its canonical bytes, so a "
            f"single changed byte makes it fail. This report was rendered only after that check, and after each "
            f"registry entry's own signature, its inclusion proof and the checkpoint were verified.</p>")
    for label, claim_pair, accusation in zip(_labels(case), case.accused, _list(case.content.get("accusations")),
                                             strict=False):
        claim, predicate = claim_pair
        env = _dict(accusation.get("envelope"))
        sig = _dict((_list(env.get("signatures")) or [{}])[0])
        payload = base64.b64decode(str(env.get("payload", "")))
        out.add(f"<h3>{label}: registry entry {_e(accusation.get('entry_index'))}, issued copy for {_e(claim.get('name'))}</h3>")
        rows = [("Payload type", _code(env.get("payloadType"))),
                ("Signed statement (sha256 of the payload)", _code(hashlib.sha256(payload).hexdigest())),
                ("Signing key id", _code(sig.get("keyid"))),
                ("Issued at", _e(predicate.get("issued_at", "?"))),
                ("Codeword index", _e(predicate.get("codeword_index", claim.get("codeword_index")))),
                ("Scheme", _code(predicate.get("scheme", "?")))]
        out.kv(rows)
        proof = _list(accusation.get("inclusion_proof"))
        out.add(f"<p>Inclusion proof ({len(proof)} hashes, RFC 6962) of entry {_e(accusation.get('entry_index'))} "
                f"in the log of {_e(case.content.get('tree_size'))} entries:</p>")
        out.add("<pre>" + ("\n".join(_e(h) for h in proof) or "(none: the log holds this entry alone)") + "</pre>")
    out.add(f"<h3>Checkpoint (signed note, log of {_e(case.content.get('tree_size'))} entries)</h3>")
    out.add(_pre(str(case.content.get("checkpoint", ""))))
    trust = _dict(case.content.get("trust"))
    out.add("<h3>Keys the log chains to (trust file)</h3>")
    out.add(_pre(json.dumps(trust, indent=1, sort_keys=True, ensure_ascii=False)))
    out.add("</section>")


def _verify(out: _Html, case: Case) -> None:
    out.add('<section><h2>8. How to verify independently</h2>')
    out.add("<p>Needed: this bundle, the lab's public key (LAB.pub, obtained from the lab through a channel you "
            "trust) and weightmark (pip install weightmark). No database, no network, no secret.</p>")
    examined = _dict(case.content.get("examined"))
    lines = ["# 1. The bundle is the one this report was made from",
             f"sha256sum BUNDLE.json        # expect {case.bundle_sha256}",
             "# 2. Signatures, inclusion proofs, checkpoint and claims (exit 0 = verified)",
             "weightmark evidence verify BUNDLE.json --pubkey LAB.pub",
             "weightmark evidence show BUNDLE.json --pubkey LAB.pub",
             "# 3. Re-render this report from the bundle",
             "weightmark report BUNDLE.json --out case.html --pubkey LAB.pub"]
    if examined:
        lines += ["# 4. The suspect files are exactly the ones examined (every file's sha256 and size)",
                  "weightmark evidence verify BUNDLE.json --pubkey LAB.pub --suspect SUSPECT",
                  "# or by hand, inside the suspect folder:"]
        lines += [f"sha256sum {printable(f.get('path'))}   # expect {printable(f.get('sha256'))}"
                  for f in _list(examined.get("files"))]
    lines += ["# 5. With the lab's registry (the lab or an auditor): repeat the scan itself",
              f"weightmark scan SUSPECT{' --blind' if case.param('mode') == 'blind' else ''} --json"]
    out.add("<pre>" + html.escape("\n".join(lines)) + "</pre>")
    out.add(f"<p class=\"note\">Fingerprint of the key that must verify it: key id {_e(case.signer_key_id)} (the "
            "first 4 bytes of the SHA-256 of the raw public key, as in C2SP signed notes).</p>")
    out.add("</section>")


# -- writing ----------------------------------------------------------------------------------


def is_report(path: Path) -> bool:
    """True when `path` is a case report this module wrote (HTML meta tag or PDF creator)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    return MARKER_TAG.encode() in head or (head.startswith(b"%PDF") and _pdf_is_ours(path))


def _pdf_is_ours(path: Path, max_bytes: int = 64 << 20) -> bool:
    """A PDF whose document information (in a compressed object stream) names us as Creator."""
    needle = b"/Creator (" + PDF_MARKER + b")"
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes)
    except OSError:
        return False
    if needle in data:
        return True
    for found in re.finditer(rb"stream\r?\n", data):
        try:
            chunk = zlib.decompressobj().decompress(data[found.end():found.end() + (8 << 20)], 4 << 20)
        except zlib.error:
            continue
        if needle in chunk:
            return True
    return False


def _weasyprint() -> Any:
    try:
        import weasyprint
    except (ImportError, OSError):
        raise UsageError("--format pdf needs WeasyPrint (pip install 'weightmark[pdf]', and pango from the "
                         "system); or open the HTML report in a browser and print it") from None
    return weasyprint


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"unknown report format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "pdf":
        _weasyprint()


def render(case: Case, fmt: str = "html") -> bytes:
    """The report's bytes in `fmt` ("html", or "pdf" where WeasyPrint is installed)."""
    _check_format(fmt)
    document = render_html(case)
    if fmt == "html":
        return document.encode("utf-8")
    # WeasyPrint writes the generator meta tag as the PDF's Creator, which is_report looks for.
    pdf = _weasyprint().HTML(string=document.replace(REPORT_MARKER, PDF_MARKER.decode())).write_pdf()
    return bytes(pdf)


def write_report(case: Case, out: Path, force: bool = False, fmt: str = "html") -> Path:
    """Write the report to `out` atomically; never over a file unless `force` and it is one of ours."""
    _check_format(fmt)
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise InputFileError(out, "already exists; pass --force to replace an earlier report")
        if not out.is_file() or not is_report(out):
            raise InputFileError(out, "exists and is not a weightmark case report; refusing to replace it")
    data = render(case, fmt)
    write_bytes_atomic(out, data, mode=0o644)
    return out
