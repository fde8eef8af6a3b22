"""Build a container's mount tree in a fresh mount namespace, and remove its bundle.

``populate_mnt`` runs in a short-lived child that has already unshared its mount
namespace and made ``/`` recursively private; the parent pins the namespace
afterwards. Per bundle it builds::

    bundle/upper, bundle/work     overlay upper and work directories (host filesystem)
    bundle/rootfs                 overlay of the checkpoint's layers, then every mount
                                  recorded in the checkpoint's mountpoints-*.img

The mounts follow CRIU's record rather than the OCI spec, because the record is what
the checkpointed processes saw. runc skips spec entries that did not apply (a masked
path missing from that kernel's /proc), and the record carries the effective flags
and tmpfs options. Each recorded mount becomes one of:

- a fresh filesystem (proc, sysfs, tmpfs, devpts, mqueue, cgroup) with the recorded
  options; a tmpfs gets its contents back from ``tmpfs-dev-<dev>.tar.gz.img``;
- a bind of a directory or file of another recorded mount (``/proc/sys`` from
  ``/proc``, a masked file from the container's own ``/dev/null``);
- a bind of a host path for an external mount, whose source the OCI spec names.

Every mount then gets exactly the recorded per-mount flags. Spec masked and read-only
paths that the record lacks but that exist here are applied last, as runc does.

``release_bundle`` runs in the worker's own (host) mount namespace, where none of
these mounts exist, and removes the bundle directory.
"""

import errno
import json
import logging
import os
import shutil
import stat
from pathlib import Path

from cerman import paths as cerman_paths
from cerman.errors import ImageError, NamespaceError, PoolError, SourceError
from workers import namespaces
from workers.criu import images as criu_images
from workers.mount_calls import PER_MOUNT_FLAGS, bind, resolve_inside
from workers.namespaces import MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY
from workers.tmpfs_restore import restore_tmpfs

log = logging.getLogger(__name__)

# CRIU images/mnt.proto ``fstype`` enum values.
FSTYPE_PROC = 1
FSTYPE_SYSFS = 2
FSTYPE_TMPFS = 5
FSTYPE_DEVPTS = 6
FSTYPE_CGROUP = 12
FSTYPE_MQUEUE = 14
FSTYPE_CGROUP2 = 23

# Filesystems that a builder mounts afresh: they hold no data of their own (proc,
# sysfs, devpts, mqueue, cgroup) or their data is in the checkpoint's tmpfs images.
FRESH_FILESYSTEMS = {
    FSTYPE_PROC: "proc",
    FSTYPE_SYSFS: "sysfs",
    FSTYPE_TMPFS: "tmpfs",
    FSTYPE_DEVPTS: "devpts",
    FSTYPE_CGROUP: "cgroup",
    FSTYPE_MQUEUE: "mqueue",
    FSTYPE_CGROUP2: "cgroup2",
}

# The ext_key of a masked file in checkpoints made by runc 1.1.5 (both fixtures); the
# restoring side provides a /dev/null for it.
MASKED_FILE_KEY = "/dev/null"

# mount(2) copies at most one page of option data.
MOUNT_DATA_MAX = 4095


def populate_mnt(prepared, bundle):
    """Build the mount tree of ``prepared`` under ``bundle``; return ``bundle/rootfs``.

    Must run in a mount namespace of its own whose ``/`` is private: every mount made
    here stays in that namespace. Raises PoolError when the checkpoint has no root
    filesystem, SourceError when a bind source is missing on this host, ImageError for
    an unreadable mountpoints image and NamespaceError when a mount fails.
    """
    bundle = Path(bundle)
    rootfs = bundle / "rootfs"
    for name in ("upper", "work", "rootfs"):
        (bundle / name).mkdir(parents=True, exist_ok=True)

    entries = criu_images.read_mountpoints(prepared.images_dir)
    ordered = tree_order(entries, prepared)
    spec = read_spec(prepared)
    tmpfs_images = criu_images.list_tmpfs_images(prepared.images_dir)

    mount_overlay(prepared, bundle, ordered[0].flags)
    add_engine_files(spec, rootfs)
    builder = _TreeBuilder(prepared, rootfs, ordered, spec, tmpfs_images)
    for entry in ordered[1:]:
        builder.mount_entry(entry)
    builder.apply_spec_paths()

    log.info("checkpoint %r: built mount tree of %d mounts at %s", prepared.name,
             len(ordered) + builder.spec_mounts, rootfs)
    return rootfs


