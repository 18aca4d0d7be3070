"""Files that hold a private key: read one, write one 0600, warn when others may read one.

The warning reads as `wg`'s (``Warning: `/etc/wireguard/wg0.conf' is world accessible``), so
an operator who knows WireGuard recognises it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["access_warning", "read_private_key_text", "write_private_file"]


def access_warning(path: str | os.PathLike[str]) -> str | None:
    """A one-line warning if ``path`` may be read or written by its group or by others."""
    name = os.fspath(path)
    try:
        mode = stat.S_IMODE(os.stat(name).st_mode)
    except OSError:
        return None  # reading it reports the problem
    if mode & 0o007:
        who = "world accessible"
    elif mode & 0o070:
        who = "group accessible"
    else:
        return None
    return f"Warning: `{name}' is {who} (mode {mode:04o}) and holds a private key; chmod 600 {name}"


def read_private_key_text(path: str | os.PathLike[str]) -> str:
    """The key text in a key file: a bare key (``wg genkey``, ``warp-keygen -o``) or
    warp-keygen's printed pair (the ``Private key:`` line). `ValueError` with a user message."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"cannot read {name}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"cannot read {name}: is a directory") from None
    except OSError as exc:
        raise ValueError(f"cannot read {name}: {(exc.strerror or str(exc)).lower()}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{name} is not a text key file") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.lower().startswith("private key:"):
            return line.split(":", 1)[1].strip()
    if len(lines) != 1:
        raise ValueError(f"{name} must hold one private key (found {len(lines)} lines)")
    return lines[0]


def write_private_file(path: str | os.PathLike[str], text: str, *, force: bool) -> None:
    """Write ``text`` to ``path`` with mode 0600, whatever the umask.

    Without ``force`` an existing file is refused (`FileExistsError`). With it the file is
    replaced, and its mode is set to 0600 too: a private key must not keep the 0644 of the
    file it replaces. Other `OSError`s propagate.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(os.fspath(path), flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            fd = -1
            handle.write(text)
    finally:
        if fd >= 0:
            os.close(fd)
