"""Helpers for mount-namespace builder tests: prepared fixture checkpoints and a child
process holding a private mount namespace.

``prepare_containerd_fixture`` and ``prepare_podman_fixture`` unpack the real fixture
checkpoints into a ``PreparedCheckpoint`` as a checkpoint source would: CRIU images,
lower layers in overlayfs format (topmost first), the OCI spec and podman's /dev/shm
archive. The fixture layers contain no OCI whiteouts; the helpers raise if one
appears, since they do not convert them.

``namespace_child(function, *args)`` forks a child that unshares its mount namespace,
makes ``/`` recursively private and runs ``function``. The parent gets the result or
the re-raised exception. The child, and its namespace, live until the context exits,
so every mount made there disappears with them, also when a test fails.
"""

import contextlib
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tarfile
import traceback
from pathlib import Path

from workers import namespaces
from workers.extract import extract_tar
from workers.sources.containerd import decode_any
from workers.sources.model import PreparedCheckpoint

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
CONTAINERD_CHECKPOINT = FIXTURES / "containerd" / "ck-ipcfixture.oci.tar"
BASE_IMAGE = FIXTURES / "containerd" / "ipcfixture-image.oci.tar"
PODMAN_CHECKPOINT = FIXTURES / "podman" / "ipcfixture-checkpoint.tar.zst"
SNAPSHOT_TOOL = FIXTURES / "tools" / "mnt_snapshot.py"
SNAPSHOT_PATHS = ("/dev", "/run", "/scratch", "/etc")

MEDIA_CRIU = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
MEDIA_RW_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
WHITEOUT_PREFIX = ".wh."


def _blob(layout, descriptor):
    algorithm, digest = descriptor["digest"].split(":", 1)
    path = layout / "blobs" / algorithm / digest
    data = path.read_bytes()
    if hashlib.new(algorithm, data).hexdigest() != digest:
        raise ValueError(f"{path}: digest mismatch")
    return path


def _unpack_layout(archive, target):
    target.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


def _extract_layer(blob, target):
    """Extract an OCI layer into ``target``; raise on OCI whiteouts, which need
    conversion to overlayfs format."""
    target.mkdir(parents=True)

    def reject_whiteouts(name):
        if Path(name).name.startswith(WHITEOUT_PREFIX):
            raise ValueError(f"{blob}: whiteout {name} needs conversion")
        return name

    extract_tar(blob, target, members=reject_whiteouts)
    return target


def _manifest_layers(layout, manifest_descriptor, target):
    """Extract the layers of an image manifest; return them topmost first."""
    manifest = json.loads(_blob(layout, manifest_descriptor).read_text())
    layers = []
    for number, layer in enumerate(manifest["layers"]):
        layers.append(_extract_layer(_blob(layout, layer), target / f"base-{number}"))
    return layers[::-1]


def prepare_containerd_fixture(workdir):
    """Unpack the containerd checkpoint fixture under ``workdir``."""
    workdir = Path(workdir)
    layout = _unpack_layout(CONTAINERD_CHECKPOINT, workdir / "layout")
    index = json.loads((layout / "index.json").read_text())
    checkpoint_index = next(m for m in index["manifests"]
                            if m["mediaType"] == "application/vnd.oci.image.index.v1+json")
    entries = json.loads(_blob(layout, checkpoint_index).read_text())["manifests"]
    by_type = {entry["mediaType"]: entry for entry in entries}

    images = workdir / "images"
    images.mkdir()
    extract_tar(_blob(layout, by_type[MEDIA_CRIU]), images)

    rw_layer = _extract_layer(_blob(layout, by_type[MEDIA_RW_LAYER]), workdir / "rw")
    base = _manifest_layers(layout, by_type[MEDIA_MANIFEST], workdir)

    spec = workdir / "spec.json"
    config_blob = _blob(layout, by_type[MEDIA_CONFIG])
    _, spec_json = decode_any(config_blob.read_bytes(), str(config_blob))
    spec.write_bytes(spec_json)
    return PreparedCheckpoint(name="ck-ipcfixture", images_dir=images,
                              rootfs_layers=(rw_layer, *base), spec_path=spec)


