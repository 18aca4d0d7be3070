"""zfec encoder/decoder objects, built once per (k, n) and shared: their construction
computes the coding matrix, which costs far more than one encode."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import zfec


@lru_cache(maxsize=64)
def zfec_encoder(k: int, n: int) -> Any:
    return zfec.Encoder(k, n)


@lru_cache(maxsize=64)
def zfec_decoder(k: int, n: int) -> Any:
    return zfec.Decoder(k, n)
