"""Render an HTML report in headless Chromium and check the screenshot is not blank.

    python benchmarks/render_report.py OUT/sub-01.html --png sub-01.png [--width 1280] [--height 6000]

Look at the PNG as a user would (legible figures, orientation letters, colour bars). Prints the
screenshot size, the fraction of non-background pixels and the render time; exits 1 if
Chromium fails or the page renders blank. Needs Debian's ``chromium`` (apt-get install chromium).
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1")


def find_chromium():
    """Path of a Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def render(html_path, png_path, width=1280, height=6000, timeout_s=120):
    """Screenshot ``html_path`` (a local file) into ``png_path``; returns the fraction of non-white pixels."""
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    png_path = Path(png_path).resolve()
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png_path}",
             f"--window-size={width},{height}", Path(html_path).resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout_s)
    if not png_path.exists():
        raise RuntimeError(f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}")
    pixels = np.asarray(Image.open(png_path).convert("L"), dtype=np.float32)
    return float((pixels < 250).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--png", type=Path, help="screenshot path (default: next to the HTML, .png)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=6000)
    args = parser.parse_args(argv)
    png = args.png or args.html.with_suffix(".png")
    start = time.perf_counter()
    try:
        inked = render(args.html, png, args.width, args.height)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    size = Image.open(png).size
    print(f"{png}: {size[0]}x{size[1]} px, {100 * inked:.1f}% non-white, {time.perf_counter() - start:.1f} s")
    if inked < 0.01:
        print("FAILED: the page rendered blank", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