def tree_order(entries, prepared):
    """Return ``entries`` in an order in which each can be mounted: root mount first.

    An entry comes after its parent and, when it binds a part of a filesystem, after
    the mount of that whole filesystem (``/proc/keys`` bound from the container's
    ``/dev/null`` waits for ``/dev``). Otherwise entries keep the reverse of the image
    order: CRIU 4.1 writes mountpoints-*.img children before parents, and among
    siblings on the same mount point the later mount must stay on top.
    """
    by_id = {entry.mnt_id: entry for entry in entries}
    roots = [entry for entry in entries if entry.parent_mnt_id not in by_id]
    if len(roots) != 1 or mountpoint_of(roots[0]) != "/":
        found = ", ".join(repr(entry.mountpoint) for entry in roots) or "none"
        raise ImageError(prepared.images_dir, f"checkpoint {prepared.name!r}: the "
                         f"mountpoints image has {len(roots)} root mounts ({found}), "
                         "expected exactly one at '/'; re-dump the checkpoint with its "
                         "mount namespace")

    sources = whole_filesystem_mounts(entries)
    ordered = [roots[0]]
    placed = {roots[0].mnt_id}
    pending = [entry for entry in reversed(entries) if entry is not roots[0]]
    while pending:
        for entry in pending:
            source = sources.get(entry.root_dev, entry)
            if entry.parent_mnt_id in placed and (source is entry or source.mnt_id in placed):
                break
        else:
            stuck = ", ".join(mountpoint_of(entry) for entry in pending)
            raise ImageError(prepared.images_dir, f"checkpoint {prepared.name!r}: mounts "
                             f"{stuck} depend on each other in a cycle; re-dump the "
                             "checkpoint")
        pending.remove(entry)
        ordered.append(entry)
        placed.add(entry.mnt_id)
    return ordered


def whole_filesystem_mounts(entries):
    """Return, by device, the first recorded mount of a whole filesystem (root "/").

    These are the sources of the binds of a part of one. External mounts are not,
    because their device is the host's.
    """
    whole = {}
    for entry in reversed(entries):
        if entry.root == "/" and not entry.ext_key:
            whole.setdefault(entry.root_dev, entry)
    return whole


def mountpoint_of(entry):
    """Return the entry's mount point as an absolute path inside the container."""
    relative = entry.mountpoint.lstrip(".").strip("/")
    return "/" + relative


def read_spec(prepared):
    """Return the OCI runtime spec as a dict, or an empty one when the source has none."""
    if prepared.spec_path is None:
        return {}
    try:
        with open(prepared.spec_path) as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise SourceError(f"checkpoint {prepared.name!r}: OCI spec {prepared.spec_path} "
                          f"cannot be read: {error}; prepare the checkpoint again") from error


def mount_overlay(prepared, bundle, flags):
    """Mount the overlay of the checkpoint's layers on ``bundle/rootfs``."""
    if not prepared.rootfs_layers:
        raise PoolError(f"checkpoint {prepared.name!r} has no root filesystem for a mount "
                        "namespace; set rootfs.path in its config or use a source that "
                        "carries one")
    layers = [str(layer) for layer in prepared.rootfs_layers]
    for layer in layers + [str(bundle)]:
        # overlayfs splits lowerdir at ':' and its options at ','.
        if ":" in layer or "," in layer:
            raise PoolError(f"checkpoint {prepared.name!r}: path {layer} contains ':' or "
                            "',', which overlayfs options cannot carry; move the state "
                            "directory to a path without them")
    data = (f"lowerdir={':'.join(layers)},upperdir={bundle / 'upper'},"
            f"workdir={bundle / 'work'}")
    if len(data) > MOUNT_DATA_MAX:
        raise PoolError(f"checkpoint {prepared.name!r}: the overlay options for "
                        f"{len(layers)} layers are {len(data)} bytes, above the "
                        f"{MOUNT_DATA_MAX} bytes mount(2) accepts; use a shorter state "
                        "directory path or flatten the image")
    namespaces.mount("overlay", bundle / "rootfs", "overlay", flags & PER_MOUNT_FLAGS, data)


def add_engine_files(spec, rootfs):
    """Create the files a container engine adds to every container's root filesystem.

    podman 4 creates /etc/mtab as a symlink to /proc/mounts when the image lacks it,
    and leaves it out of the checkpoint's rootfs-diff.tar. The file lands in the
    bundle's upper directory.
    """
    annotations = spec.get("annotations") or {}
    if annotations.get("io.container.manager") != "libpod":
        return
    mtab = resolve_inside(rootfs, "/etc/mtab")
    if not os.path.lexists(mtab) and mtab.parent.is_dir():
        os.symlink("/proc/mounts", mtab)


