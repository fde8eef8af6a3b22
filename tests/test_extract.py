"""Safe tar extraction and OCI layers in overlayfs lower format, on real archives and
real overlay mounts."""

import os
import stat
import subprocess
import tarfile

import pytest

from archive_helpers import (FIXED_MTIME, PODMAN_ARCHIVE, device_entry, dir_entry,
                             fifo_entry, file_entry, hardlink_entry, overlay,
                             symlink_entry, write_tar)
from cerman.errors import SourceError, UnsafeArchiveError
from workers.extract import detect_compression, extract_atomically, extract_tar
from workers.rootfs import (OPAQUE_XATTR, apply_deleted_files, extract_layer,
                            inherit_directory_attributes)


@pytest.fixture
def sandbox(tmp_path):
    """Return (target, sentinel): an empty target and an empty directory beside it that
    hostile archives aim at."""
    target = tmp_path / "target"
    sentinel = tmp_path / "sentinel"
    target.mkdir()
    sentinel.mkdir()
    return target, sentinel


def listing(directory):
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


# Compression detection


def test_detect_zstd_named_gz(tmp_path):
    archive = write_tar(tmp_path / "a.tar.gz", [file_entry("x", b"1")], "zstd")
    assert detect_compression(archive) == "zstd"


def test_detect_gzip(tmp_path):
    archive = write_tar(tmp_path / "a.tar", [file_entry("x", b"1")], "gzip")
    assert detect_compression(archive) == "gzip"


def test_detect_plain(tmp_path):
    archive = write_tar(tmp_path / "a.tar.zst", [file_entry("x", b"1")])
    assert detect_compression(archive) == "none"


def test_extract_zstd_named_gz(sandbox, tmp_path):
    target, _ = sandbox
    archive = write_tar(tmp_path / "a.tar.gz", [file_entry("dir/x", b"zstd data")], "zstd")
    extract_tar(archive, target)
    assert (target / "dir" / "x").read_bytes() == b"zstd data"


def test_extract_gzip_named_zst(sandbox, tmp_path):
    target, _ = sandbox
    archive = write_tar(tmp_path / "a.tar.zst", [file_entry("x", b"gzip data")], "gzip")
    extract_tar(archive, target)
    assert (target / "x").read_bytes() == b"gzip data"


def test_extract_podman_fixture(sandbox):
    target, _ = sandbox
    extract_tar(PODMAN_ARCHIVE, target)
    assert (target / "checkpoint" / "inventory.img").stat().st_size == 86


# Hostile archives

HOSTILE = {
    "dotdot": [file_entry("../sentinel/evil", b"x")],
    "dotdot-inner": [dir_entry("a"), file_entry("a/../../sentinel/evil", b"x")],
    "absolute": [file_entry("{sentinel}/evil", b"x")],
    "symlink-then-write": [symlink_entry("link", "{sentinel}"),
                           file_entry("link/evil", b"x")],
    "symlink-relative-then-write": [symlink_entry("link", "../sentinel"),
                                    file_entry("link/evil", b"x")],
    "symlink-then-dir": [symlink_entry("link", "{sentinel}"), dir_entry("link/sub")],
    "symlink-then-hardlink": [symlink_entry("link", "{sentinel}"),
                              file_entry("data", b"x"), hardlink_entry("link/evil", "data")],
    "hardlink-passwd": [hardlink_entry("passwd", "/etc/passwd")],
    "hardlink-dotdot": [hardlink_entry("passwd", "../../../../etc/passwd")],
    "hardlink-not-extracted": [hardlink_entry("copy", "later"), file_entry("later", b"x")],
    "hardlink-through-replaced-dir": [dir_entry("d"), file_entry("d/f", b"x"),
                                      symlink_entry("d", "{sentinel}"),
                                      hardlink_entry("copy", "d/f")],
    "device": [device_entry("null", 1, 3)],
    "block-device": [device_entry("disk", 8, 0, tarfile.BLKTYPE)],
}


