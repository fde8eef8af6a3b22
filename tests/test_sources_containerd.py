"""The containerd checkpoint source against a private containerd with the fixtures."""

import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from cerman.config import CheckpointConfig, SourceConfig
from cerman.errors import SourceError
from containerd_env import (BASE_IMAGE, CHECKPOINT_ARCHIVE, CHECKPOINT_IMAGE, ContainerdEnv,
                            containerd_missing_reason)
from workers import sources
from workers.sources import containerd as source

# Digests of the blobs in tests/fixtures/containerd/ck-ipcfixture.oci.tar.
INDEX_DIGEST = "sha256:ce2c7db857e3b043e7feaf5ee1790ec218e85a996a47bec984980e926303b120"
CRIU_TAR_DIGEST = "sha256:4ee2bb507d7999fb587046105d13446bd2b28990582e6693f735496c2a401e7c"
BASE_LAYER_DIGEST = "sha256:09c1263f94144d2cd15cba61886bbab2fb9a0c03892a31688b0599fee38111e5"

pytestmark = pytest.mark.containerd


def make_config(address, namespace, image=CHECKPOINT_IMAGE):
    source_config = SourceConfig(type="containerd", image=image, namespace=namespace,
                                 address=Path(address))
    return CheckpointConfig(name="ck-test", file=Path("ck-test.yaml"), source=source_config)


def start_env():
    reason = containerd_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    return ContainerdEnv()


@pytest.fixture(scope="module")
def containerd():
    with start_env() as env:
        yield env


@pytest.fixture
def private_containerd():
    """A containerd of the test's own, for tests that delete content."""
    with start_env() as env:
        yield env


@pytest.fixture(scope="module")
def prepared(containerd, tmp_path_factory):
    target = tmp_path_factory.mktemp("prepared") / "target"
    target.mkdir()
    lowers = source.fill(make_config(containerd.address, containerd.namespace), target)
    return target, lowers


@pytest.fixture
def overlay(prepared, tmp_path):
    """The prepared layers mounted read-only as one overlay, unmounted afterwards."""
    target, _ = prepared
    layers = sorted((target / "layers").iterdir())
    merged = tmp_path / "merged"
    merged.mkdir()
    lowerdir = ":".join(str(layer) for layer in layers)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowerdir}",
                    str(merged)], check=True, capture_output=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def spec_mount(spec, destination):
    return next((mount for mount in spec["mounts"] if mount["destination"] == destination),
                None)


def test_fill_returns_no_extra_lowers(prepared):
    _, lowers = prepared
    assert lowers == []


def test_fill_target_entries(prepared):
    target, _ = prepared
    assert sorted(os.listdir(target)) == ["images", "layers", "spec.json"]


def test_fill_images_inventory(prepared):
    target, _ = prepared
    assert (target / "images" / "inventory.img").is_file()


def test_fill_images_mountpoints(prepared):
    target, _ = prepared
    assert list((target / "images").glob("mountpoints-*.img"))


def test_fill_layer_names(prepared):
    target, _ = prepared
    assert sorted(os.listdir(target / "layers")) == ["00", "01"]


def test_fill_rw_layer_first(prepared):
    target, _ = prepared
    # The container's rw layer adds /hostdata, the mount point of its bind mount.
    assert (target / "layers" / "00" / "hostdata").is_dir()


def test_fill_base_layer_lacks_rw_change(prepared):
    target, _ = prepared
    assert not (target / "layers" / "01" / "hostdata").exists()


def test_spec_scratch_tmpfs(prepared):
    target, _ = prepared
    spec = json.loads((target / "spec.json").read_text())
    assert spec_mount(spec, "/scratch")["type"] == "tmpfs"


def test_spec_hostdata_bind(prepared):
    target, _ = prepared
    spec = json.loads((target / "spec.json").read_text())
    assert spec_mount(spec, "/hostdata")["type"] == "bind"


def test_spec_hostdata_source(prepared):
    target, _ = prepared
    spec = json.loads((target / "spec.json").read_text())
    assert spec_mount(spec, "/hostdata")["source"] == "/tmp/hostdata"


def test_spec_masked_paths(prepared):
    target, _ = prepared
    spec = json.loads((target / "spec.json").read_text())
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]


def test_overlay_base_binary(overlay):
    assert (overlay / "bin" / "ipcstate").is_file()


def test_overlay_rw_change(overlay):
    assert (overlay / "hostdata").is_dir()


def test_fingerprint_index_digest(containerd):
    config = make_config(containerd.address, containerd.namespace)
    assert source.fingerprint(config)["digest"] == INDEX_DIGEST


@pytest.mark.parametrize("digest", [CRIU_TAR_DIGEST, BASE_LAYER_DIGEST],
                         ids=["criu-tar", "base-layer"])
