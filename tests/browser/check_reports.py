"""Browser check of the case reports (`make report-check`, not part of `make test`).

Renders the case reports of real scans (Q4_0 re-quantized copy, three colluders, blind scan, no
accusation), opens each in headless Chromium from a file:// URL with the network cut off, and
checks that:
- no request leaves the page (Chromium's net log shows no request from the page other than
  file: and data: URLs; a leaky page is checked first to prove the check sees requests);
- every figure loads and draws: a script in a throw-away copy of the page measures each image
  (decoded, laid out at full width, and not blank: its ink share when painted on a canvas);
- the printed PDF has a sane page count on Letter and on A4 (pdfinfo);
and saves a screenshot of each report's first page under docs/report-examples/.

    .venv/bin/python tests/browser/check_reports.py [--out DIR] [--keep]
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import minilm_dir, run_cli  # noqa: E402
from tests.report_cases import build_cases  # noqa: E402

EXAMPLES = ROOT / "docs" / "report-examples"
EXAMPLE_LABELS = ("q4", "collusion", "blind", "none")
MAX_SCREENSHOT_BYTES = 300_000
PAGES = (3, 20)  # a report prints on at least 3 and at most 20 pages
FIGURE_MIN_WIDTH = 500  # CSS pixels: the figure spans the text column
MIN_INK = 0.005  # share of non-white pixels below which a figure counts as blank
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
    "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--no-pdf-header-footer",
]

# Appended to a throw-away copy only: measures every figure once the page has loaded.
PROBE = """<script>
window.addEventListener("load", () => {
  const out = [];
  for (const img of document.images) {
    const box = img.getBoundingClientRect();
    let ink = null, error = null;
    try {
      const c = document.createElement("canvas");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const g = c.getContext("2d");
      g.fillStyle = "#fff"; g.fillRect(0, 0, c.width, c.height); g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let i = 0; i < d.length; i += 4) if (d[i] < 235 || d[i + 1] < 235 || d[i + 2] < 235) n++;
      ink = n / (c.width * c.height);
    } catch (e) { error = String(e); }
    out.push({complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
              shown: [Math.round(box.width), Math.round(box.height)], ink, error});
  }
  const pre = document.createElement("pre");
  pre.id = "wm-probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("chromium not found: `make report-check` installs it (apt-get install -y chromium)")


def run_browser(browser: str, page: Path, profile: Path, netlog: Path, *args: str) -> str:
    cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--log-net-log={netlog}", *args,
           page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed on {page}: {done.stderr[-800:]}")
    return done.stdout


def requests_made(netlog: Path) -> set[str]:
    """URLs the page asked for over the network: requests whose isolation key is the file://
    page (the browser's own background traffic is keyed otherwise, and the resolver rule sends
    all of it to ~NOTFOUND anyway)."""
    text = netlog.read_text(encoding="utf-8", errors="replace")
    try:
        log = json.loads(text)
    except ValueError:  # a log cut short: close the event list
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = set()
    for event in log.get("events", []):
        params = event.get("params") or {}
        if event.get("type") == start and str(params.get("network_isolation_key", "")).startswith("file://"):
            urls.add(str(params.get("url")))
    return {u for u in urls if not u.startswith(("file:", "data:"))}


def measure_figures(browser: str, page: Path, work: Path) -> list[dict]:
    """Open a copy of `page` with the probe script and return what it measured per image."""
    probe_page = page.with_name(page.stem + "-probe.html")
    probe_page.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = run_browser(browser, probe_page, work / "profile", work / (page.stem + "-probe.netlog.json"),
                      "--virtual-time-budget=5000", "--dump-dom")
    found = re.search(r'<pre id="wm-probe">(.*?)</pre>', dom, re.S)
    return json.loads(html.unescape(found.group(1))) if found else []


def self_test(browser: str, work: Path) -> None:
    """The checks must be able to fail: a page that fetches two URLs, and a blank figure."""
    page = work / "leaky.html"
    page.write_text('<html><body><img src="http://example.invalid/x.png">'
                    '<link rel="stylesheet" href="https://fonts.example.invalid/a.css"></body></html>')
    log = work / "leaky.netlog.json"
    run_browser(browser, page, work / "profile", log, "--dump-dom")
    seen = requests_made(log)
    if seen != {"http://example.invalid/x.png", "https://fonts.example.invalid/a.css"}:
        sys.exit(f"the request check does not work: it saw {sorted(seen)} on a page that fetches two URLs")
    blank_svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="600" height="300"><rect width="600" height="300" fill="#fff"/></svg>'
    blank = work / "blank.html"
    blank.write_text(f'<html><body><img style="width:700px" src="data:image/svg+xml;base64,'
                     f'{base64.b64encode(blank_svg).decode()}"></body></html>')
    figures = measure_figures(browser, blank, work)
    if len(figures) != 1 or figures[0]["ink"] is None or figures[0]["ink"] >= MIN_INK:
        sys.exit(f"the blank-figure check does not work: {figures}")


def pdf_pages(pdf: Path) -> int:
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"^Pages:\s+(\d+)", info, re.M).group(1))


