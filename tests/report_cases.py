"""Evidence bundles of real scans of the real MiniLM, for the case-report tests and browser check.

One lab, three v1-code copies (collusion 1) and a fourth for a licensee whose name is markup and
terminal escapes; bundles for a Q4_0 re-quantized copy, an average of the three copies, a blind
scan, a scan that accuses nobody (the unstamped base, blind), and the hostile-named copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import LICENSEES, make_stamped_lab
from weightmark import attacks
from weightmark.keys import PUBLIC_KEY_FILE

HOSTILE = "<script>alert('x')</script> \x1b[31mRed\u202e Ltd & Co"


@dataclass
class Bundle:
    path: Path
    suspect: Path
    scan: dict[str, Any]
    accused_names: list[str]
    innocent_names: list[str]
    innocent_ids: list[str]


@dataclass
class Cases:
    home: Path
    pub: Path
    bundles: dict[str, Bundle]
    work: Path


def _bundle(lab: Any, work: Path, label: str, suspect: Path, names: dict[str, str], **scan_args: Any) -> Bundle:
    report = lab.scan(suspect, **scan_args)
    path = work / f"{label}.json"
    lab.evidence(report, path)
    accused = {c.licensee_id for c in report.accused}
    return Bundle(path, suspect, report.to_json(), [names[i] for i in names if i in accused],
                  [n for i, n in names.items() if i not in accused], [i for i in names if i not in accused])


def build_cases(work: Path, base: Path) -> Cases:
    stamped = make_stamped_lab(work, base, "F32", collusion=1)
    lab = stamped.lab
    hostile = lab.add_licensee(HOSTILE, "GB").id
    hostile_copy = work / "copy-hostile"
    lab.stamp("minilm", hostile, hostile_copy, collusion=1)
    names = {lid: name for lid, (name, _) in zip(stamped.ids, LICENSEES, strict=True)} | {hostile: HOSTILE}
    q4 = attacks.requantize(stamped.copies[0], work / "q4", "Q4_0")
    average = attacks.collude(stamped.copies, work / "average", "average")
    bundles = {
        "q4": _bundle(lab, work, "q4", q4, names),
        "collusion": _bundle(lab, work, "collusion", average, names),
        "blind": _bundle(lab, work, "blind", stamped.copies[1], names, blind=True),
        "none": _bundle(lab, work, "none", base, names, model_name="minilm", blind=True),
        "hostile": _bundle(lab, work, "hostile", hostile_copy, names),
    }
    pub = work / "LAB.pub"
    pub.write_bytes((lab.home / PUBLIC_KEY_FILE).read_bytes())
    return Cases(lab.home, pub, bundles, work)