def hostile_entries(case, sentinel):
    entries = []
    for info, data in HOSTILE[case]:
        info.name = info.name.format(sentinel=sentinel)
        info.linkname = info.linkname.format(sentinel=sentinel)
        entries.append((info, data))
    return entries


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_rejected(sandbox, tmp_path, case, compression):
    target, sentinel = sandbox
    # The zstd variant is named .tar.gz, as podman names its zstd exports.
    archive = write_tar(tmp_path / "hostile.tar.gz", hostile_entries(case, sentinel),
                        compression)
    with pytest.raises(UnsafeArchiveError) as raised:
        extract_tar(archive, target)
    assert str(archive) in str(raised.value)
    assert listing(sentinel) == []


def test_hostile_message_names_entry(sandbox, tmp_path):
    target, sentinel = sandbox
    archive = write_tar(tmp_path / "a.tar", hostile_entries("symlink-then-write", sentinel))
    with pytest.raises(UnsafeArchiveError, match="'link/evil'"):
        extract_tar(archive, target)


def test_symlink_in_target_rejected(sandbox, tmp_path):
    target, sentinel = sandbox
    (target / "etc").symlink_to(sentinel)
    archive = write_tar(tmp_path / "a.tar", [file_entry("etc/passwd", b"x")])
    with pytest.raises(UnsafeArchiveError):
        extract_tar(archive, target)
    assert listing(sentinel) == []


def test_hostile_atomic_leaves_nothing(sandbox, tmp_path):
    _, sentinel = sandbox
    final = tmp_path / "final"
    entries = [file_entry("good", b"ok")] + hostile_entries("symlink-then-write", sentinel)
    archive = write_tar(tmp_path / "a.tar", entries)
    with pytest.raises(UnsafeArchiveError):
        extract_atomically(archive, final)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.tar", "sentinel", "target"]


def test_device_allowed(sandbox, tmp_path):
    target, _ = sandbox
    archive = write_tar(tmp_path / "a.tar", [device_entry("null", 1, 3)])
    extract_tar(archive, target, allow_devices=True)
    assert (target / "null").stat().st_rdev == os.makedev(1, 3)


def test_symlink_target_kept_not_followed(sandbox, tmp_path):
    target, sentinel = sandbox
    archive = write_tar(tmp_path / "a.tar", [symlink_entry("abs", str(sentinel))])
    extract_tar(archive, target)
    assert os.readlink(target / "abs") == str(sentinel)


def test_symlink_replaced_by_file(sandbox, tmp_path):
    target, sentinel = sandbox
    (sentinel / "victim").write_text("original")
    archive = write_tar(tmp_path / "a.tar", [symlink_entry("f", str(sentinel / "victim")),
                                             file_entry("f", b"new")])
    extract_tar(archive, target)
    assert (sentinel / "victim").read_text() == "original"
    assert not (target / "f").is_symlink()


