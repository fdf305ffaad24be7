"""Headless Chromium for the report tests: skipped cleanly where it is not installed.

Chromium comes from Debian's packages (``apt-get install -y chromium``); with
BDSCAN_TEST_INSTALL_CHROMIUM=1 the helper tries that itself (as root, where apt exists).
CI never depends on it: without /usr/bin/chromium the browser tests are skipped.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying to reach Google's hosts.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def chromium() -> Path:
    if not CHROMIUM.exists() and os.environ.get("BDSCAN_TEST_INSTALL_CHROMIUM") == "1" and shutil.which("apt-get") \
            and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, check=False)
    if not CHROMIUM.exists():
        pytest.skip("headless Chromium not installed (apt-get install -y chromium)")
    return CHROMIUM


def _run(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(chromium()), *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                          capture_output=True, text=True, check=False)


def screenshot(page: Path, png: Path, profile: Path, size: tuple[int, int] = (1280, 2400)) -> Path:
    result = _run(page, profile, f"--screenshot={png}", f"--window-size={size[0]},{size[1]}")
    assert png.exists(), result.stderr[-2000:]
    return png


def dump_dom(page: Path, profile: Path) -> str:
    result = _run(page, profile, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def png_size(png: Path) -> tuple[int, int]:
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def png_pixel_variety(png: Path) -> int:
    """Distinct byte values in the decompressed image data: 1-2 for a blank page."""
    data, pos, idat = png.read_bytes(), 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return len(set(zlib.decompress(idat)))
