"""Checkpoint sources: where a checkpoint's CRIU images and root filesystem come from.

Each source type is a module here (``directory``, ``archive``, ``containerd``) with two
functions:

``fill(config, target) -> list[Path]``
    Fill the empty directory ``target`` with this layout and return the lower
    directories that live outside it (e.g. ``config.rootfs_path``), bottom-most last::

        images/          CRIU image files (required, with inventory.img)
        layers/00 ...    root filesystem layers in overlayfs lower format, 00 topmost
        spec.json        OCI runtime spec of the checkpointed container (optional)
        devshm.tar       contents of the container's /dev/shm (optional)

``fingerprint(config) -> dict``
    A JSON-able value that changes when the source's content changes.

``prepare`` keeps one preparation per checkpoint in ``STATE_DIR/checkpoints/NAME/``, with
``source.json`` recording what it was made from. It reuses a preparation whose record
matches, and otherwise fills a staging directory beside it and swaps it in, so readers
of ``NAME/`` never see a half-written tree. A lock file ``.NAME.lock`` beside it
serializes preparations of one checkpoint across processes.
"""

import contextlib
import fcntl
import importlib
import json
import logging
import os
import time
from pathlib import Path

from cerman.config import SOURCE_TYPES
from cerman.errors import SourceError
from workers.extract import (remove_directory, remove_stale_temporaries,
                             staging_directory)
from workers.sources.model import PreparedCheckpoint

log = logging.getLogger(__name__)

# Bumped when the prepared layout changes, so that older preparations are redone.
LAYOUT_VERSION = 1
RECORD_FILE = "source.json"
IMAGES_DIR = "images"
LAYERS_DIR = "layers"
SPEC_FILE = "spec.json"
DEVSHM_FILE = "devshm.tar"
INVENTORY_IMAGE = "inventory.img"


def source_module(config):
    """Return the module implementing ``config.source.type``."""
    source_type = config.source.type
    if source_type not in SOURCE_TYPES:
        raise SourceError(f"checkpoint {config.name!r}: unknown source type {source_type!r}; "
                          f"use one of {', '.join(SOURCE_TYPES)}")
    try:
        return importlib.import_module(f"{__name__}.{source_type}")
    except ModuleNotFoundError as error:
        raise SourceError(f"checkpoint {config.name!r}: the {source_type} source is not "
                          f"available in this installation ({error}); reinstall cerman") from error


def describe_source(config):
    """Return the source as a person would name it: "archive /srv/fn.tar.zst"."""
    source = config.source
    if source.type == "containerd":
        return f"containerd image {source.image!r} (namespace {source.namespace})"
    return f"{source.type} {source.path}"


def configured_rootfs(config):
    """Return ``[config.rootfs_path]`` after checking it is a directory, or ``[]``."""
    if config.rootfs_path is None:
        return []
    if not config.rootfs_path.is_dir():
        raise SourceError(f"rootfs.path {config.rootfs_path} is not a directory; unpack the "
                          "container's base image there, or remove rootfs.path")
    return [config.rootfs_path]


def checkpoint_dir(name, state_dir):
    return Path(state_dir) / "checkpoints" / name


@contextlib.contextmanager
def _locked(final):
    final.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: the lock file stays after remove(); unlinking it would let two processes
    # hold locks on different inodes of the same name.
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _errors_named(config):
    """Prefix errors with the checkpoint and its source, the context callers lack."""
    prefix = f"checkpoint {config.name!r} ({describe_source(config)})"
    try:
        yield
    except SourceError as error:
        if str(error).startswith(f"checkpoint {config.name!r}"):
            raise
        raise type(error)(f"{prefix}: {error}") from error
    except OSError as error:
        raise SourceError(f"{prefix}: {error}; check that the source is readable and that "
                          "the state directory is writable and has free space") from error


def _record(config, module):
    record = {
        "layout": LAYOUT_VERSION,
        "source": config.source.as_dict(),
        "rootfs_path": str(config.rootfs_path) if config.rootfs_path else None,
        "fingerprint": module.fingerprint(config),
    }
    # Compare in the form it takes after a round trip through source.json.
    return json.loads(json.dumps(record))


