"""Restore the contents of a container's tmpfs mount from a checkpoint archive.

CRIU 4.1 dumps each tmpfs it owns as ``tmpfs-dev-<dev>.tar.gz.img``: a gzip tar of
the whole filesystem, made with ``--numeric-owner``, whose first entry ``./`` carries
the mode and owner of the tmpfs root. podman's ``devshm-checkpoint.tar`` has the same
layout for /dev/shm.
"""

import logging

from cerman.errors import SourceError
from workers.extract import extract_tar

log = logging.getLogger(__name__)


def restore_tmpfs(archive, root, *, allow_devices, checkpoint, mountpoint):
    """Extract ``archive`` into the freshly mounted tmpfs at ``root``.

    ``allow_devices`` admits character and block device nodes, which the container's
    /dev tmpfs needs (null, zero, tty, ...). Symlinks, hard links, fifos, modes and
    numeric owners are restored as archived; the archive root sets the mode and owner
    of ``root`` itself. Raises SourceError (UnsafeArchiveError for an entry that
    would land outside ``root``) naming the checkpoint and the mount point.
    """
    try:
        extract_tar(archive, root, allow_devices=allow_devices)
    except SourceError as error:
        error.args = (f"checkpoint {checkpoint!r}: restoring tmpfs {mountpoint}: "
                      f"{error}",)
        raise
    log.debug("checkpoint %r: restored tmpfs %s from %s", checkpoint, mountpoint,
              archive.name)
