"""Archive source: checkpoint archives of podman, CRI-O and the kubelet.

``podman container checkpoint --export`` and CRI-O (which the kubelet's checkpoint API
uses) write one tar archive, plain, gzip or zstd, containing::

    checkpoint/               CRIU images
    rootfs-diff.tar           files the container added or changed in its root filesystem
    deleted.files             JSON list of paths the container deleted (absent if none)
    spec.dump                 the container's OCI runtime spec
    config.dump               the engine's container config (not used here)
    devshm-checkpoint.tar     contents of /dev/shm when the engine mounts it separately

These become ``images/``, ``layers/00`` (the rw layer with whiteouts for the deleted
files), ``spec.json`` and ``devshm.tar``. The base image is not in the archive: it is
``config.rootfs_path``, returned as the bottom lower layer.
"""

import json
import logging
import os
import stat
from pathlib import Path, PurePosixPath

from cerman.errors import SourceError
from workers.extract import extract_tar
from workers.rootfs import apply_deleted_files, extract_layer, inherit_directory_attributes
from workers.sources import configured_rootfs

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED_FILES = "deleted.files"
# Single files of the archive and their names in the preparation.
FILE_ROUTES = {
    ROOTFS_DIFF: ROOTFS_DIFF,
    DELETED_FILES: DELETED_FILES,
    "spec.dump": "spec.json",
    "devshm-checkpoint.tar": "devshm.tar",
}


def _archive_path(config):
    path = config.source.path
    if not path.is_file():
        raise SourceError(f"source.path {path} is not a file; point it at the archive of "
                          "podman container checkpoint --export or of a CRI-O checkpoint")
    return path


def fingerprint(config):
    """Return the archive's path, size, mtime and inode number."""
    path = _archive_path(config)
    status = path.stat()
    return {"path": str(path), "size": status.st_size, "mtime_ns": status.st_mtime_ns,
            "inode": status.st_ino}


def _route(name):
    """Map an archive entry to its place in the preparation, or None to skip it."""
    top, _, rest = name.partition("/")
    if top == CHECKPOINT_DIR:
        return f"images/{rest}" if rest else "images"
    if not rest and top in FILE_ROUTES:
        return FILE_ROUTES[top]
    return None


def _check_regular_files(target, archive):
    """Raise unless every extracted file is a regular file or directory.

    CRIU images and the single files are never symlinks or devices, and a symlink there
    would make the readers of the preparation open a file outside it.
    """
    for directory, dirnames, filenames in os.walk(target):
        for name in dirnames + filenames:
            path = Path(directory, name)
            mode = path.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise SourceError(f"archive {archive}: {path.relative_to(target)} is not a "
                                  "regular file; re-export the checkpoint")


def _read_deleted_files(path, archive):
    try:
        deleted = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise SourceError(f"archive {archive}: {DELETED_FILES} is not valid JSON ({error}); "
                          "re-export the checkpoint") from error
    if not isinstance(deleted, list):
        raise SourceError(f"archive {archive}: {DELETED_FILES} is not a JSON list of paths; "
                          "re-export the checkpoint")
    return deleted


def _build_rw_layer(target, archive, lower_dirs):
    """Turn rootfs-diff.tar and deleted.files into ``layers/00``, if either exists."""
    diff = target / ROOTFS_DIFF
    deleted = target / DELETED_FILES
    if not diff.exists() and not deleted.exists():
        return

    layer = target / "layers" / "00"
    layer.mkdir(parents=True)
    implicit_dirs = {PurePosixPath(".")}
    if diff.exists():
        implicit_dirs = extract_layer(diff, layer)
        diff.unlink()
    if deleted.exists():
        paths = _read_deleted_files(deleted, archive)
        implicit_dirs |= apply_deleted_files(paths, layer, f"{archive}: {DELETED_FILES}")
        deleted.unlink()
        log.debug("archive %s: %d deleted files became whiteouts", archive, len(paths))
    inherit_directory_attributes(layer, implicit_dirs, lower_dirs)


def fill(config, target):
    """Extract the checkpoint archive into ``target``; return the base image directory."""
    archive = _archive_path(config)
    target = Path(target)
    lower_dirs = configured_rootfs(config)

    extract_tar(archive, target, members=_route)
    if not (target / "images").is_dir():
        raise SourceError(f"archive {archive} has no {CHECKPOINT_DIR}/ directory, so it is "
                          "not a podman or CRI-O checkpoint archive; export it with "
                          "podman container checkpoint --export")
    _check_regular_files(target, archive)

    _build_rw_layer(target, archive, lower_dirs)
    if not lower_dirs:
        log.info("archive %s: no rootfs.path is configured, so the root filesystem is only "
                 "the checkpoint's rw layer", archive)
    return lower_dirs
