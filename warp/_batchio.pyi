from collections.abc import Sequence

from _typeshed import ReadableBuffer

MAX_BATCH: int
MAX_SIZE: int

def recv_many(
    fd: int, max_count: int, max_size: int, /
) -> tuple[list[tuple[bytes, tuple[str, int]]], int, OSError | None]: ...
def send_many(
    fd: int, messages: Sequence[tuple[ReadableBuffer, tuple[str, int]]], start: int, /
) -> int: ...
