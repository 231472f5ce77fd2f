"""Headless Chromium (Debian's ``chromium``) for tests that look at a rendered page: a screenshot with networking
off (every request goes to a proxy on a port nothing listens on), read back as pixels."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
requires_chromium = pytest.mark.skipif(CHROMIUM is None,
                                       reason="headless Chromium is not installed (apt-get install chromium)")


def screenshot(page: str, out: str, size: tuple[int, int] = (1200, 1600)) -> np.ndarray:
    """Render the local file ``page`` to the PNG ``out``; returns its RGB pixels."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # no network, loopback included
             f"--screenshot={out}", f"--window-size={size[0]},{size[1]}", f"file://{page}"],
            check=True, capture_output=True, timeout=120,
        )
    with Image.open(out) as image:
        return np.asarray(image.convert("RGB"))


def screenshot_html(html: str, out: str) -> np.ndarray:
    """``html`` as the body of a page, rendered as :func:`screenshot` does (the page is written beside ``out``)."""
    page = out + ".html"
    with open(page, "w", encoding="utf-8") as f:
        f.write(f"<!doctype html><html><body>{html}</body></html>")
    return screenshot(page, out)


def inked(pixels: np.ndarray) -> int:
    """How many pixels are not (near) white."""
    return int((pixels.min(axis=-1) < 200).sum())


def pixels_near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    return int((abs(pixels.astype(int) - colour) <= tolerance).all(axis=-1).sum())
