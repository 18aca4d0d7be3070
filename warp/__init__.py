"""WARP: hole-punching, multi-path, erasure-coded tunnel gateway."""

__version__ = "0.1.0"
