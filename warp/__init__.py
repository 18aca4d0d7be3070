"""WARP: hole-punching, multi-path, erasure-coded tunnel gateway.

``warp.open(config)``: a gateway inside the application's own asyncio loop (`warp.embed`,
docs/api.md); imported on first use, so ``import warp.<module>`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from warp.embed import open

__version__ = "0.1.0"

__all__ = ["__version__", "open"]


def __getattr__(name: str) -> Any:
    if name == "open":
        from warp.embed import open

        return open
    raise AttributeError(f"module 'warp' has no attribute {name!r}")
