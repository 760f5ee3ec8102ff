"""Render a ``verigrad report`` page in headless Chromium and check the screenshot is not
blank: it must exist, hold many distinct colours, and show the report's heatmap colours
(the diverging map of the signed maps, the sequential map of the bound widths).

    python tools/check_report_render.py results/demo.html
    python tools/check_report_render.py results/demo.html --png shot.png --chromium /usr/bin/chromium

Exit 0 when the page rendered and passed, 1 otherwise (including: no Chromium found).
Needs Pillow to read the screenshot (``pip install -e '.[test]'``). The browser runs with
networking features off and a throw-away profile: the page must not need the network.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from verigrad.report_html import DIVERGING_ANCHORS, SEQUENTIAL_ANCHORS, diverging, sequential

WINDOW = (1200, 2000)


def find_chromium() -> str | None:
    """The Chromium binary: ``chromium`` / ``chromium-browser`` on PATH, else /usr/bin/chromium."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def screenshot(page: Path, png: Path, chromium: str, timeout: float = 60.0,
               window: tuple[int, int] = WINDOW) -> subprocess.CompletedProcess:
    """Screenshot ``page`` (a file) with headless Chromium into ``png``; raises
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="verigrad-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={window[0]},{window[1]}",
               Path(page).resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _palette() -> np.ndarray:
    # the saturated part of both maps: |t| ≥ 0.35 of the diverging one (near-white is
    # indistinguishable from the page) and the upper 80% of the sequential one
    t = np.linspace(0.35, 1.0, 24)
    return np.concatenate([diverging(t, 1.0), diverging(-t, 1.0), sequential(np.linspace(0.2, 1.0, 24), 1.0)]
                          ).astype(np.int32)


def check_screenshot(png: Path, expect_heatmaps: bool = True, min_colours: int = 200,
                     min_heatmap_pixels: int = 2000) -> list[str]:
    """Problems with the screenshot (empty list: it looks like a rendered report). A batch
    index page has no pictures: pass ``expect_heatmaps=False`` for it."""
    from PIL import Image

    if not Path(png).is_file() or Path(png).stat().st_size == 0:
        return [f"{png}: no screenshot was written"]
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    problems = []
    flat = rgb.reshape(-1, 3)
    colours = len(np.unique(flat[:, 0] * 65536 + flat[:, 1] * 256 + flat[:, 2]))
    if colours < min_colours:
        problems.append(f"{png}: only {colours} distinct colours (a blank or unstyled page?)")
    if not expect_heatmaps:
        return problems
    # pixels within a small distance of a heatmap colour; subsample for speed
    sample = flat[:: max(1, len(flat) // 400_000)]
    pal = _palette()
    near = np.zeros(len(sample), bool)
    for c in pal:
        near |= np.abs(sample - c).sum(axis=1) <= 12
    hits = int(near.sum()) * max(1, len(flat) // 400_000)
    if hits < min_heatmap_pixels:
        problems.append(f"{png}: about {hits} pixels in the heatmap colours (expected ≥ {min_heatmap_pixels}): "
                        "the embedded PNGs did not render?")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page", type=Path, help="report HTML page")
    ap.add_argument("--png", type=Path, help="keep the screenshot here (default: a temporary file)")
    ap.add_argument("--chromium", help="browser binary (default: chromium on PATH or /usr/bin/chromium)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for the browser")
    a = ap.parse_args(argv)
    if not a.page.is_file():
        print(f"error: {a.page}: no such file", file=sys.stderr)
        return 1
    chromium = a.chromium or find_chromium()
    if chromium is None:
        print("error: no chromium found (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        png = a.png or Path(tmp) / "screenshot.png"
        try:
            proc = screenshot(a.page, png, chromium, a.timeout)
        except subprocess.TimeoutExpired:
            print(f"error: chromium did not finish within {a.timeout:g} s", file=sys.stderr)
            return 1
        # pages with embedded pictures must show them; the batch index has none
        problems = check_screenshot(png, expect_heatmaps="data:image/png;base64," in a.page.read_text())
        if proc.returncode != 0:
            problems.insert(0, f"chromium exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if not problems:
        print(f"ok: {a.page} rendered" + (f"; screenshot {a.png}" if a.png else ""))
    return 1 if problems else 0


__all__ = ["find_chromium", "screenshot", "check_screenshot", "DIVERGING_ANCHORS", "SEQUENTIAL_ANCHORS"]

if __name__ == "__main__":
    sys.exit(main())
