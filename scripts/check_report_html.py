"""Open a rendered report in headless Chromium and fail on a broken image or a missing table.

    python scripts/check_report_html.py report/default/index.html [--table results ...]

The page is loaded from disk exactly as a reader would open it (file://, no network, a fresh
profile). A copy of it with one extra inline script is loaded from a temporary directory (a
<base> element points relative paths back at the report), so the report directory is never
written to. After the load event the script records, for every <img>, whether it decoded
(complete and naturalWidth > 0) and, for every <table>, its id and body row count; Chromium's
--dump-dom prints the result. Exit status: 0 all good, 1 a check failed, 2 Chromium could not run.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--virtual-time-budget=10000",
)
RESULT_ID = "archbench-html-check"
PROBE = f"""
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images, (img) => ({{
    src: img.getAttribute("src"),
    alt: img.getAttribute("alt"),
    ok: img.complete && img.naturalWidth > 0,
  }}));
  const tables = Array.from(document.querySelectorAll("table"), (table) => ({{
    id: table.id,
    rows: table.tBodies.length ? table.tBodies[0].rows.length : 0,
  }}));
  const out = document.createElement("pre");
  out.id = "{RESULT_ID}";
  out.textContent = JSON.stringify({{ images, tables }});
  document.body.appendChild(out);
}});
</script>
"""


class CheckError(Exception):
    """Chromium could not be run or produced no result."""


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium executable: `explicit`, $ARCHBENCH_CHROMIUM, or the first one on PATH."""
    for name in (explicit, os.environ.get("ARCHBENCH_CHROMIUM"), *CANDIDATES):
        if name and (found := shutil.which(name)):
            return found
    return None


def probe_page(page: Path, chromium: str, timeout: float = 120.0) -> dict:
    """Load `page` in headless Chromium; return {"images": [...], "tables": [...]}."""
    source = page.read_text(encoding="utf-8")
    base = f'<base href="{html.escape(page.parent.resolve().as_uri())}/">'
    if "<head>" not in source or "</body>" not in source:
        raise CheckError(f"{page}: not an HTML page with <head> and </body>")
    probed = source.replace("<head>", "<head>\n" + base, 1).replace("</body>", PROBE + "</body>")
    with tempfile.TemporaryDirectory(prefix="archbench-html-") as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(probed, encoding="utf-8")
        command = [
            chromium,
            *FLAGS,
            f"--user-data-dir={Path(tmp) / 'profile'}",
            "--dump-dom",
            copy.as_uri(),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CheckError(f"could not run {chromium}: {exc}") from exc
    match = re.search(rf'<pre id="{RESULT_ID}">(.*?)</pre>', done.stdout, re.DOTALL)
    if not match:
        tail = (done.stderr or done.stdout)[-2000:]
        raise CheckError(f"Chromium (exit {done.returncode}) produced no check result:\n{tail}")
    return json.loads(html.unescape(match.group(1)))


def image_name(image: dict) -> str:
    """An image as a message names it: its src, or for an embedded one (a data: URI) its alt."""
    src = image["src"] or ""
    return f"embedded image {image['alt']!r}" if src.startswith("data:") else src


def problems(result: dict, required_tables: list[str]) -> list[str]:
    """Human-readable failures: broken images, missing or empty required tables, no images."""
    found = []
    for image in result["images"]:
        if not image["ok"]:
            found.append(f"broken image: {image_name(image)}")
    tables = {table["id"]: table["rows"] for table in result["tables"]}
    for name in required_tables:
        if name not in tables:
            found.append(f"missing table: #{name}")
        elif tables[name] == 0:
            found.append(f"empty table: #{name}")
    if not result["images"]:
        found.append("the page has no images")
    return found


def main(argv: list[str] | None = None) -> int:
    """Check one report page; print what was checked or what failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="the report's index.html")
    parser.add_argument(
        "--table",
        action="append",
        dest="tables",
        help="id of a table that must exist with at least one row (repeatable; default: results)",
    )
    parser.add_argument("--chromium", default=None, help="Chromium executable")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("check_report_html: chromium not found (apt-get install chromium)", file=sys.stderr)
        return 2
    if not args.page.is_file():
        print(f"check_report_html: no such page: {args.page}", file=sys.stderr)
        return 2
    try:
        result = probe_page(args.page, chromium)
    except CheckError as exc:
        print(f"check_report_html: {exc}", file=sys.stderr)
        return 2
    failures = problems(result, args.tables or ["results"])
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if failures:
        return 1
    print(
        f"ok: {len(result['images'])} images loaded, tables "
        + ", ".join(f"#{t['id'] or '?'} ({t['rows']} rows)" for t in result["tables"])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