class _TreeBuilder:
    """Mounts the recorded entries, in tree order, under one container root."""

    def __init__(self, prepared, rootfs, ordered, spec, tmpfs_images):
        self.prepared = prepared
        self.rootfs = rootfs
        self.spec = spec
        self.tmpfs_images = tmpfs_images
        self.spec_mounts = 0
        self.whole = whole_filesystem_mounts(ordered[::-1])
        self.fstypes = {mountpoint_of(entry): entry.fstype for entry in ordered}

    def mount_entry(self, entry):
        point = mountpoint_of(entry)
        source = self.whole.get(entry.root_dev)
        if entry.fstype == FSTYPE_TMPFS and point == "/dev/shm" and self.prepared.devshm_tar:
            # podman mounts a host tmpfs of its own at /dev/shm and exports its
            # contents separately. A fresh tmpfs keeps the pool apart from that host
            # directory, which other users of the podman container may share.
            self.mount_tmpfs(entry, point, self.prepared.devshm_tar, allow_devices=False)
        elif source is not None and source is not entry:
            self.bind_part(entry, point, source)
        elif entry.fstype in (FSTYPE_CGROUP, FSTYPE_CGROUP2):
            self.mount_cgroup(entry, point)
        elif entry.fstype == FSTYPE_TMPFS and not entry.ext_key:
            image = self.tmpfs_images.get(entry.root_dev)
            self.mount_tmpfs(entry, point, image, allow_devices=True)
        elif entry.fstype in FRESH_FILESYSTEMS and entry.root == "/" and not entry.ext_key:
            self.mount_fresh(entry, point)
        elif entry.ext_key:
            self.bind_external(entry, point)
        else:
            raise PoolError(f"checkpoint {self.prepared.name!r}: mount {point} "
                            f"({entry.source}, fstype {entry.fstype}, root {entry.root}) is "
                            "neither a filesystem cerman can mount afresh nor an external "
                            "bind mount; mnt pools cannot be built for this checkpoint")

    def target(self, point, *, directory=True):
        """Return the mount point under the container root, creating it if missing.

        Returns None, and logs, for a path under proc or sysfs that this kernel lacks:
        it cannot be created and has nothing to mask.
        """
        try:
            path = resolve_inside(self.rootfs, point)
        except ValueError as error:
            raise PoolError(f"checkpoint {self.prepared.name!r}: mount point {point}: "
                            f"{error}; fix the image's symlinks") from error
        if os.path.lexists(path):
            return path
        if self.on_kernel_filesystem(point):
            log.warning("checkpoint %r: %s does not exist on this kernel; not mounting it",
                        self.prepared.name, point)
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if directory:
                path.mkdir()
            else:
                path.touch()
        except OSError as error:
            raise NamespaceError(error.errno, f"create mount point {point} of checkpoint "
                                 f"{self.prepared.name!r}", str(path)) from error
        return path

    def on_kernel_filesystem(self, point):
        """Return True when the nearest recorded mount above ``point`` is proc or sysfs."""
        ancestors = [mounted for mounted in self.fstypes
                     if mounted != point and (mounted == "/" or point.startswith(mounted + "/"))]
        nearest = max(ancestors, key=len, default="/")
        return self.fstypes.get(nearest) in (FSTYPE_PROC, FSTYPE_SYSFS)

    def mount_fresh(self, entry, point):
        fstype = FRESH_FILESYSTEMS[entry.fstype]
        path = self.target(point)
        if path is None:
            return
        # NOTE: proc, sysfs and mqueue show the namespaces of the mounting process (pid,
        # network, IPC), which is this builder in the host's namespaces, not the
        # container's restored ones.
        namespaces.mount(entry.source or fstype, path, fstype,
                         entry.flags & PER_MOUNT_FLAGS, entry.options or None)

    def mount_tmpfs(self, entry, point, image, *, allow_devices):
        path = self.target(point)
        if path is None:
            return
        namespaces.mount(entry.source or "tmpfs", path, "tmpfs",
                         entry.flags & PER_MOUNT_FLAGS & ~MS_RDONLY, entry.options or None)
        if image is not None:
            restore_tmpfs(image, path, allow_devices=allow_devices,
                          checkpoint=self.prepared.name, mountpoint=point)
        if entry.flags & MS_RDONLY:
            # Read-only only after the contents are written.
            namespaces.mount(None, path, None, namespaces.MS_REMOUNT
                             | (entry.flags & PER_MOUNT_FLAGS), entry.options or None)

    def mount_cgroup(self, entry, point):
        # NOTE: runc binds the container's own cgroup directory (the recorded root),
        # which exists only after a restore has created that cgroup. So the
        # hierarchy's root is mounted here instead. CRIU restores the tasks' cgroup
        # membership from cgroup.img, independently of this mount.
        fstype = FRESH_FILESYSTEMS[entry.fstype]
        path = self.target(point)
        if path is None:
            return
        namespaces.mount(fstype, path, fstype,
                         entry.flags & PER_MOUNT_FLAGS, entry.options or None)

    def bind_part(self, entry, point, source):
        """Bind a path of a mount already in the tree, as the record shows it."""
        source_path = resolve_inside(self.rootfs, mountpoint_of(source) + entry.root)
        if not os.path.lexists(source_path):
            raise PoolError(f"checkpoint {self.prepared.name!r}: mount {point} binds "
                            f"{entry.root} of the mount at {mountpoint_of(source)}, which "
                            "has no such path after its contents were restored; re-dump "
                            "the checkpoint")
        path = self.target(point, directory=os.path.isdir(source_path))
        if path is not None:
            bind(source_path, path, flags=entry.flags)

    def bind_external(self, entry, point):
        """Bind the host source that the OCI spec names for an external mount."""
        if entry.ext_key == MASKED_FILE_KEY:
            source = Path("/dev/null")
            recursive = False
        else:
            source, recursive = self.spec_source(entry, point)
        if not os.path.lexists(source):
            raise SourceError(f"checkpoint {self.prepared.name!r}: bind mount {point} needs "
                              f"its source {source}, which is missing on this host; "
                              "create it (the restoring host must provide every bind "
                              "source) and the pool will be refilled")
        path = self.target(point, directory=os.path.isdir(source))
        if path is not None:
            bind(source, path, recursive=recursive, flags=entry.flags)

    def spec_source(self, entry, point):
        """Return the spec's source of the external mount and whether it is recursive.

        runc checkpoints each bind mount of the spec as an external mount keyed by its
        destination. The podman binds of /etc/hostname, /etc/hosts, /etc/resolv.conf
        and /run/.containerenv name files in podman's per-container run directory.
        They are treated like any bind mount: a host without them rejects the pool,
        and no other container's or host file is bound in their place.
        """
        for mount in self.spec.get("mounts", []):
            if mount.get("destination", "").rstrip("/") == entry.ext_key.rstrip("/"):
                options = mount.get("options") or []
                return Path(mount.get("source", "")), "rbind" in options
        raise SourceError(f"checkpoint {self.prepared.name!r}: external mount {point} has "
                          f"key {entry.ext_key!r}, which no mount of the OCI spec "
                          f"({self.prepared.spec_path}) names; the checkpoint source must "
                          "carry the container's spec")

    def apply_spec_paths(self):
        """Mask and make read-only the spec paths that the record lacks but exist here.

        runc skips paths that do not exist, so a checkpoint from another kernel may
        record fewer masks than this kernel needs.
        """
        linux = self.spec.get("linux", {})
        for point in linux.get("maskedPaths", []):
            if point not in self.fstypes:
                self.mask(point)
        for point in linux.get("readonlyPaths", []):
            if point not in self.fstypes:
                self.make_readonly(point)

    def mask(self, point):
        path = resolve_inside(self.rootfs, point)
        if not os.path.lexists(path):
            return
        if stat.S_ISDIR(os.lstat(path).st_mode):
            namespaces.mount("tmpfs", path, "tmpfs", MS_RDONLY)
        else:
            bind("/dev/null", path)
        self.spec_mounts += 1

    def make_readonly(self, point):
        path = resolve_inside(self.rootfs, point)
        if not os.path.lexists(path):
            return
        bind(path, path, recursive=True, flags=MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        self.spec_mounts += 1


def release_bundle(bundle, *, state_dir=None):
    """Remove a bundle directory that ``populate_mnt`` filled.

    Called in the worker's mount namespace after the pinned namespace is gone, where
    ``bundle/rootfs`` is a plain directory. Rejects paths that are not
    ``STATE_DIR/bundles/CHECKPOINT/NAME`` and bundles with a mount point inside,
    because removing files through a bind mount would delete its source.
    """
    state_dir = Path(state_dir or cerman_paths.resolve().state_dir).resolve()
    bundles = state_dir / "bundles"
    bundle = Path(bundle)
    resolved = bundle.resolve()
    if resolved.parent.parent != bundles or bundle.is_symlink():
        raise PoolError(f"bundle {bundle} is not a directory under {bundles}/CHECKPOINT/; "
                        "not removing it")
    if not os.path.lexists(resolved):
        return False

    inside = [point for point in namespaces.mount_points()
              if point == str(resolved) or point.startswith(f"{resolved}/")]
    if inside:
        raise NamespaceError(errno.EBUSY, f"remove bundle with {len(inside)} mounts inside "
                             f"(first {inside[0]}); unmount them or unpin the namespace "
                             "first", str(resolved))
    shutil.rmtree(resolved)
    log.info("removed bundle %s", resolved)
    return True
