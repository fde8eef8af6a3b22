"""Kernel primitives for namespaces: unshare, setns, mount, and pinning nsfs files.

A namespace lives as long as a process, an open file descriptor or a bind mount
refers to it. cerman pins pooled namespaces with bind mounts, as ``ip netns add``
does:

1. ``make_private_mount(directory)``: the pin directory becomes a bind mount of
   itself with private propagation, so pins neither propagate into other mount
   namespaces nor form a loop when a mount namespace is pinned there.
2. ``pin(nsfs_path, pin_path)``: create the pin file exclusively and bind-mount
   ``/proc/PID/ns/TYPE`` onto it.
3. ``unpin(pin_path)``: detach the bind mount and remove the file.

``is_pinned`` distinguishes a pin from a leftover plain file, so a restarted worker can
re-adopt the pins it finds. Every kernel failure raises ``NamespaceError`` with
errno, the operation and the path.
"""

import ctypes
import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from cerman.errors import NamespaceError

log = logging.getLogger(__name__)

# Flags of clone(2), unshare(2) and setns(2), from <linux/sched.h>.
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000

# Flags of mount(2), from <linux/mount.h>.
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MS_LAZYTIME = 0x2000000

# Flags of umount2(2).
MNT_FORCE = 0x1
MNT_DETACH = 0x2
MNT_EXPIRE = 0x4
UMOUNT_NOFOLLOW = 0x8

# ioctl(2) on an nsfs file descriptor returning its CLONE_NEW* type (Linux 4.11).
NS_GET_NSTYPE = 0xB703

NSTYPE_FLAGS = {"ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS, "mnt": CLONE_NEWNS}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _encode(value):
    if value is None:
        return None
    return os.fsencode(value)


def _check(result, operation, target=""):
    if result != 0:
        raise NamespaceError(ctypes.get_errno(), operation, str(target))


def unshare(flags):
    """Move the calling process into new namespaces of the types in ``flags``."""
    operation = f"unshare({flags:#x})"
    if hasattr(os, "unshare"):
        try:
            os.unshare(flags)
        except OSError as error:
            raise NamespaceError(error.errno, operation) from None
        return
    _check(_libc.unshare(flags), operation)


def setns(fd, nstype=0):
    """Join the namespace that ``fd`` (an open nsfs file) refers to.

    ``nstype`` is a CLONE_NEW* flag the namespace must have, or 0 for any type.
    """
    operation = f"setns(fd {fd}, {nstype:#x})"
    if hasattr(os, "setns"):
        try:
            os.setns(fd, nstype)
        except OSError as error:
            raise NamespaceError(error.errno, operation) from None
        return
    _check(_libc.setns(fd, nstype), operation)


def mount(source, target, fstype=None, flags=0, data=None):
    """Call mount(2). ``source``, ``fstype`` and ``data`` may be None."""
    result = _libc.mount(_encode(source), _encode(target), _encode(fstype), flags,
                         _encode(data))
    _check(result, f"mount({source!r}, type {fstype!r}, flags {flags:#x})", target)


def umount(target, flags=0):
    """Call umount2(2)."""
    _check(_libc.umount2(_encode(target), flags), f"umount(flags {flags:#x})", target)


def _unescape_mountinfo(field):
    # mountinfo writes space, tab, newline and backslash as 3-digit octal escapes.
    return (field.replace("\\040", " ").replace("\\011", "\t")
            .replace("\\012", "\n").replace("\\134", "\\"))


def mount_points(mountinfo="/proc/self/mountinfo"):
    """Return the mount points listed in ``mountinfo``, in mount order (repeats kept)."""
    points = []
    with open(mountinfo) as file:
        for line in file:
            fields = line.split()
            if len(fields) > 4:
                points.append(_unescape_mountinfo(fields[4]))
    return points


def is_mount_point(path):
    """Return True when ``path`` is the mount point of an entry in this mount namespace."""
    return os.path.realpath(path) in mount_points()


def make_private_mount(directory):
    """Make ``directory`` a private bind mount of itself, creating it if needed.

    Idempotent: when the directory already is a mount point (an earlier call, or a
    restarted worker finding its runtime directory), only its propagation is set.
    """
    directory = Path(os.path.realpath(directory))
    directory.mkdir(parents=True, exist_ok=True)

    if not is_mount_point(directory):
        mount(directory, directory, None, MS_BIND)
        log.info("bind-mounted %s onto itself", directory)
    mount(None, directory, None, MS_PRIVATE | MS_REC)


def release_private_mount(directory):
    """Unmount the bind mount that ``make_private_mount`` made, if it is there.

    Raises ``NamespaceError`` with EBUSY while pins remain inside: unpin them first.
    """
    directory = os.path.realpath(directory)
    if not os.path.isdir(directory) or not is_mount_point(directory):
        return
    umount(directory)
    log.info("unmounted private mount %s", directory)


def pin(nsfs_path, pin_path):
    """Pin the namespace of ``nsfs_path`` (e.g. /proc/PID/ns/ipc) by a bind mount on ``pin_path``.

    ``pin_path`` must not exist. It is created exclusively, so two builders can never
    share one pin. On failure nothing is left at ``pin_path``.
    """
    pin_path = str(pin_path)
    try:
        fd = os.open(pin_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    except OSError as error:
        raise NamespaceError(error.errno, "create pin file", pin_path) from None
    os.close(fd)

    try:
        mount(nsfs_path, pin_path, None, MS_BIND)
    except NamespaceError:
        os.unlink(pin_path)
        raise


def unpin(pin_path):
    """Detach every bind mount on ``pin_path`` and remove the file.

    A missing file is a no-op and a plain file (a pin that never got its mount) is
    removed. The namespace is destroyed once nothing else refers to it.
    """
    pin_path = str(pin_path)
    # A pin made twice stacks two mounts, so detach until the file is plain again.
    while True:
        try:
            umount(pin_path, MNT_DETACH | UMOUNT_NOFOLLOW)
        except NamespaceError as error:
            if error.errno == errno.ENOENT:
                return
            if error.errno == errno.EINVAL:
                break
            raise

    try:
        os.unlink(pin_path)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise NamespaceError(error.errno, "remove pin file", pin_path) from None


def _nsfs_device():
    return os.stat("/proc/self/ns/ipc").st_dev


def is_pinned(pin_path, nstype=None):
    """Return True when ``pin_path`` is an nsfs file, i.e. a live pin.

    With ``nstype`` ("ipc", "uts", "mnt") the pinned namespace must also be of
    that type. All nsfs files share one device number, so a plain file left where
    a pin was unmounted has another one.
    """
    try:
        status = os.stat(pin_path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(status.st_mode) or status.st_dev != _nsfs_device():
        return False
    if nstype is None:
        return True

    fd = os.open(pin_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == NSTYPE_FLAGS[nstype]
    finally:
        os.close(fd)
