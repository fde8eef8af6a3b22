"""Helpers for tests of extraction and checkpoint sources: tar builders, OCI image
unpacking and read-only overlay mounts."""

import contextlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

from workers.rootfs import extract_layer

FIXTURES = Path(__file__).parent / "fixtures"
PODMAN_ARCHIVE = FIXTURES / "podman" / "ipcfixture-checkpoint.tar.zst"
BASE_IMAGE = FIXTURES / "containerd" / "ipcfixture-image.oci.tar"
CRIU_IMAGES = FIXTURES / "criu-ipc-uts" / "images"

FIXED_MTIME = 1_700_000_000


def file_entry(name, data=b"", mode=0o644, uid=0, gid=0, mtime=FIXED_MTIME):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, mtime
    return info, data


def dir_entry(name, mode=0o755, uid=0, gid=0, mtime=FIXED_MTIME):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, mtime
    return info, None


def symlink_entry(name, target, mtime=FIXED_MTIME):
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mtime = mtime
    return info, None


def hardlink_entry(name, target):
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    return info, None


def fifo_entry(name, mode=0o600):
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    info.mode = mode
    return info, None


def device_entry(name, major, minor, kind=tarfile.CHRTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = major, minor
    info.mode = 0o666
    return info, None


def tar_bytes(entries):
    """Return a PAX tar archive of ``entries`` built with the helpers above."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def write_tar(path, entries, compression="none"):
    """Write ``entries`` to ``path`` as plain, gzip or zstd tar, whatever its name."""
    raw = tar_bytes(entries)
    if compression == "gzip":
        import gzip
        raw = gzip.compress(raw)
    elif compression == "zstd":
        raw = subprocess.run(["zstd", "-q", "-c"], input=raw, stdout=subprocess.PIPE,
                             check=True).stdout
    Path(path).write_bytes(raw)
    return Path(path)


def unpack_system_tar(archive, target):
    """Unpack ``archive`` with GNU tar, as an independent reference."""
    Path(target).mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(target), "-I", "zstd -d"],
                   check=True)
    return Path(target)


def pack_zstd_dir(source, archive):
    """Archive the contents of ``source`` with GNU tar and zstd into ``archive``."""
    subprocess.run(["tar", "-cf", str(archive), "-I", "zstd -q", "-C", str(source), "."],
                   check=True)
    return Path(archive)


def unpack_oci_image(oci_tar, work_dir):
    """Extract every layer of the single-manifest OCI layout ``oci_tar`` with
    extract_layer; return the layer directories, topmost first."""
    layout = Path(work_dir) / "layout"
    layout.mkdir(parents=True)
    with tarfile.open(oci_tar) as tar:
        tar.extractall(layout, filter="data")

    def blob(digest):
        algorithm, value = digest.split(":")
        return layout / "blobs" / algorithm / value

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    layers = []
    for number, layer in enumerate(manifest["layers"]):
        directory = Path(work_dir) / f"layer-{number}"
        directory.mkdir()
        extract_layer(blob(layer["digest"]), directory)
        layers.append(directory)
    return layers[::-1]


@contextlib.contextmanager
def overlay(lower_dirs, mountpoint):
    """Mount a read-only overlay of ``lower_dirs`` (topmost first) at ``mountpoint``."""
    mountpoint = Path(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(str(path) for path in lower_dirs)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}",
                    str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