def test_corrupt_zstd_rejected(sandbox, tmp_path):
    target, _ = sandbox
    archive = write_tar(tmp_path / "a.tar.zst", [file_entry("x", os.urandom(100_000))],
                        "zstd")
    data = archive.read_bytes()
    archive.write_bytes(data[:len(data) // 2])
    with pytest.raises(SourceError):
        extract_tar(archive, target)


def test_not_a_tar_rejected(sandbox, tmp_path):
    target, _ = sandbox
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(SourceError, match="a.tar"):
        extract_tar(archive, target)


# Metadata


@pytest.fixture
def metadata_tree(sandbox, tmp_path):
    target, _ = sandbox
    entries = [
        dir_entry("sticky", mode=0o1777, mtime=FIXED_MTIME - 100),
        file_entry("sticky/setuid", b"#!/bin/sh\n", mode=0o4755, uid=1234, gid=5678),
        symlink_entry("sticky/link", "setuid", mtime=FIXED_MTIME - 50),
        hardlink_entry("sticky/hard", "sticky/setuid"),
        fifo_entry("sticky/fifo", mode=0o640),
    ]
    extract_tar(write_tar(tmp_path / "a.tar", entries), target)
    return target / "sticky"


def test_metadata_dir_mode(metadata_tree):
    assert stat.S_IMODE(metadata_tree.stat().st_mode) == 0o1777


def test_metadata_dir_mtime_after_children(metadata_tree):
    assert metadata_tree.stat().st_mtime == FIXED_MTIME - 100


def test_metadata_file_mode_after_chown(metadata_tree):
    assert stat.S_IMODE((metadata_tree / "setuid").stat().st_mode) == 0o4755


def test_metadata_file_owner(metadata_tree):
    status = (metadata_tree / "setuid").stat()
    assert (status.st_uid, status.st_gid) == (1234, 5678)


def test_metadata_file_mtime(metadata_tree):
    assert (metadata_tree / "setuid").stat().st_mtime == FIXED_MTIME


def test_metadata_symlink(metadata_tree):
    assert os.readlink(metadata_tree / "link") == "setuid"


def test_metadata_symlink_mtime(metadata_tree):
    assert (metadata_tree / "link").lstat().st_mtime == FIXED_MTIME - 50


def test_metadata_hard_link(metadata_tree):
    assert (metadata_tree / "hard").stat().st_ino == (metadata_tree / "setuid").stat().st_ino


def test_metadata_fifo(metadata_tree):
    assert stat.S_ISFIFO((metadata_tree / "fifo").lstat().st_mode)


def test_members_renames_and_skips(sandbox, tmp_path):
    target, _ = sandbox
    archive = write_tar(tmp_path / "a.tar", [file_entry("keep/a", b"a"),
                                             file_entry("drop/b", b"b")])
    extract_tar(archive, target,
                members=lambda name: name.replace("keep", "kept") if name.startswith("keep")
                else None)
    assert listing(target) == ["kept", "kept/a"]


# Atomic extraction


def test_atomic_replaces_previous(tmp_path):
    final = tmp_path / "final"
    extract_atomically(write_tar(tmp_path / "1.tar", [file_entry("one", b"1")]), final)
    extract_atomically(write_tar(tmp_path / "2.tar", [file_entry("two", b"2")]), final)
    assert listing(final) == ["two"]


def test_atomic_failure_keeps_previous(tmp_path):
    final = tmp_path / "final"
    extract_atomically(write_tar(tmp_path / "1.tar", [file_entry("one", b"1")]), final)
    bad = write_tar(tmp_path / "2.tar", [file_entry("two", b"2"), file_entry("/abs", b"x")])
    with pytest.raises(UnsafeArchiveError):
        extract_atomically(bad, final)
    assert listing(final) == ["one"]


def test_atomic_failure_leaves_no_staging(tmp_path):
    final = tmp_path / "final"
    bad = write_tar(tmp_path / "bad.tar", [file_entry("/abs", b"x")])
    with pytest.raises(UnsafeArchiveError):
        extract_atomically(bad, final)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.tar"]


# OCI layers in overlay lower format


@pytest.fixture
def stacked_layers(tmp_path):
    """Return (top, base): base contains etc/ and opq/ files, top deletes some of them."""
    base, top = tmp_path / "base", tmp_path / "top"
    base.mkdir()
    top.mkdir()
    base_entries = [
        dir_entry("etc"), file_entry("etc/gone", b"g"), file_entry("etc/kept", b"k"),
        dir_entry("opq"), file_entry("opq/old", b"o"),
        dir_entry("tmp", mode=0o1777, mtime=FIXED_MTIME - 7),
    ]
    top_entries = [
        dir_entry("etc"), file_entry("etc/.wh.gone"),
        dir_entry("opq"), file_entry("opq/.wh..wh..opq"), file_entry("opq/new", b"n"),
        file_entry("tmp/added", b"a"),
        file_entry("same/.wh.both"), file_entry("same/both", b"same layer"),
    ]
    extract_layer(write_tar(tmp_path / "base.tar", base_entries), base)
    implicit = extract_layer(write_tar(tmp_path / "top.tar", top_entries, "gzip"), top)
    inherit_directory_attributes(top, implicit, [base])
    return top, base


def test_layer_whiteout_device(stacked_layers):
    top, _ = stacked_layers
    assert (top / "etc" / "gone").lstat().st_rdev == os.makedev(0, 0)


def test_layer_whiteout_is_char_device(stacked_layers):
    top, _ = stacked_layers
    assert stat.S_ISCHR((top / "etc" / "gone").lstat().st_mode)


def test_layer_no_wh_files(stacked_layers):
    top, _ = stacked_layers
    assert [path for path in top.rglob(".wh.*")] == []


def test_layer_opaque_xattr(stacked_layers):
    top, _ = stacked_layers
    assert os.getxattr(top / "opq", OPAQUE_XATTR) == b"y"


def test_layer_same_layer_file_wins(stacked_layers):
    top, _ = stacked_layers
    assert (top / "same" / "both").read_bytes() == b"same layer"


def test_layer_implicit_dir_inherits_mode(stacked_layers):
    top, _ = stacked_layers
    assert stat.S_IMODE((top / "tmp").stat().st_mode) == 0o1777


def test_layer_implicit_dir_inherits_mtime(stacked_layers):
    top, _ = stacked_layers
    assert (top / "tmp").stat().st_mtime == FIXED_MTIME - 7


def test_layer_explicit_dir_mtime_kept(stacked_layers):
    top, _ = stacked_layers
    assert (top / "etc").stat().st_mtime == FIXED_MTIME


@pytest.fixture
def merged(stacked_layers, tmp_path):
    with overlay(stacked_layers, tmp_path / "merged") as mountpoint:
        yield mountpoint


def test_overlay_whiteout_hides_base_file(merged):
    assert not os.path.lexists(merged / "etc" / "gone")


def test_overlay_keeps_other_base_file(merged):
    assert (merged / "etc" / "kept").read_bytes() == b"k"


def test_overlay_opaque_hides_base_dir(merged):
    assert sorted(path.name for path in (merged / "opq").iterdir()) == ["new"]


def test_overlay_sticky_tmp(merged):
    assert stat.S_IMODE((merged / "tmp").stat().st_mode) == 0o1777


def test_deleted_files_hidden_in_overlay(stacked_layers, tmp_path):
    top, base = stacked_layers
    deleted = tmp_path / "deleted"
    deleted.mkdir()
    implicit = apply_deleted_files(["/etc/kept", "opq/new"], deleted)
    inherit_directory_attributes(deleted, implicit, [top, base])
    with overlay([deleted, top, base], tmp_path / "merged") as mountpoint:
        names = sorted(str(path.relative_to(mountpoint)) for path in mountpoint.rglob("*"))
    assert names == ["etc", "opq", "same", "same/both", "tmp", "tmp/added"]


def test_deleted_files_rejects_dotdot(tmp_path):
    with pytest.raises(UnsafeArchiveError):
        apply_deleted_files(["/etc/../../x"], tmp_path)


def test_deleted_files_rejects_symlink_parent(sandbox):
    target, sentinel = sandbox
    (target / "etc").symlink_to(sentinel)
    with pytest.raises(UnsafeArchiveError):
        apply_deleted_files(["/etc/passwd"], target)
    assert listing(sentinel) == []


def test_extract_matches_gnu_tar(tmp_path):
    ours, reference = tmp_path / "ours", tmp_path / "reference"
    ours.mkdir()
    reference.mkdir()
    extract_tar(PODMAN_ARCHIVE, ours)
    subprocess.run(["tar", "-xf", str(PODMAN_ARCHIVE), "-I", "zstd -d", "-C",
                    str(reference)], check=True)
    assert listing(ours) == listing(reference)


def test_xattr_kept(sandbox, tmp_path):
    target, _ = sandbox
    info, data = file_entry("f", b"x")
    info.pax_headers = {"SCHILY.xattr.user.cerman": "value \udcff"}
    extract_tar(write_tar(tmp_path / "a.tar", [(info, data)]), target)
    assert os.getxattr(target / "f", "user.cerman") == b"value \xff"


def test_xattr_overlay_skipped(sandbox, tmp_path):
    target, _ = sandbox
    info, _ = dir_entry("d")
    info.pax_headers = {"SCHILY.xattr.trusted.overlay.opaque": "y"}
    extract_tar(write_tar(tmp_path / "a.tar", [(info, None)]), target)
    assert OPAQUE_XATTR not in os.listxattr(target / "d")