def prepare_podman_fixture(workdir):
    """Unpack the podman checkpoint export under ``workdir`` over the fixture base image."""
    workdir = Path(workdir)
    export = workdir / "export"
    export.mkdir(parents=True)
    extract_tar(PODMAN_CHECKPOINT, export)
    if (export / "deleted.files").exists():
        raise ValueError(f"{PODMAN_CHECKPOINT}: deleted.files needs whiteouts")

    rw_layer = _extract_layer(export / "rootfs-diff.tar", workdir / "rw")
    layout = _unpack_layout(BASE_IMAGE, workdir / "base-layout")
    index = json.loads((layout / "index.json").read_text())
    base = _manifest_layers(layout, index["manifests"][0], workdir)
    return PreparedCheckpoint(name="podman-ipcfixture", images_dir=export / "checkpoint",
                              rootfs_layers=(rw_layer, *base),
                              spec_path=export / "spec.dump",
                              devshm_tar=export / "devshm-checkpoint.tar")


def _child(function, args, result_fd, release_fd):
    """Body of the forked child: never returns."""
    status = 0
    try:
        namespaces.unshare(namespaces.CLONE_NEWNS)
        namespaces.mount(None, "/", None, namespaces.MS_REC | namespaces.MS_PRIVATE)
        outcome = ("ok", function(*args))
    except BaseException as error:  # carried to the parent and re-raised there
        outcome = ("error", error, traceback.format_exc())
        status = 1
    try:
        payload = pickle.dumps(outcome)
    except Exception as error:
        payload = pickle.dumps(("error", RuntimeError(repr(error)), traceback.format_exc()))
    with os.fdopen(result_fd, "wb") as result:
        result.write(payload)
    os.read(release_fd, 1)  # the parent closes its end when the test is done
    os._exit(status)


@contextlib.contextmanager
def namespace_child(function, *args):
    """Run ``function(*args)`` in a forked child with a private mount namespace.

    Yields ``(nsfs_path, result)``; re-raises the child's exception instead. The
    child keeps the namespace alive until the context exits.
    """
    result_read, result_write = os.pipe()
    release_read, release_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(result_read)
        os.close(release_write)
        _child(function, args, result_write, release_read)
    os.close(result_write)
    os.close(release_read)
    try:
        with os.fdopen(result_read, "rb") as result:
            outcome = pickle.loads(result.read())
        if outcome[0] == "error":
            error, trace = outcome[1], outcome[2]
            error.add_note(f"in the namespace child:\n{trace}")
            raise error
        yield f"/proc/{pid}/ns/mnt", outcome[1]
    finally:
        os.close(release_write)
        os.waitpid(pid, 0)


def snapshot(nsfs_path, rootfs, paths=SNAPSHOT_PATHS):
    """Return the ``mnt_snapshot.py`` JSON of ``rootfs`` seen in the namespace ``nsfs_path``."""
    result = subprocess.run(["nsenter", f"--mount={nsfs_path}", sys.executable,
                             str(SNAPSHOT_TOOL), str(rootfs), *paths],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"mnt_snapshot.py failed: {result.stderr}")
    return json.loads(result.stdout)


def load_expected(engine):
    return json.loads((FIXTURES / engine / "expected-mnt.json").read_text())


# podman's per-container run directory, which spec.dump names as the source of the
# /etc/hostname, /etc/hosts, /etc/resolv.conf and /run/.containerenv binds.
PODMAN_USERDATA = ("containers/storage/overlay-containers/"
                   "6a6e0bee19f8786c5d83dcd12196b63ab6a82252580abe3194fb4337b5ef44b6/userdata")
PODMAN_HOSTNAME = "6a6e0bee19f8"


def write_podman_userdata(userdata):
    """Create podman's per-container run files in the directory ``userdata``.

    The hostname file has the container's content; hosts and resolv.conf get stand-in
    contents, because the export does not carry podman's.
    """
    userdata = Path(userdata)
    userdata.mkdir(parents=True)
    (userdata / "hostname").write_text(PODMAN_HOSTNAME)
    (userdata / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {PODMAN_HOSTNAME}\n")
    (userdata / "resolv.conf").write_text("nameserver 127.0.0.53\n")
    (userdata / ".containerenv").write_text("")
    for path in userdata.iterdir():
        path.chmod(0o644)


def provide_podman_run_files(run_dir):
    """Create podman's run files under ``run_dir`` and bind it over ``/run``.

    Call in a namespace child only: the bind hides the host's /run there.
    """
    write_podman_userdata(Path(run_dir, PODMAN_USERDATA))
    namespaces.mount(run_dir, "/run", None, namespaces.MS_BIND)
