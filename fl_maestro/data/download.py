"""Atomic, checked downloads: a file appears whole with the expected md5, or not at all."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)


def download_file(url: str, dest: str | Path, expected_md5: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically, checking the md5 when given."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    digest, done = hashlib.md5(usedforsecurity=False), 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            logger.info("Downloading %s (%s bytes) to %s", url, total or "unknown", dest)
            step = max(total // 10, 1) if total else 10 << 20  # every 10%, or 10 MiB
            next_log = step
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if done >= next_log:
                    logger.info("  %s: %d of %s bytes", dest.name, done, total or "unknown")
                    next_log = done + step
        if expected_md5 is not None and digest.hexdigest() != expected_md5.lower():
            raise ValueError(
                f"{url}: md5 {digest.hexdigest()} does not match expected {expected_md5}"
            )
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("Downloaded %s (%d bytes)", dest, done)
    return dest
