"""Keeps the uplinks' usage against their data budgets in `interfaces.usage_file` (the I/O
around `warp.paths.budget.UsageLedger`): read at start (missing: from zero; corrupt or not
ours: a warning and a fresh start), the period rolled and the file rewritten atomically
(a temporary file in the same directory, fsync, rename) every SAVE_INTERVAL and at stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

from warp.paths.budget import MAX_STATE_BYTES, UsageLedger

log = logging.getLogger("warp.node")

SAVE_INTERVAL = 10.0


def load_usage(ledger: UsageLedger, path: Path | None) -> None:
    """Take the usage kept in `path` (then roll to now); log what went wrong."""
    if path is None:
        ledger.roll(time.time())
        return
    try:
        with path.open("rb") as file:
            data = file.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        data = None
    except OSError as error:
        log.warning("uplink.usage_file_ignored path=%s error=%r starting from zero", path,
                    str(error))  # fmt: skip
        data = None
    if data is not None:
        problem = ledger.load(data, time.time())
        if problem is not None:
            log.warning("uplink.usage_file_ignored path=%s error=%r starting from zero", path,
                        problem)  # fmt: skip
    ledger.roll(time.time())


def save_usage(ledger: UsageLedger, path: Path) -> None:
    """Write the usage atomically (a reader sees the old file or the new, never half)."""
    data = ledger.to_json()
    directory = path.parent
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


async def keep_usage(ledger: UsageLedger, path: Path | None) -> None:
    """Every SAVE_INTERVAL: roll the period, and save when the usage changed. Runs until
    cancelled (then saves once more)."""
    try:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            ledger.roll(time.time())
            if path is not None and ledger.dirty:
                _save_logged(ledger, path)
    finally:
        if path is not None and ledger.dirty:
            _save_logged(ledger, path)


def _save_logged(ledger: UsageLedger, path: Path) -> None:
    try:
        save_usage(ledger, path)
    except OSError as error:
        log.warning("uplink.usage_file_unwritable path=%s error=%r", path, str(error))
