"""Moved to ``warp/udp_tools.py`` (``warp.netlab.UDP_TOOLS``); this runs it, for old callers."""

from __future__ import annotations

import runpy

from warp.netlab import UDP_TOOLS

if __name__ == "__main__":
    runpy.run_path(str(UDP_TOOLS), run_name="__main__")