def test_fill_missing_blob_named(private_containerd, tmp_path, digest):
    private_containerd.ctr("content", "rm", digest)
    config = make_config(private_containerd.address, private_containerd.namespace)
    with pytest.raises(SourceError, match=digest):
        source.fill(config, tmp_path)


def test_fill_missing_blob_extracts_nothing(private_containerd, tmp_path):
    private_containerd.ctr("content", "rm", BASE_LAYER_DIGEST)
    config = make_config(private_containerd.address, private_containerd.namespace)
    with pytest.raises(SourceError):
        source.fill(config, tmp_path)
    assert os.listdir(tmp_path) == []


def test_fill_missing_image(containerd, tmp_path):
    config = make_config(containerd.address, containerd.namespace, image="ck-absent")
    with pytest.raises(SourceError, match="image not found"):
        source.fill(config, tmp_path)


def test_fill_manifest_image(containerd, tmp_path):
    config = make_config(containerd.address, containerd.namespace, image=BASE_IMAGE)
    with pytest.raises(SourceError, match="not a checkpoint index"):
        source.fill(config, tmp_path)


def test_fill_absent_socket(tmp_path):
    config = make_config(tmp_path / "absent.sock", "default")
    with pytest.raises(SourceError, match="does not exist"):
        source.fill(config, tmp_path)


def test_fingerprint_refused_socket(tmp_path):
    # A bound socket nobody listens on is what a crashed containerd leaves behind.
    address = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(address))
        with pytest.raises(SourceError, match="not running"):
            source.fingerprint(make_config(address, "default"))


def test_decode_any_spec():
    type_url = source.SPEC_TYPE_URL.encode()
    data = bytes([0x0A, len(type_url)]) + type_url + bytes([0x12, 2]) + b"{}"
    assert source.decode_any(data, "test") == (source.SPEC_TYPE_URL, b"{}")


def test_decode_any_truncated():
    with pytest.raises(SourceError, match="runs past the end"):
        source.decode_any(bytes([0x12, 10]) + b"{}", "test")


def test_env_listens_on_own_sockets(containerd):
    listening = [connection.laddr
                 for connection in psutil.Process(containerd.process.pid).net_connections("all")
                 if connection.laddr]
    assert sorted(listening) == [str(containerd.address), f"{containerd.address}.ttrpc"]


def test_env_stop_cleans_up():
    reason = containerd_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    env = ContainerdEnv(import_fixtures=False)
    env.start()
    base_dir, pid = env.base_dir, env.process.pid
    env.stop()
    assert not base_dir.exists()
    assert not psutil.pid_exists(pid)


def import_without_manifest(env, workdir):
    """Import a copy of the checkpoint whose index lists no base manifest; return its name.

    Such an index names its base image only in its annotations, and the base image
    comes from the image store.
    """
    layout = workdir / "layout"
    layout.mkdir()
    subprocess.run(["tar", "-xf", str(CHECKPOINT_ARCHIVE), "-C", str(layout)], check=True)
    blobs = layout / "blobs" / "sha256"
    index = json.loads((blobs / INDEX_DIGEST.split(":")[1]).read_bytes())
    index["manifests"] = [entry for entry in index["manifests"]
                          if entry["mediaType"] != source.MEDIA_OCI_MANIFEST]
    data = json.dumps(index).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": source.MEDIA_OCI_INDEX, "digest": f"sha256:{digest}",
        "size": len(data), "annotations": {"org.opencontainers.image.ref.name": "ck-nobase"},
    }]}))
    archive = workdir / "ck-nobase.oci.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(layout), "."], check=True)

    env.ctr("images", "import", "--no-unpack", archive)
    names = env.ctr("images", "list", "--quiet").stdout.split()
    imported = next(name for name in names if name.endswith(":ck-nobase"))
    env.ctr("images", "tag", imported, "ck-nobase")
    return "ck-nobase"


def test_fill_base_from_image_store(private_containerd, tmp_path):
    image = import_without_manifest(private_containerd, tmp_path)
    config = make_config(private_containerd.address, private_containerd.namespace, image)
    target = tmp_path / "target"
    target.mkdir()
    source.fill(config, target)
    assert (target / "layers" / "01" / "bin" / "ipcstate").is_file()


def test_fill_base_absent_from_store(private_containerd, tmp_path):
    image = import_without_manifest(private_containerd, tmp_path)
    private_containerd.ctr("images", "rm", BASE_IMAGE)
    config = make_config(private_containerd.address, private_containerd.namespace, image)
    with pytest.raises(SourceError, match="not in the image store"):
        source.fill(config, tmp_path)


def test_prepare_containerd_checkpoint(containerd, tmp_path):
    config = make_config(containerd.address, containerd.namespace)
    prepared = sources.prepare(config, tmp_path)
    assert [layer.name for layer in prepared.rootfs_layers] == ["00", "01"]