def save_screenshot(png: Path, dest: Path) -> int:
    """Copy the screenshot, re-encoded with a palette when that is what keeps it small."""
    from PIL import Image

    dest.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(png) as im:
        im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dest, optimize=True)
    return dest.stat().st_size


def check(label: str, bundle: Path, pub: Path, work: Path, browser: str, examples: Path) -> list[str]:
    problems: list[str] = []
    html_path = work / f"{label}.html"
    made = run_cli("report", str(bundle), "--out", str(html_path), "--pubkey", str(pub))
    if made.returncode != 0:
        return [f"{label}: report failed: {made.stderr.strip()}"]
    document = html_path.read_text(encoding="utf-8")
    a4_page = work / f"{label}-a4.html"
    a4_page.write_text(document.replace("</style>", "@page { size: A4; }</style>"), encoding="utf-8")
    profile = work / "profile"
    logs = []

    log = work / f"{label}-shot.netlog.json"
    shot = work / f"{label}.png"
    run_browser(browser, html_path, profile, log, "--window-size=1000,1400", f"--screenshot={shot}")
    logs.append(log)
    size = save_screenshot(shot, examples / f"{label}.png")
    if size > MAX_SCREENSHOT_BYTES:
        problems.append(f"{label}: screenshot is {size:,} bytes")

    pages = {}
    for paper, page in (("Letter", html_path), ("A4", a4_page)):
        log = work / f"{label}-{paper}.netlog.json"
        pdf = work / f"{label}-{paper}.pdf"
        run_browser(browser, page, profile, log, f"--print-to-pdf={pdf}")
        logs.append(log)
        pages[paper] = pdf_pages(pdf)
        if not PAGES[0] <= pages[paper] <= PAGES[1]:
            problems.append(f"{label}: {pages[paper]} pages on {paper}")

    figures = measure_figures(browser, html_path, work)
    logs.append(work / f"{label}-probe.netlog.json")
    expected = document.count("<img ")
    if len(figures) != expected or expected == 0:
        problems.append(f"{label}: {len(figures)} figures measured, {expected} in the page")
    for i, fig in enumerate(figures, 1):
        if not fig["complete"] or min(fig["natural"]) <= 0 or fig["shown"][0] < FIGURE_MIN_WIDTH:
            problems.append(f"{label}: figure {i} not drawn at full width: {fig}")
        if fig["error"] or fig["ink"] is None or not MIN_INK <= fig["ink"] <= 0.6:
            problems.append(f"{label}: figure {i} looks blank or solid: {fig}")

    for log in logs:
        if leaked := requests_made(log):
            problems.append(f"{label}: requests left the page: {sorted(leaked)[:5]}")
    inks = ", ".join(f"{f['ink']:.3f}" for f in figures if f["ink"] is not None)
    print(f"{label:10} figures {len(figures)} (ink {inks}); pages Letter {pages['Letter']}, A4 {pages['A4']}; "
          f"screenshot {size:,} bytes; {'OK' if not problems else 'PROBLEMS'}", flush=True)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=EXAMPLES, help="where the screenshots go")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (reports, PDFs) and print it")
    args = parser.parse_args()
    browser = chromium()
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="weightmark-report-check-"))
    try:
        self_test(browser, work)
        (work / "cases").mkdir()
        cases = build_cases(work / "cases", minilm_dir())
        problems = []
        for label in EXAMPLE_LABELS:
            problems += check(label, cases.bundles[label].path, cases.pub, work, browser, args.out)
    finally:
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(EXAMPLE_LABELS)} reports checked in {time.perf_counter() - start:.0f} s")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
