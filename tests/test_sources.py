"""Checkpoint sources (directory and archive) and their preparation under the state
directory, on the real podman and CRIU fixtures and real overlay mounts."""

import filecmp
import json
import os
import shutil
import tarfile
import threading

import pytest

from archive_helpers import (BASE_IMAGE, CRIU_IMAGES, PODMAN_ARCHIVE, file_entry,
                             overlay, pack_zstd_dir, unpack_oci_image, unpack_system_tar,
                             write_tar)
from cerman.config import parse_config
from cerman.errors import SourceError, UnsafeArchiveError
from workers.sources import prepare, remove


def make_config(source_type, path, rootfs=None, name="fx"):
    document = {"name": name, "source": {"type": source_type, "path": str(path)}}
    if rootfs is not None:
        document["rootfs"] = {"path": str(rootfs)}
    return parse_config(f"/etc/cerman/{name}.yaml", document)


@pytest.fixture(scope="module")
def base_rootfs(tmp_path_factory):
    """The fixture's base image, unpacked with extract_layer (a single layer)."""
    layers = unpack_oci_image(BASE_IMAGE, tmp_path_factory.mktemp("base-image"))
    assert len(layers) == 1
    return layers[0]


@pytest.fixture(scope="module")
def podman_reference(tmp_path_factory):
    """The podman fixture unpacked by GNU tar, to compare against."""
    return unpack_system_tar(PODMAN_ARCHIVE, tmp_path_factory.mktemp("podman-reference"))


@pytest.fixture
def state_dir(tmp_path):
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def podman_prepared(base_rootfs, state_dir):
    return prepare(make_config("archive", PODMAN_ARCHIVE, base_rootfs), state_dir)


def checkpoints_listing(state_dir):
    return sorted(path.name for path in (state_dir / "checkpoints").iterdir())


# Archive source on the podman fixture


def test_archive_images_dir(podman_prepared, state_dir):
    assert podman_prepared.images_dir == state_dir / "checkpoints" / "fx" / "images"


def test_archive_inventory_present(podman_prepared):
    assert (podman_prepared.images_dir / "inventory.img").is_file()


def test_archive_images_match_export(podman_prepared, podman_reference):
    comparison = filecmp.dircmp(podman_prepared.images_dir, podman_reference / "checkpoint")
    assert (comparison.left_only, comparison.right_only) == ([], [])


def test_archive_images_same_bytes(podman_prepared, podman_reference):
    names = sorted(os.listdir(podman_reference / "checkpoint"))
    _, mismatch, errors = filecmp.cmpfiles(podman_prepared.images_dir,
                                           podman_reference / "checkpoint", names,
                                           shallow=False)
    assert (mismatch, errors) == ([], [])


def test_archive_rootfs_layers(podman_prepared, base_rootfs):
    layer = podman_prepared.images_dir.parent / "layers" / "00"
    assert podman_prepared.rootfs_layers == (layer, base_rootfs)


def test_archive_spec(podman_prepared):
    spec = json.loads(podman_prepared.spec_path.read_text())
    assert spec["process"]["args"] == ["/bin/fixture-entry"]


def test_archive_devshm(podman_prepared):
    with tarfile.open(podman_prepared.devshm_tar) as tar:
        assert "./cerman-note" in tar.getnames()


def test_archive_layout(podman_prepared):
    root = podman_prepared.images_dir.parent
    expected = ["devshm.tar", "images", "layers", "source.json", "spec.json"]
    assert sorted(os.listdir(root)) == expected


def test_archive_overlay_shows_rw_layer(podman_prepared, tmp_path):
    with overlay(podman_prepared.rootfs_layers, tmp_path / "merged") as merged:
        assert (merged / "run" / "app" / "state").read_text() == "run state 42\n"


def test_archive_overlay_keeps_symlink(podman_prepared, tmp_path):
    with overlay(podman_prepared.rootfs_layers, tmp_path / "merged") as merged:
        assert os.readlink(merged / "run" / "app" / "state.link") == "state"


def test_archive_overlay_shows_base(podman_prepared, tmp_path):
    with overlay(podman_prepared.rootfs_layers, tmp_path / "merged") as merged:
        assert (merged / "bin" / "ipcstate").stat().st_size == 767648


def test_archive_overlay_run_mtime_from_base(podman_prepared, base_rootfs, tmp_path):
    with overlay(podman_prepared.rootfs_layers, tmp_path / "merged") as merged:
        assert (merged / "run").stat().st_mtime == (base_rootfs / "run").stat().st_mtime


@pytest.fixture
def archive_with_deleted_files(podman_reference, tmp_path):
    """The podman fixture plus a deleted.files, repacked as zstd in a .tar.gz file."""
    tree = tmp_path / "export"
    shutil.copytree(podman_reference, tree, symlinks=True)
    (tree / "deleted.files").write_text(json.dumps(["/bin/ipcs", "/etc"]))
    return pack_zstd_dir(tree, tmp_path / "with-deleted.tar.gz")


