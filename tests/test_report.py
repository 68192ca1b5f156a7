"""Case reports and `evidence show`, rendered from real scans of the real MiniLM through the CLI."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.report_cases import Cases, build_cases
from weightmark.cli.common import format_p as cli_format_p
from weightmark.keys import PUBLIC_KEY_FILE
from weightmark.report import MARKER_TAG, format_p, measured_false_accusations, printable

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Cases:
    return build_cases(tmp_path_factory.mktemp("report"), minilm)


def _report(cases: Cases, label: str, out: Path, *extra: str):
    return run_cli("report", str(cases.bundles[label].path), "--out", str(out), "--pubkey", str(cases.pub), *extra)


@pytest.fixture(scope="module")
def rendered(cases: Cases) -> dict[str, Path]:
    """Each bundle's report, written once by the real CLI."""
    out = {}
    for label in cases.bundles:
        out[label] = cases.work / f"{label}.html"
        result = _report(cases, label, out[label])
        assert result.returncode == 0, result.stderr
        assert "Case report written to" in result.stderr and result.stdout == ""
    return out


def _images(document: str) -> list[bytes]:
    import base64

    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', document)]


@pytest.mark.parametrize("label,accused_count", [("q4", 1), ("collusion", 3), ("blind", 1), ("none", 0), ("hostile", 1)])
def test_report_of_a_real_scan(cases: Cases, rendered: dict[str, Path], label: str, accused_count: int) -> None:
    bundle = cases.bundles[label]
    document = rendered[label].read_text(encoding="utf-8")
    assert document.startswith("<!DOCTYPE html>") and MARKER_TAG in document
    assert len(bundle.scan["accused"]) == accused_count == len(bundle.accused_names)
    for name in bundle.accused_names:
        assert html.escape(printable(name)) in document
    for claim in bundle.scan["accused"]:
        assert format_p(claim["log10_p_value"]) in document
        assert format_p(claim["log10_family_wise_p_value"]) in document
        assert claim["licensee_id"] in document
    # innocents appear as counts only: never a name or an id (v1 bundles list them as candidates)
    for name in bundle.innocent_names:
        assert html.escape(printable(name)) not in document and name not in document
    for lid in bundle.innocent_ids:
        assert lid not in document
    raw = bundle.path.read_text(encoding="utf-8")
    if '"format":"weightmark-evidence/v1"' in raw and bundle.innocent_ids:  # v1 bundles name top scorers
        assert any(lid in raw for lid in bundle.innocent_ids)
    if not accused_count:
        assert "No licensee accused" in document and "Accused licensee" not in document
    content = json.loads(raw)["bundle"]
    assert content["format"] == "weightmark-evidence/v2"
    files = content["examined"]["files"]
    assert files and all(f["sha256"] in document and f"{f['size']:,}" in document for f in files)
    assert content["tool"]["version"] in document and content["parameters"]["scheme"] in document
    # figures: scores with the bound and the z statistics always; the per-carrier signal when accused
    images = _images(document)
    assert len(images) == document.count("<img ") == (3 if accused_count else 2)
    assert all(img.startswith(b"<?xml") and b"<svg" in img for img in images)
    assert "not recorded" not in document.split("<h2>6.")[0]  # a v2 bundle leaves no gap before the limits


def test_report_is_self_contained_and_escaped(rendered: dict[str, Path]) -> None:
    document = rendered["hostile"].read_text(encoding="utf-8")
    # the accused's name is markup and terminal escapes: it must arrive as text
    assert "<script" not in document.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; \\x1b[31mRed\\u202e Ltd &amp; Co" in document
    assert "\x1b" not in document and "\u202e" not in document
    # nothing is fetched: no external URL in any src, href, CSS url() or @import
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)', document)
    assert "@import" not in document and not re.search(r"url\((?!data:)", document)
    for img in _images(document):
        svg = img.decode("utf-8")
        assert "<text" not in svg and "<image" not in svg  # fonts drawn as paths, nothing linked
        assert "xlink:href=\"http" not in svg and "href=\"http" not in svg


def test_report_is_deterministic(cases: Cases, rendered: dict[str, Path]) -> None:
    """The library, in this process, gives the same bytes as the CLI did in another."""
    from weightmark.report import load_public_key, open_case, render

    case = open_case(cases.bundles["collusion"].path.read_bytes(), load_public_key(cases.pub), "collusion.json")
    assert render(case) == rendered["collusion"].read_bytes()


