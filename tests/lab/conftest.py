"""Fixtures for lab tests (root, Linux network namespaces).

``lab`` yields an empty :class:`~tests.lab.netlab.Lab` (public namespace only) and tears it down
afterwards, also when the test fails. If the lab cannot be built the test is skipped with the
reason, except under ``CI`` where it fails: CI must never silently skip the lab.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NoReturn

import pytest

from tests.lab.netlab import Lab, LabError, cleanup_stale, list_namespaces, prerequisites_missing


def lab_unavailable(reason: str) -> NoReturn:
    """Skip (locally) or fail (under ``CI``) a test whose lab cannot be built."""
    if os.environ.get("CI"):
        pytest.fail(f"lab cannot be built under CI: {reason}", pytrace=False)
    pytest.skip(f"lab cannot be built: {reason}")


def require_lab() -> None:
    """Call at the start of a lab test that builds its own Lab."""
    reason = _probe_capability()
    if reason:
        lab_unavailable(reason)


_capability: list[str | None] = []


def _probe_capability() -> str | None:
    """Once per session: remove stale namespaces of crashed runs, then build a one-site lab
    (netns, veth, bridge, nftables NAT, sysctls). Returns why it failed, or None."""
    if not _capability:
        reason = prerequisites_missing()
        if reason is None:
            try:
                cleanup_stale()
                with Lab() as probe:
                    probe.add_site("probe", "symmetric", uplinks=1)
            except LabError as exc:
                reason = str(exc)
        _capability.append(reason)
    return _capability[0]


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = _probe_capability()
    if reason:
        lab_unavailable(reason)
    try:
        the_lab = Lab()
    except LabError as exc:
        lab_unavailable(str(exc))
    with the_lab:
        yield the_lab
    left = set(the_lab.namespaces()) & set(list_namespaces())
    assert not left, f"lab namespaces left behind: {sorted(left)}"
