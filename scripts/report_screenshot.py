"""Open a report.html in headless Chromium, check it renders cleanly and take a full-page screenshot.

    python scripts/report_screenshot.py RUN_DIR/report.html [--out report.png]

Fails (exit 1) on any console error, page error or image that did not load. Needs Python playwright
(``pip install playwright``) and Debian's Chromium (``apt-get install chromium``); it never downloads a browser.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
BROKEN_IMAGES_JS = "() => Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)"


def check_report(html: Path, screenshot: Path, width: int = 1280) -> dict:
    """Console errors, page errors, image counts and the screenshot's path of ``html`` rendered in Chromium."""
    from playwright.sync_api import sync_playwright

    console_errors: list[str] = []
    page_errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda msg: msg.type == "error" and console_errors.append(msg.text))
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            page.goto(Path(html).resolve().as_uri(), wait_until="load")
            images = page.evaluate("() => document.images.length")
            broken = page.evaluate(BROKEN_IMAGES_JS)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"console_errors": console_errors, "page_errors": page_errors, "images": images,
            "broken_images": broken, "screenshot": str(screenshot)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", type=Path)
    p.add_argument("--out", type=Path, help="screenshot PNG (default: beside the report, report.png)")
    args = p.parse_args(argv)
    result = check_report(args.html, args.out or args.html.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 1 if result["console_errors"] or result["page_errors"] or result["broken_images"] else 0


if __name__ == "__main__":
    sys.exit(main())