def test_tampered_bundle_gets_no_report(cases: Cases, tmp_path: Path) -> None:
    data = bytearray(cases.bundles["q4"].path.read_bytes())
    at = data.index(b'"score":') + len(b'"score":') + 1
    data[at] = ord("7") if data[at] != ord("7") else ord("8")
    bad = tmp_path / "tampered.json"
    bad.write_bytes(bytes(data))
    out = tmp_path / "case.html"
    result = run_cli("report", str(bad), "--out", str(out), "--pubkey", str(cases.pub))
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(bad) in lines[0] and "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
    shown = run_cli("evidence", "show", str(bad), "--pubkey", str(cases.pub))
    assert shown.returncode == 3 and shown.stdout == ""


def test_wrong_key_gets_no_report(cases: Cases, tmp_path: Path) -> None:
    from weightmark import Lab

    other = Lab.init(tmp_path / "other-lab", passphrase=None)
    out = tmp_path / "case.html"
    result = run_cli("report", str(cases.bundles["q4"].path), "--out", str(out), "--pubkey",
                     str(other.home / PUBLIC_KEY_FILE))
    assert result.returncode == 3 and result.stderr.startswith("Error: ") and not out.exists()


def test_overwrite_rules(cases: Cases, rendered: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "case.html"
    out.write_bytes(rendered["q4"].read_bytes())
    first = out.read_bytes()
    again = _report(cases, "blind", out)
    assert again.returncode == 3 and "already exists; pass --force" in again.stderr and out.read_bytes() == first
    forced = _report(cases, "blind", out, "--force")
    assert forced.returncode == 0 and out.read_bytes() != first and MARKER_TAG.encode() in out.read_bytes()
    precious = tmp_path / "notes.html"
    precious.write_text("<html><body>my own notes</body></html>")
    refused = _report(cases, "q4", precious, "--force")
    assert refused.returncode == 3 and "not a weightmark case report" in refused.stderr
    assert precious.read_text() == "<html><body>my own notes</body></html>"


def test_public_key_from_the_lab_home(cases: Cases, tmp_path: Path) -> None:
    out = tmp_path / "case.html"
    result = run_cli("report", str(cases.bundles["q4"].path), "--out", str(out), home=cases.home)
    assert result.returncode == 0, result.stderr
    missing = run_cli("report", str(cases.bundles["q4"].path), "--out", str(tmp_path / "x.html"),
                      home=tmp_path / "nowhere")
    assert missing.returncode == 3 and "--pubkey" in missing.stderr


def test_evidence_show_prints_plain_escaped_text(cases: Cases) -> None:
    bundle = cases.bundles["hostile"]
    result = run_cli("evidence", "show", str(bundle.path), "--pubkey", str(cases.pub))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\u202e" not in result.stdout
    assert "<script>alert('x')</script> \\x1b[31mRed\\u202e Ltd & Co" in result.stdout
    claim = bundle.scan["accused"][0]
    assert f"family-wise p = {format_p(claim['log10_family_wise_p_value'])}" in result.stdout
    for name, lid in zip(bundle.innocent_names, bundle.innocent_ids, strict=True):
        assert name not in result.stdout and lid not in result.stdout
    for f in json.loads(bundle.path.read_bytes())["bundle"]["examined"]["files"]:
        assert f["sha256"] in result.stdout


def test_evidence_show_without_accusation(cases: Cases) -> None:
    result = run_cli("evidence", "show", str(cases.bundles["none"].path), "--pubkey", str(cases.pub))
    assert result.returncode == 0, result.stderr
    assert "Finding:  No licensee accused" in result.stdout and "ACCUSED" not in result.stdout
    for name, lid in zip(cases.bundles["none"].innocent_names, cases.bundles["none"].innocent_ids, strict=True):
        assert lid not in result.stdout and printable(name) not in result.stdout


def test_format_p_matches_the_scan_printout() -> None:
    for log10_p in [0.0, -0.0001, -0.3, -1.5, -2.999, -3.0, -3.2, -9.0, -42.7, -299.99, -300.0, -300.1, -888.94]:
        assert format_p(log10_p) == cli_format_p(log10_p)


def test_measured_figures_ship_with_the_package() -> None:
    shipped = measured_false_accusations()
    assert shipped["measured_on"] and shipped["weightmark_version"]
    results = REPO / "benchmarks" / "results" / "false_accusations.json"
    if not results.exists():
        pytest.skip("not a source checkout")
    measured = json.loads(results.read_text())
    assert shipped["codewords_per_scan"] == measured["count"]
    assert [{k: r[k] for k in s} for r, s in zip(measured["rows"], shipped["rows"], strict=True)] == shipped["rows"]


def test_pdf_report(cases: Cases, tmp_path: Path) -> None:
    pytest.importorskip("weasyprint")
    from weightmark.report import is_report

    out = tmp_path / "case.pdf"
    result = _report(cases, "collusion", out, "--format", "pdf")
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert is_report(out)
    other = tmp_path / "other.pdf"
    other.write_bytes(b"%PDF-1.4\n% someone else's document\n%%EOF\n")
    assert not is_report(other)
    refused = _report(cases, "q4", other, "--format", "pdf", "--force")
    assert refused.returncode == 3 and other.read_bytes().startswith(b"%PDF-1.4\n% someone")


def test_unknown_format_is_a_usage_error(cases: Cases, tmp_path: Path) -> None:
    result = _report(cases, "q4", tmp_path / "case.docx", "--format", "docx")
    assert result.returncode == 2 and result.stderr.startswith("Error: unknown report format") and not list(tmp_path.iterdir())


def test_signed_bundle_with_a_malformed_field_gets_one_line(cases: Cases, tmp_path: Path) -> None:
    """A bundle the lab signed, but whose z statistics are not numbers: refused, no traceback."""
    from weightmark.evidence import verify_bundle
    from weightmark.report import load_public_key

    content = json.loads(cases.bundles["q4"].path.read_bytes())["bundle"]
    content["scan"]["z"] = ["not a number"]
    bundle = _sign(cases, content, tmp_path / "odd.json")
    verify_bundle(bundle.read_bytes(), load_public_key(cases.pub))  # the signature holds
    out = tmp_path / "case.html"
    result = run_cli("report", str(bundle), "--out", str(out), "--pubkey", str(cases.pub))
    assert result.returncode == 3 and not out.exists()
    assert result.stderr.count("\n") == 1 and "verifies, but a field cannot be shown" in result.stderr


def _sign(cases: Cases, content: dict, path: Path) -> Path:
    """`content` signed by the lab as a bundle, as an older weightmark (or a careless one) wrote it."""
    from weightmark import Lab
    from weightmark.evidence import EVIDENCE_PAYLOAD_TYPE
    from weightmark.registry.envelope import canonical_json, pae
    from weightmark.registry.log import b64

    keys = Lab(cases.home, passphrase=None).keys
    signature = keys.sign(pae(EVIDENCE_PAYLOAD_TYPE, canonical_json(content)))
    path.write_bytes(canonical_json({"bundle": content, "signature": {"keyid": keys.key_id, "sig": b64(signature)}}))
    return path


def test_v1_bundle_renders_what_it_has_and_no_candidate_names(cases: Cases, tmp_path: Path) -> None:
    """A v1 bundle lists the top scorers by name: the report shows the accused only, and says what
    a v1 bundle does not record."""
    bundle = cases.bundles["blind"]
    v2 = json.loads(bundle.path.read_bytes())["bundle"]
    v1 = {"format": "weightmark-evidence/v1", "created_at": v2["created_at"], "scan": bundle.scan,
          "accusations": v2["accusations"], "tree_size": v2["tree_size"], "checkpoint": v2["checkpoint"],
          "trust": v2["trust"]}
    assert any(c["licensee_id"] in bundle.innocent_ids for c in bundle.scan["candidates"])
    path = _sign(cases, v1, tmp_path / "v1.json")
    out = tmp_path / "v1.html"
    result = run_cli("report", str(path), "--out", str(out), "--pubkey", str(cases.pub))
    assert result.returncode == 0, result.stderr
    document = out.read_text(encoding="utf-8")
    assert "weightmark-evidence/v1" in document and "does not record the examined files" in document
    for name in bundle.accused_names:
        assert html.escape(printable(name)) in document
    for name, lid in zip(bundle.innocent_names, bundle.innocent_ids, strict=True):
        assert html.escape(printable(name)) not in document and lid not in document
    assert len(_images(document)) == 1  # the accused on the innocents' bound; no z, no carriers recorded
    shown = run_cli("evidence", "show", str(path), "--pubkey", str(cases.pub))
    assert shown.returncode == 0 and "file hashes not recorded in a v1 bundle" in shown.stdout
    assert not any(lid in shown.stdout for lid in bundle.innocent_ids)
