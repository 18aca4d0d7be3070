"""The batch I/O backend a test is parametrized with: the pure-Python one always, the C
extension where it was built (under CI it must have been: a missing one fails)."""

from __future__ import annotations

import os

import pytest

from warp.paths.batch_io import NATIVE, PYTHON, BatchIO


def batch_backend(name: str) -> BatchIO:
    if name == "python":
        return PYTHON
    if NATIVE is None:
        if os.environ.get("CI"):
            pytest.fail("warp._batchio was not built")
        pytest.skip("warp._batchio not built here")
    return NATIVE
