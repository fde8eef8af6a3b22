"""Directory source: CRIU images as ``criu dump -D`` or ``runc checkpoint --image-path``
wrote them.

The images are hard-linked into the preparation when the state directory is on the
same filesystem, and copied otherwise. The root filesystem, if any, is
``config.rootfs_path``, used in place as the bottom lower layer.
"""

import errno
import logging
import os
import shutil
from pathlib import Path

from cerman.errors import SourceError
from workers.sources import INVENTORY_IMAGE, configured_rootfs

log = logging.getLogger(__name__)

# Errors of link(2) after which a copy is the way to go.
LINK_FALLBACK_ERRNOS = (errno.EXDEV, errno.EPERM, errno.EMLINK)


def _images_dir(config):
    path = config.source.path
    if not path.is_dir():
        raise SourceError(f"source.path {path} is not a directory; point it at the "
                          "directory given to criu dump -D or runc checkpoint --image-path")
    if not (path / INVENTORY_IMAGE).is_file():
        raise SourceError(f"source.path {path} has no {INVENTORY_IMAGE}, so it does not hold "
                          "CRIU images; point it at the directory given to criu dump -D "
                          "or runc checkpoint --image-path")
    return path


def fingerprint(config):
    """Return the name, size and mtime of every file under the images directory."""
    root = _images_dir(config)
    files = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            status = path.lstat()
            files.append([str(path.relative_to(root)), status.st_size, status.st_mtime_ns])
    return {"path": str(root), "files": sorted(files)}


def fill(config, target):
    """Link or copy the CRIU images into ``target/images``; return the rootfs lower dir."""
    source = _images_dir(config)
    lower_dirs = configured_rootfs(config)

    # NOTE: hard-linked images share inodes with the source directory, so rewriting a
    # source file in place also changes the prepared copy until the next prepare.
    copied = []

    def link_or_copy(source_file, destination):
        if not copied:
            try:
                os.link(source_file, destination, follow_symlinks=False)
                return destination
            except OSError as error:
                if error.errno not in LINK_FALLBACK_ERRNOS:
                    raise
                log.info("images in %s cannot be hard-linked into %s (%s); copying them",
                         source, target, error.strerror)
        copied.append(source_file)
        return shutil.copy2(source_file, destination, follow_symlinks=False)

    shutil.copytree(source, Path(target) / "images", symlinks=True,
                    copy_function=link_or_copy)
    return lower_dirs
