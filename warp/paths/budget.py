"""Uplink tiers and data budgets (`[[interfaces.uplinks]]`), sans-I/O.

An uplink's policy comes from the first `[[interfaces.uplinks]]` entry whose `match` regex
finds its name (none: a primary without budget):

* `tier`: `primary` carries traffic; `backup` carries only probes while a primary path is
  heard from, and the traffic when none is (`warp.core.session`, `BACKUP_AFTER`); `never`
  is not used at all (as if excluded);
* `data_budget` bytes per `budget_period` (a UTC calendar `day` or `month`), counted both
  ways (UDP payload, probes included). An uplink whose budget ran out carries no traffic
  (probes go on) until the period ends.

`UsageLedger` counts (`add`, per datagram: one dict look-up), moves to a new period when
told the wall-clock time (`roll`, by the shell every few seconds), and serializes itself
(`to_json` / `load`): the shell keeps the usage in a small state file across restarts. What
it loads is checked field by field; anything else is a warning and a fresh start.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("warp.core")

Tier = Literal["primary", "backup", "never"]
Period = Literal["day", "month"]

STATE_VERSION = 1
#: A state file with more uplinks than this is refused (it is not ours).
MAX_STATE_UPLINKS = 256
MAX_STATE_BYTES = 64 * 1024
_MAX_COUNT = 2**63 - 1


@dataclass(frozen=True, slots=True)
class UplinkPolicy:
    tier: Tier = "primary"
    data_budget: int | None = None
    period: Period = "month"


PRIMARY = UplinkPolicy()


def period_key(period: Period, wall: float) -> str:
    """The UTC calendar period `wall` (seconds since the epoch) falls in."""
    day = time.gmtime(wall)
    month = f"{day.tm_year:04d}-{day.tm_mon:02d}"
    return f"{month}-{day.tm_mday:02d}" if period == "day" else month


@dataclass(slots=True)
class Usage:
    """Bytes an uplink moved in one period (`key`; empty until the first `roll`)."""

    period: Period
    key: str = ""
    used: int = 0
    budget: int | None = None  # the uplink's data_budget (kept here for `add`)


class UsageLedger:
    """Per-uplink usage against budgets (see the module docstring)."""

    def __init__(self, policy_of: Callable[[str], UplinkPolicy]) -> None:
        self.policy_of = policy_of
        self.usage: dict[str, Usage] = {}
        #: uplinks whose budget ran out in the current period
        self.exhausted: set[str] = set()
        #: the usage changed since the last `to_json`
        self.dirty = False
        self._policies: dict[str, UplinkPolicy] = {}
        self._periods: dict[str, str] = {}  # period -> current key, as of the last `roll`

    def policy(self, uplink: str) -> UplinkPolicy:
        policy = self._policies.get(uplink)
        if policy is None:
            policy = self._policies[uplink] = self.policy_of(uplink)
        return policy

    def add(self, uplink: str, nbytes: int) -> None:
        """A datagram of `nbytes` went out on or came in from `uplink` (per datagram: kept
        to a dict look-up and a comparison)."""
        usage = self.usage.get(uplink)
        if usage is None:
            policy = self.policy(uplink)
            key = self._periods.get(policy.period, "")
            usage = self.usage[uplink] = Usage(policy.period, key, 0, policy.data_budget)
        usage.used += nbytes
        self.dirty = True
        budget = usage.budget
        if budget is not None and usage.used >= budget and uplink not in self.exhausted:
            self.exhausted.add(uplink)
            log.warning("uplink.budget_exhausted uplink=%s used=%d budget=%d period=%s "
                        "traffic moves to the other uplinks until the period ends",
                        uplink, usage.used, budget, usage.key or "-")  # fmt: skip

    def roll(self, wall: float) -> None:
        """The wall-clock time is `wall`: usage of an ended period starts over."""
        self._periods = {period: period_key(period, wall) for period in ("day", "month")}
        for uplink, usage in self.usage.items():
            key = period_key(usage.period, wall)
            if usage.key == key:
                continue
            if usage.key:
                log.info("uplink.budget_period uplink=%s ended=%s used=%d", uplink,
                         usage.key, usage.used)  # fmt: skip
                usage.used = 0
                self.dirty = True
                if uplink in self.exhausted:
                    self.exhausted.discard(uplink)
                    log.info("uplink.budget_renewed uplink=%s period=%s", uplink, key)
            usage.key = key

    def status(self) -> dict[str, Any]:
        """Per uplink with usage: period, bytes used, budget, exhausted (`warp status`)."""
        return {
            uplink: {
                "tier": self.policy(uplink).tier,
                "period": usage.key or usage.period,
                "used_bytes": usage.used,
                "data_budget": self.policy(uplink).data_budget,
                "budget_exhausted": uplink in self.exhausted,
            }
            for uplink, usage in sorted(self.usage.items())
        }

    def to_json(self) -> bytes:
        self.dirty = False
        state = {
            "version": STATE_VERSION,
            "uplinks": {
                uplink: {"period": usage.period, "key": usage.key, "used": usage.used}
                for uplink, usage in sorted(self.usage.items())
                if usage.key
            },
        }
        return json.dumps(state, indent=1, sort_keys=True).encode() + b"\n"

    def load(self, data: bytes, wall: float) -> str | None:
        """Take the usage a state file kept (then `roll`s to `wall`). Returns a warning (and
        keeps nothing) when the file is not what `to_json` writes."""
        try:
            loaded = _parse_state(data)
        except ValueError as error:
            return str(error)
        for uplink, usage in loaded.items():
            policy = self.policy(uplink)
            if usage.period == policy.period:  # else the config changed it: start over
                usage.budget = policy.data_budget
                self.usage[uplink] = usage
        self.roll(wall)
        for uplink, usage in self.usage.items():
            budget = self.policy(uplink).data_budget
            if budget is not None and usage.used >= budget:
                self.add(uplink, 0)  # marks it exhausted, logged
        return None


def _parse_state(data: bytes) -> dict[str, Usage]:
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
    try:
        state = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"not JSON ({error})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"not a version {STATE_VERSION} usage file")
    uplinks = state.get("uplinks")
    if not isinstance(uplinks, dict) or len(uplinks) > MAX_STATE_UPLINKS:
        raise ValueError(f"'uplinks' must be a table of at most {MAX_STATE_UPLINKS} uplinks")
    out: dict[str, Usage] = {}
    for uplink, entry in uplinks.items():
        if not isinstance(entry, dict) or not 1 <= len(uplink) <= 64:
            raise ValueError(f"bad entry for uplink {uplink[:64]!r}")
        period, key, used = entry.get("period"), entry.get("key"), entry.get("used")
        if period not in ("day", "month") or not isinstance(key, str) or len(key) > 10:
            raise ValueError(f"bad period of uplink {uplink!r}")
        if not isinstance(used, int) or isinstance(used, bool) or not 0 <= used <= _MAX_COUNT:
            raise ValueError(f"bad byte count of uplink {uplink!r}")
        out[uplink] = Usage(period, key, used)
    return out