@pytest.fixture
def deleted_merged(archive_with_deleted_files, base_rootfs, state_dir, tmp_path):
    config = make_config("archive", archive_with_deleted_files, base_rootfs)
    prepared = prepare(config, state_dir)
    with overlay(prepared.rootfs_layers, tmp_path / "merged") as merged:
        yield merged


def test_deleted_file_hidden(deleted_merged):
    assert not os.path.lexists(deleted_merged / "bin" / "ipcs")


def test_deleted_dir_hidden(deleted_merged):
    assert not os.path.lexists(deleted_merged / "etc")


def test_deleted_sibling_kept(deleted_merged):
    assert os.readlink(deleted_merged / "bin" / "ipcmk") == "busybox"


def test_deleted_rw_layer_kept(deleted_merged):
    assert (deleted_merged / "run" / "app" / "state").read_text() == "run state 42\n"


def test_archive_without_rootfs(state_dir):
    prepared = prepare(make_config("archive", PODMAN_ARCHIVE), state_dir)
    assert [layer.name for layer in prepared.rootfs_layers] == ["00"]


def test_archive_without_checkpoint_dir(state_dir, tmp_path):
    archive = write_tar(tmp_path / "a.tar", [file_entry("spec.dump", b"{}")])
    with pytest.raises(SourceError, match="no checkpoint/ directory"):
        prepare(make_config("archive", archive), state_dir)


def test_archive_hostile_names_checkpoint(state_dir, tmp_path):
    archive = write_tar(tmp_path / "a.tar", [file_entry("checkpoint/../../../evil", b"x")])
    with pytest.raises(UnsafeArchiveError, match="checkpoint 'fx'"):
        prepare(make_config("archive", archive), state_dir)


def test_archive_hostile_leaves_nothing(state_dir, tmp_path):
    archive = write_tar(tmp_path / "a.tar", [file_entry("checkpoint/inventory.img", b"x"),
                                             file_entry("/abs", b"x")])
    with pytest.raises(UnsafeArchiveError):
        prepare(make_config("archive", archive), state_dir)
    assert checkpoints_listing(state_dir) == [".fx.lock"]


def test_archive_symlinked_spec_rejected(state_dir, tmp_path):
    info = tarfile.TarInfo("spec.dump")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/shadow"
    archive = write_tar(tmp_path / "a.tar", [file_entry("checkpoint/inventory.img", b"x"),
                                             (info, None)])
    with pytest.raises(SourceError, match="spec.json is not a regular file"):
        prepare(make_config("archive", archive), state_dir)


def test_archive_missing(state_dir, tmp_path):
    with pytest.raises(SourceError, match="is not a file"):
        prepare(make_config("archive", tmp_path / "missing.tar"), state_dir)


def test_archive_rootfs_missing(state_dir, tmp_path):
    config = make_config("archive", PODMAN_ARCHIVE, tmp_path / "no-rootfs")
    with pytest.raises(SourceError, match="rootfs.path .* is not a directory"):
        prepare(config, state_dir)


# Reuse and replacement


def test_prepare_reuses_unchanged(podman_prepared, base_rootfs, state_dir):
    marker = podman_prepared.images_dir.parent / "marker"
    marker.write_text("kept")
    prepare(make_config("archive", PODMAN_ARCHIVE, base_rootfs), state_dir)
    assert marker.exists()


def test_prepare_reuse_same_result(podman_prepared, base_rootfs, state_dir):
    again = prepare(make_config("archive", PODMAN_ARCHIVE, base_rootfs), state_dir)
    assert again == podman_prepared


def test_prepare_redone_when_rootfs_changes(podman_prepared, state_dir):
    marker = podman_prepared.images_dir.parent / "marker"
    marker.write_text("stale")
    prepare(make_config("archive", PODMAN_ARCHIVE), state_dir)
    assert not marker.exists()


def test_prepare_redone_when_incomplete(podman_prepared, base_rootfs, state_dir):
    (podman_prepared.images_dir / "inventory.img").unlink()
    again = prepare(make_config("archive", PODMAN_ARCHIVE, base_rootfs), state_dir)
    assert (again.images_dir / "inventory.img").is_file()


@pytest.fixture
def changing_archive(tmp_path, base_rootfs, state_dir):
    """A copy of the podman fixture, prepared once."""
    archive = tmp_path / "checkpoint.tar.zst"
    shutil.copyfile(PODMAN_ARCHIVE, archive)
    config = make_config("archive", archive, base_rootfs)
    first = prepare(config, state_dir)
    (first.images_dir.parent / "marker").write_text("old")
    return config, archive, first