def _read_saved(final):
    """Return the saved record of a complete preparation in ``final``, or None."""
    try:
        saved = json.loads((final / RECORD_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("%s: unreadable %s (%s); preparing again", final, RECORD_FILE, error)
        return None
    if not (final / IMAGES_DIR / INVENTORY_IMAGE).is_file():
        log.warning("%s: %s/%s is missing; preparing again", final, IMAGES_DIR,
                    INVENTORY_IMAGE)
        return None
    return saved


def _check_layout(config, directory):
    """Raise SourceError unless ``fill`` left the layout every consumer relies on."""
    inventory = directory / IMAGES_DIR / INVENTORY_IMAGE
    if not inventory.is_file() or inventory.is_symlink():
        raise SourceError(f"the source yielded no {IMAGES_DIR}/{INVENTORY_IMAGE}, so it holds "
                          "no CRIU checkpoint; point the source at a complete checkpoint")
    layers = directory / LAYERS_DIR
    if layers.exists():
        names = sorted(entry.name for entry in layers.iterdir())
        expected = [f"{index:02d}" for index in range(len(names))]
        if names != expected:
            raise SourceError(f"the source yielded layers {names}, expected {expected}; "
                              f"this is a bug in the {config.source.type} source")
    for name in (SPEC_FILE, DEVSHM_FILE):
        path = directory / name
        if os.path.lexists(path) and (path.is_symlink() or not path.is_file()):
            raise SourceError(f"the source yielded {name} that is not a regular file; "
                              "re-export the checkpoint")


def _prepared(config, final, extra_lower_dirs):
    layers = final / LAYERS_DIR
    internal = []
    if layers.is_dir():
        internal = sorted(layers.iterdir(), key=lambda path: int(path.name))
    spec = final / SPEC_FILE
    devshm = final / DEVSHM_FILE
    return PreparedCheckpoint(
        name=config.name,
        images_dir=final / IMAGES_DIR,
        rootfs_layers=tuple(internal) + tuple(Path(path) for path in extra_lower_dirs),
        spec_path=spec if spec.is_file() else None,
        devshm_tar=devshm if devshm.is_file() else None,
    )


def prepare(config, state_dir, replace=True):
    """Return the checkpoint prepared on disk, reusing an up-to-date preparation.

    With ``replace`` false, an existing preparation is returned even when the source
    has changed since, for a caller whose leases still use its files.
    Raises SourceError naming the checkpoint, its source and what to do.
    """
    final = checkpoint_dir(config.name, state_dir)
    module = source_module(config)

    with _errors_named(config), _locked(final):
        saved = _read_saved(final)
        if saved is not None and not replace:
            log.info("checkpoint %s: keeping the preparation in %s while it is in use",
                     config.name, final)
            return _prepared(config, final, saved.get("extra_lower_dirs", []))
        record = _record(config, module)
        if saved is not None and saved.get("record") == record:
            log.info("checkpoint %s: reusing preparation in %s", config.name, final)
            return _prepared(config, final, saved.get("extra_lower_dirs", []))

        remove_stale_temporaries(final)
        started = time.monotonic()
        log.info("checkpoint %s: preparing from %s into %s", config.name,
                 describe_source(config), final)
        # NOTE: replacing a preparation deletes the old tree, including layers that
        # existing overlay mounts may still use as lowerdir; callers rebuild those.
        with staging_directory(final) as staging:
            extra_lower_dirs = [str(path) for path in module.fill(config, staging)]
            _check_layout(config, staging)
            saved = {"record": record, "extra_lower_dirs": extra_lower_dirs}
            (staging / RECORD_FILE).write_text(json.dumps(saved, indent=2) + "\n")
        log.info("checkpoint %s: prepared in %.2f s", config.name,
                 time.monotonic() - started)
        return _prepared(config, final, extra_lower_dirs)


def remove(name, state_dir):
    """Remove the preparation of checkpoint ``name``; return whether there was one."""
    final = checkpoint_dir(name, state_dir)
    if not final.parent.is_dir():
        return False
    try:
        with _locked(final):
            remove_stale_temporaries(final)
            removed = remove_directory(final)
    except OSError as error:
        raise SourceError(f"checkpoint {name!r}: cannot remove {final}: {error}; check "
                          "permissions in the state directory") from error
    if removed:
        log.info("checkpoint %s: removed preparation %s", name, final)
    return removed
