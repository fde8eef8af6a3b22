"""Root filesystem layers in overlayfs lower-layer format.

An OCI image layer marks deletions with files: ``DIR/.wh.NAME`` removes NAME from the
layers below, ``DIR/.wh..wh..opq`` hides everything the layers below have in DIR.
overlayfs expects instead a character device 0:0 named NAME (a whiteout) and the
extended attribute ``trusted.overlay.opaque=y`` on DIR. ``extract_layer`` writes a layer
in overlayfs' form, so extracted layers stack directly as ``lowerdir=top:...:base``
without copying a base layer into a merged tree. overlayfs honours whiteouts and opaque
directories in every lower layer but the bottom one (Linux 4.0 and later).

Per the OCI image spec, a whiteout applies only to the layers below: an entry of the
same layer with the whiteout's target name is kept, and the whiteout dropped.

A directory that a layer creates only as the parent of an entry has no attributes of its
own in the layer, but overlayfs shows the topmost layer's directory attributes.
``inherit_directory_attributes`` copies them from the layers below, so that /tmp stays
1777 when the top layer merely adds a file to it.
"""

import logging
import os
import posixpath
import stat
from pathlib import Path, PurePosixPath

from cerman.errors import SourceError
from workers.extract import extract_tar, make_parents, normalize_entry_name

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# aufs bookkeeping entries (".wh..wh.plnk", ".wh..wh.aufs") that carry no deletion.
AUFS_META_PREFIX = ".wh..wh."
OPAQUE_XATTR = "trusted.overlay.opaque"


def extract_layer(layer_tar, target, *, allow_devices=False):
    """Extract the OCI layer ``layer_tar`` into the directory ``target`` in overlay format.

    Returns the set of directories (relative paths) created only as parents, for
    ``inherit_directory_attributes``. Raises SourceError (UnsafeArchiveError for
    entries that could land outside ``target``).
    """
    target = Path(target)
    whiteouts = []

    def keep_whiteouts_aside(name):
        if posixpath.basename(name).startswith(WHITEOUT_PREFIX):
            whiteouts.append(PurePosixPath(name))
            return None
        return name

    implicit_dirs = extract_tar(layer_tar, target, allow_devices=allow_devices,
                                members=keep_whiteouts_aside)

    for marker in whiteouts:
        name = marker.name
        if name == OPAQUE_MARKER:
            implicit_dirs.update(_make_opaque(target, marker.parent, layer_tar))
        elif name.startswith(AUFS_META_PREFIX):
            log.debug("layer %s: ignoring aufs entry %s", layer_tar, marker)
        else:
            hidden = marker.parent / name[len(WHITEOUT_PREFIX):]
            implicit_dirs.update(_make_whiteout(target, hidden, layer_tar))
    return implicit_dirs


def apply_deleted_files(deleted, layer_dir, origin="deleted.files"):
    """Add a whiteout to ``layer_dir`` for each path in ``deleted``.

    ``deleted`` is podman's and CRI-O's ``deleted.files`` list: paths in the container,
    absolute or relative to its root. ``origin`` names the list in error messages.
    Returns the set of directories created only as parents.
    """
    implicit_dirs = set()
    for path in deleted:
        if not isinstance(path, str) or not path.strip("/"):
            raise SourceError(f"{origin}: {path!r} is not a path below the root; "
                              "re-export the checkpoint")
        relative = normalize_entry_name(path.lstrip("/"), origin)
        implicit_dirs.update(_make_whiteout(Path(layer_dir), relative, origin))
    return implicit_dirs


def _make_whiteout(layer_dir, relative, origin):
    created = make_parents(layer_dir, relative, origin, str(relative))
    path = layer_dir / relative
    if os.path.lexists(path):
        log.debug("%s: %s exists in the same layer; keeping it, not its whiteout",
                  origin, relative)
        return created
    with _parent_times_kept(path):
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    return created


def _make_opaque(layer_dir, relative, origin):
    created = []
    if relative != PurePosixPath("."):
        created = make_parents(layer_dir, relative / OPAQUE_MARKER, origin,
                               str(relative / OPAQUE_MARKER))
    os.setxattr(layer_dir / relative, OPAQUE_XATTR, b"y", follow_symlinks=False)
    return created


class _parent_times_kept:
    """Restore the parent directory's mtime after adding an entry to it.

    Whiteouts are added after extraction has set the directory's mtime from the layer.
    """

    def __init__(self, path):
        self.parent = Path(path).parent

    def __enter__(self):
        self.status = os.lstat(self.parent)

    def __exit__(self, *exc_info):
        os.utime(self.parent, ns=(self.status.st_atime_ns, self.status.st_mtime_ns),
                 follow_symlinks=False)


def inherit_directory_attributes(layer_dir, directories, lower_dirs):
    """Give each of ``directories`` the mode, owner and mtime it has in ``lower_dirs``.

    ``directories`` are relative paths in ``layer_dir``; ``lower_dirs`` are the layers
    below it, topmost first. A directory that no lower layer has keeps its attributes.
    Parents are handled after their children, whose creation would change their mtime.
    """
    layer_dir = Path(layer_dir)
    for relative in sorted(directories, key=lambda path: len(path.parts), reverse=True):
        status = _lower_directory_status(relative, lower_dirs)
        if status is None:
            continue
        path = layer_dir / relative
        os.chown(path, status.st_uid, status.st_gid, follow_symlinks=False)
        os.chmod(path, stat.S_IMODE(status.st_mode))
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns), follow_symlinks=False)


def _lower_directory_status(relative, lower_dirs):
    """Return the lstat of ``relative`` in the topmost lower layer that has it as a
    directory reached without symlinks, as overlayfs would look it up."""
    for lower in lower_dirs:
        current = Path(lower)
        try:
            status = os.lstat(current)
            for part in relative.parts:
                if not stat.S_ISDIR(status.st_mode):
                    break
                current = current / part
                status = os.lstat(current)
            if stat.S_ISDIR(status.st_mode):
                return status
        except FileNotFoundError:
            pass
        # NOTE: a whiteout or an opaque directory in a higher lower layer would hide this
        # one from overlayfs; the first directory found is used regardless.
    return None