def test_prepare_replaces_changed(changing_archive, archive_with_deleted_files, state_dir):
    config, archive, first = changing_archive
    shutil.copyfile(archive_with_deleted_files, archive)
    second = prepare(config, state_dir)
    assert not (second.images_dir.parent / "marker").exists()


def test_prepare_changed_has_new_content(changing_archive, archive_with_deleted_files,
                                         state_dir):
    config, archive, _ = changing_archive
    shutil.copyfile(archive_with_deleted_files, archive)
    second = prepare(config, state_dir)
    assert (second.rootfs_layers[0] / "bin" / "ipcs").stat().st_rdev == os.makedev(0, 0)


def test_prepare_changed_leaves_no_temporaries(changing_archive, archive_with_deleted_files,
                                               state_dir):
    config, archive, _ = changing_archive
    shutil.copyfile(archive_with_deleted_files, archive)
    prepare(config, state_dir)
    assert checkpoints_listing(state_dir) == [".fx.lock", "fx"]


def test_prepare_failed_change_keeps_old(changing_archive, state_dir, tmp_path):
    config, archive, first = changing_archive
    write_tar(archive, [file_entry("checkpoint/inventory.img", b"x"),
                        file_entry("../evil", b"x")], "zstd")
    with pytest.raises(UnsafeArchiveError):
        prepare(config, state_dir)
    assert (first.images_dir.parent / "marker").read_text() == "old"


def test_prepare_failed_change_no_temporaries(changing_archive, state_dir):
    config, archive, _ = changing_archive
    write_tar(archive, [file_entry("/evil", b"x")])
    with pytest.raises(UnsafeArchiveError):
        prepare(config, state_dir)
    assert checkpoints_listing(state_dir) == [".fx.lock", "fx"]


def test_prepare_replacement_never_exposes_gap(tmp_path, state_dir):
    # A reader polling the preparation while it is replaced again and again always
    # finds a complete one.
    images = tmp_path / "images"
    shutil.copytree(CRIU_IMAGES, images)
    config = make_config("directory", images)
    final = prepare(config, state_dir).images_dir.parent
    missing = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            if not (final / "source.json").is_file():
                missing.append("source.json")
            if not (final / "images" / "inventory.img").is_file():
                missing.append("inventory.img")

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for round_number in range(20):
            (images / "extra.img").write_bytes(b"x" * (round_number + 1))
            prepare(config, state_dir)
    finally:
        stop.set()
        reader.join()
    assert missing == []


def test_remove_existing(podman_prepared, state_dir):
    assert remove("fx", state_dir) is True


def test_remove_deletes_dir(podman_prepared, state_dir):
    remove("fx", state_dir)
    assert checkpoints_listing(state_dir) == [".fx.lock"]


def test_remove_missing(state_dir):
    assert remove("fx", state_dir) is False


# Directory source


@pytest.fixture
def criu_images(tmp_path):
    """A copy of the CRIU fixture on the state directory's filesystem."""
    images = tmp_path / "criu-images"
    shutil.copytree(CRIU_IMAGES, images)
    return images


def test_directory_images_copied(criu_images, state_dir):
    prepared = prepare(make_config("directory", criu_images), state_dir)
    assert sorted(os.listdir(prepared.images_dir)) == sorted(os.listdir(criu_images))


def test_directory_images_hard_linked(criu_images, state_dir):
    prepared = prepare(make_config("directory", criu_images), state_dir)
    inode = (prepared.images_dir / "inventory.img").stat().st_ino
    assert inode == (criu_images / "inventory.img").stat().st_ino


def test_directory_rootfs_is_lower(criu_images, base_rootfs, state_dir):
    prepared = prepare(make_config("directory", criu_images, base_rootfs), state_dir)
    assert prepared.rootfs_layers == (base_rootfs,)


def test_directory_no_rootfs(criu_images, state_dir):
    prepared = prepare(make_config("directory", criu_images), state_dir)
    assert prepared.rootfs_layers == ()


def test_directory_no_spec(criu_images, state_dir):
    prepared = prepare(make_config("directory", criu_images), state_dir)
    assert prepared.spec_path is None


def test_directory_without_inventory(tmp_path, state_dir):
    images = tmp_path / "not-images"
    images.mkdir()
    (images / "core-1.img").write_bytes(b"x")
    with pytest.raises(SourceError, match="checkpoint 'fx'.*has no inventory.img"):
        prepare(make_config("directory", images), state_dir)


def test_directory_missing(tmp_path, state_dir):
    with pytest.raises(SourceError, match="is not a directory"):
        prepare(make_config("directory", tmp_path / "missing"), state_dir)


def test_directory_change_redone(criu_images, state_dir):
    config = make_config("directory", criu_images)
    prepare(config, state_dir)
    (criu_images / "added.img").write_bytes(b"new")
    prepared = prepare(config, state_dir)
    assert (prepared.images_dir / "added.img").read_bytes() == b"new"
