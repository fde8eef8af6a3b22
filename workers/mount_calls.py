"""Mount helpers for building a container's mount tree: bind mounts with per-mount
flags, and path resolution confined to a container root.
"""

import os
import stat
from pathlib import Path

from workers.namespaces import (MS_BIND, MS_NOATIME, MS_NODEV, MS_NODIRATIME, MS_NOEXEC,
                                MS_NOSUID, MS_RDONLY, MS_REC, MS_RELATIME, MS_REMOUNT,
                                MS_STRICTATIME, mount)

# The per-mount flags that a mount or a bind remount may set. CRIU's mnt_entry.flags
# uses the MS_* encoding and also carries propagation bits, which are not per-mount.
PER_MOUNT_FLAGS = (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME
                   | MS_NODIRATIME | MS_RELATIME | MS_STRICTATIME)

# Linux follows at most 40 symlinks while resolving one path (fs/namei.c MAXSYMLINKS).
MAX_SYMLINKS = 40


def bind(source, target, *, recursive=False, flags=0):
    """Bind-mount ``source`` on ``target``, then set exactly ``flags`` on the new mount.

    mount(2) ignores per-mount flags given with a plain MS_BIND and the new mount
    inherits those of the source mount; a second MS_REMOUNT | MS_BIND call replaces
    them, which also clears a nosuid or ro that ``flags`` lacks.
    """
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    mount(None, target, None, MS_REMOUNT | MS_BIND | (flags & PER_MOUNT_FLAGS))


def resolve_inside(root, path):
    """Return ``root`` joined with ``path``, with every symlink resolved inside ``root``.

    Absolute symlink targets are taken relative to ``root`` and ``..`` stops at
    ``root``, as if the container had chrooted there, so a mount point cannot lead
    out of the container's tree. Components that do not exist yet are kept as
    given. Raises ValueError after MAX_SYMLINKS links.
    """
    root = Path(root)
    pending = [part for part in str(path).split("/") if part not in ("", ".")]
    resolved = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            resolved.append(part)
            continue
        if not stat.S_ISLNK(mode):
            resolved.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise ValueError(f"{path}: more than {MAX_SYMLINKS} symlinks below {root}")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending = [p for p in target.split("/") if p not in ("", ".")] + pending
    return root.joinpath(*resolved)
