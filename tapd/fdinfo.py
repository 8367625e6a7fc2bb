"""What an fd a client sent is, asked of the kernel without touching the file.

``ioctl``, ``fstat`` and ``getsockopt`` may call into the file's own code: on
a FUSE file an ioctl waits for the FUSE server, which a user may write.  The
fd's ``/proc/self/fd`` link and its ``/proc/self/fdinfo`` entry are answered
by procfs from the struct file alone (fs/proc/fd.c), plus the file's
``show_fdinfo`` hook, which only the kernel's own drivers provide.  tapd
reads them first, and only then uses tun ioctls or socket options on an fd.
"""

from __future__ import annotations

import os


def link(fd: int) -> str:
    """The fd's ``/proc/self/fd`` link: a path, or ``socket:[ino]``,
    ``pipe:[ino]``, ``anon_inode:...``; empty if the fd is not open."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def is_socket(fd: int) -> bool:
    return link(fd).startswith("socket:[")


def tun_name(fd: int) -> str | None:
    """The interface a tun/tap queue fd is attached to, from the ``iff:``
    line only the tun driver prints (drivers/net/tun.c:
    ``tun_chr_show_fdinfo``); None for any other file, or a queue attached
    to nothing."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            text = f.read(4096)
    except OSError:
        return None
    for line in text.split(b"\n"):
        if line.startswith(b"iff:\t"):
            name = line[5:].decode(errors="replace")
            return name or None
    return None
