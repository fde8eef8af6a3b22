"""Safe extraction of untrusted tar archives, and atomic placement of the result.

Every checkpoint source unpacks archives that came from elsewhere, so extraction
checks each entry before it writes anything for it:

- names are relative and have no ``..`` component;
- no entry is written through a symlink, whether the symlink was already in the
  target or was created by an earlier entry of the same archive;
- a hard link points at an entry this archive has already extracted inside the target;
- device nodes are written only when the caller allows them.

Compression is detected from the first bytes of the file, never from its name: podman
writes zstd into files named ``.tar.gz``. zstd is decompressed by the ``zstd -dc``
command as a stream, gzip, bzip2 and xz by ``tarfile``.

Entries keep their mode, numeric owner, mtime and extended attributes (PAX
``SCHILY.xattr.*``), except ``trusted.overlay.*``, which would let an archive steer
overlayfs. Directory attributes are applied after all entries are written, so that
writing a child does not change a directory's mtime afterwards.

Results land atomically: ``staging_directory`` yields a temporary directory beside the
final one and renames it into place only when the body succeeded.
"""

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from cerman.errors import SourceError, UnsafeArchiveError

log = logging.getLogger(__name__)

# Magic numbers at offset 0 of a compressed stream.
MAGIC_GZIP = b"\x1f\x8b"
MAGIC_ZSTD = b"\x28\xb5\x2f\xfd"
MAGIC_BZIP2 = b"BZh"
MAGIC_XZ = b"\xfd7zXZ\x00"

TARFILE_STREAM_MODES = {"none": "r|", "gzip": "r|gz", "bzip2": "r|bz2", "xz": "r|xz"}

# Extended attributes an archive may not set: overlayfs reads them from lower layers
# (opaque directories, redirects, metacopy), so only cerman's own code writes them.
RESERVED_XATTR_PREFIX = "trusted.overlay."
PAX_XATTR_PREFIX = "SCHILY.xattr."

# Names of temporary directories beside a final one. "~" cannot occur in a checkpoint
# name, so one checkpoint's temporaries never match another's prefix.
STAGING_INFIX = "~staging-"
OLD_INFIX = "~old-"

RENAME_EXCHANGE = 2  # linux/fs.h, renameat2(2) flag
AT_FDCWD = -100


def detect_compression(archive):
    """Return "gzip", "zstd", "bzip2", "xz" or "none" from the archive's first bytes."""
    with open(archive, "rb") as file:
        head = file.read(8)
    for name, magic in (("gzip", MAGIC_GZIP), ("zstd", MAGIC_ZSTD),
                        ("bzip2", MAGIC_BZIP2), ("xz", MAGIC_XZ)):
        if head.startswith(magic):
            return name
    return "none"


@contextlib.contextmanager
def _zstd_output(archive):
    """Yield the decompressed stream of ``zstd -dc archive``; raise if zstd fails."""
    try:
        process = subprocess.Popen(["zstd", "-dcq", "--", str(archive)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as error:
        raise SourceError(f"archive {archive} is zstd-compressed but the zstd command is "
                          "not installed; install zstd") from error

    reader_failed = False
    try:
        yield process.stdout
        # Read the tail past the tar end marker, so that zstd exits on its own and its
        # exit code reports decompression errors only.
        while process.stdout.read(1 << 16):
            pass
    except BaseException:
        reader_failed = True
        raise
    finally:
        process.stdout.close()
        message = process.stderr.read().decode(errors="replace").strip()
        process.stderr.close()
        returncode = process.wait()
        if returncode != 0 and reader_failed:
            # zstd stopped because the reader closed the pipe, or the reader stopped
            # because zstd's output ended early; the reader's error is propagating.
            level = logging.DEBUG if returncode < 0 else logging.WARNING
            log.log(level, "archive %s: zstd -dc exited with %d after the reader failed: %s",
                    archive, returncode, message or "no message")
        elif returncode != 0:
            raise SourceError(f"archive {archive}: zstd -dc failed with exit code "
                              f"{returncode}: {message or 'no message'}; the archive is "
                              "corrupt or truncated, re-export it")


@contextlib.contextmanager
def open_tar(archive):
    """Yield ``archive`` as a streaming ``tarfile.TarFile``, whatever its compression."""
    archive = Path(archive)
    try:
        compression = detect_compression(archive)
    except OSError as error:
        raise SourceError(f"archive {archive} cannot be read: {error.strerror}; "
                          "check the source path") from error

    with contextlib.ExitStack() as stack:
        if compression == "zstd":
            stream = stack.enter_context(_zstd_output(archive))
            mode = "r|"
        else:
            stream = stack.enter_context(open(archive, "rb"))
            mode = TARFILE_STREAM_MODES[compression]
        try:
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode=mode))
        except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
            raise SourceError(f"archive {archive} ({compression} compression) is not a "
                              f"tar archive: {error}; re-export it") from error
        yield tar


def normalize_entry_name(name, archive):
    """Return the entry ``name`` as a relative path, or raise UnsafeArchiveError.

    The archive root ("./", ".") becomes ``PurePosixPath(".")``.
    """
    if name.startswith("/"):
        raise UnsafeArchiveError(f"archive {archive}: entry {name!r} has an absolute name; "
                                 "re-create the archive with relative names")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"archive {archive}: entry {name!r} has a '..' component "
                                 "and could land outside the target; re-create the archive "
                                 "from a trusted source")
    return PurePosixPath(*parts)


def make_parents(target, relative, archive, entry):
    """Create the missing parents of ``target/relative``; return those created.

    Raises UnsafeArchiveError when an existing parent is a symlink, SourceError when it
    is not a directory. Created directories get mode 0755 until someone sets theirs.
    """
    created = []
    current = PurePosixPath()
    for part in relative.parts[:-1]:
        current = current / part
        _check_or_create_directory(target, current, archive, entry, created)
    return created


def _check_or_create_directory(target, relative, archive, entry, created):
    path = Path(target, relative)
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, 0o755)
        os.chmod(path, 0o755)  # mkdir's mode is masked by the umask
        created.append(relative)
        return
    if stat.S_ISLNK(status.st_mode):
        raise UnsafeArchiveError(f"archive {archive}: entry {entry!r} would be written "
                                 f"through the symlink {relative} and could land outside "
                                 f"{target}; re-create the archive from a trusted source")
    if not stat.S_ISDIR(status.st_mode):
        raise SourceError(f"archive {archive}: entry {entry!r} needs {relative} to be a "
                          "directory, but the archive made it a file; re-export the archive")


class _Extractor:
    """State of one extraction: which paths are known safe and what is left to do."""

    def __init__(self, archive, target, allow_devices, members):
        self.archive = archive
        self.target = target
        self.allow_devices = allow_devices
        self.members = members
        # Relative paths of directories already checked to be real directories.
        self.checked_dirs = set()
        # Relative paths of non-directories written by this archive: hard link targets.
        self.extracted = set()
        # Directories created only as parents of an entry, not by an entry of their own;
        # the target itself counts until the archive has a root entry.
        self.implicit_dirs = {PurePosixPath(".")}
        # Directory entries whose attributes are applied in finish().
        self.deferred_dirs = {}
        self.skipped_xattrs = 0

    def destination(self, name):
        """Return the relative path ``name`` is written to, or None to skip it."""
        relative = normalize_entry_name(name, self.archive)
        if self.members is None:
            return relative
        selected = self.members(str(relative))
        if selected is None:
            return None
        return normalize_entry_name(selected, self.archive)

    def extract(self, tar, member):
        relative = self.destination(member.name)
        if relative is None:
            return
        if member.ischr() or member.isblk():
            if not self.allow_devices:
                raise UnsafeArchiveError(
                    f"archive {self.archive}: entry {member.name!r} is a device node "
                    f"({member.devmajor}:{member.devminor}), which is not allowed here; "
                    "remove it from the archive")
        if relative == PurePosixPath("."):
            if member.isdir():
                self.deferred_dirs[relative] = member
                self.implicit_dirs.discard(relative)
            return

        self.ensure_parents(relative, member.name)
        path = self.target / relative
        if member.islnk():
            self.write_hard_link(member, relative, path)
            return
        self.clear(relative, path, member)

        if member.isdir():
            if not os.path.lexists(path):
                os.mkdir(path, 0o700)
            self.checked_dirs.add(relative)
            self.implicit_dirs.discard(relative)
            self.deferred_dirs[relative] = member
            return
        if member.isreg():
            self.write_file(tar, member, path)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.isfifo():
            os.mkfifo(path, 0o600)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        else:
            raise SourceError(f"archive {self.archive}: entry {member.name!r} has tar type "
                              f"{member.type!r}, which cannot be extracted; re-export the "
                              "archive with GNU or PAX tar")
        self.extracted.add(relative)
        self.set_attributes(path, member)

    def ensure_parents(self, relative, entry):
        current = PurePosixPath()
        for part in relative.parts[:-1]:
            current = current / part
            if current in self.checked_dirs:
                continue
            created = []
            _check_or_create_directory(self.target, current, self.archive, entry, created)
            self.implicit_dirs.update(created)
            self.checked_dirs.add(current)

    def clear(self, relative, path, member):
        """Remove what is at ``path`` unless ``member`` is a directory over a directory."""
        try:
            status = os.lstat(path)
        except FileNotFoundError:
            return
        is_dir = stat.S_ISDIR(status.st_mode)
        if member.isdir() and is_dir:
            return
        if is_dir:
            shutil.rmtree(path)
            self.forget(relative)
        else:
            os.unlink(path)
            self.extracted.discard(relative)

    def forget(self, relative):
        """Drop what is known about the directory ``relative`` and below, after it was
        removed."""
        def under(known):
            return known == relative or relative in known.parents

        self.checked_dirs = {known for known in self.checked_dirs if not under(known)}
        self.extracted = {known for known in self.extracted if not under(known)}
        self.implicit_dirs = {known for known in self.implicit_dirs if not under(known)}
        self.deferred_dirs = {known: member for known, member in self.deferred_dirs.items()
                              if not under(known)}

    def write_hard_link(self, member, relative, path):
        source = self.destination(member.linkname)
        if source is None or source not in self.extracted:
            raise UnsafeArchiveError(
                f"archive {self.archive}: entry {member.name!r} is a hard link to "
                f"{member.linkname!r}, which this archive has not extracted into "
                f"{self.target}; re-create the archive so that link targets come first")
        # The parents of the link target were checked when it was written, but a later
        # entry may have replaced one of them by a symlink since.
        self.ensure_parents(source, member.name)
        self.clear(relative, path, member)
        os.link(self.target / source, path, follow_symlinks=False)
        self.extracted.add(relative)

    def write_file(self, tar, member, path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(os.open(path, flags, 0o600), "wb") as output:
            shutil.copyfileobj(tar.extractfile(member), output, 1 << 20)

    def set_attributes(self, path, member):
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
        for key, value in member.pax_headers.items():
            if key.startswith(PAX_XATTR_PREFIX):
                self.set_xattr(path, key[len(PAX_XATTR_PREFIX):], value)
        if not member.issym():
            # chmod after chown, which clears the set-user-ID and set-group-ID bits.
            os.chmod(path, member.mode & 0o7777)
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)

    def set_xattr(self, path, name, value):
        if name.startswith(RESERVED_XATTR_PREFIX):
            self.skipped_xattrs += 1
            return
        os.setxattr(path, name, value.encode("utf-8", "surrogateescape"),
                    follow_symlinks=False)

    def finish(self):
        """Apply the deferred directory attributes."""
        for relative, member in self.deferred_dirs.items():
            self.set_attributes(self.target / relative, member)
        if self.skipped_xattrs:
            log.warning("archive %s: skipped %d %s* extended attributes, which only cerman "
                        "sets", self.archive, self.skipped_xattrs, RESERVED_XATTR_PREFIX)


def extract_tar(archive, target, *, allow_devices=False, members=None):
    """Extract ``archive`` into the existing directory ``target``, entry by entry.

    ``members``, when given, is called with each entry's normalized relative name
    ("." for the archive root) and returns the relative name to write it under, or
    None to skip the entry. Hard link targets are mapped the same way.

    Returns the set of directories (relative ``PurePosixPath``) whose attributes the
    archive does not specify: those created only as parents of an entry, and "." when
    the archive has no root entry.

    Raises UnsafeArchiveError for an entry that could land outside ``target`` and
    SourceError when the archive cannot be read or written. Entries before the failing
    one stay in ``target``; ``staging_directory`` discards them.
    """
    archive = Path(archive)
    target = Path(target)
    extractor = _Extractor(archive, target, allow_devices, members)
    with open_tar(archive) as tar:
        member = None
        try:
            for member in tar:
                extractor.extract(tar, member)
        except (tarfile.TarError, EOFError, zlib.error) as error:
            raise SourceError(f"archive {archive} is truncated or corrupt after entry "
                              f"{member.name if member else 'none'!r}: {error}; "
                              "re-export it") from error
        except UnsafeArchiveError:
            raise
        except OSError as error:
            raise SourceError(f"archive {archive}: cannot extract entry {member.name!r} "
                              f"into {target}: {error}; check free space and that the "
                              "target filesystem supports this entry type") from error
    try:
        extractor.finish()
    except OSError as error:
        raise SourceError(f"archive {archive}: cannot set directory attributes in {target}: "
                          f"{error}; check the target filesystem") from error
    return extractor.implicit_dirs


def _rename_exchange(first, second):
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE) (Linux 3.15)."""
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second),
                            RENAME_EXCHANGE)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(code)}",
                      str(first), None, str(second))


def _sibling(final, infix):
    return Path(tempfile.mkdtemp(prefix=f".{final.name}{infix}", dir=final.parent))


def replace_directory(new, final):
    """Move the directory ``new`` to ``final``, replacing any directory there.

    Readers of ``final`` see either the old or the new tree, never a mix and never a
    missing directory, unless the filesystem lacks RENAME_EXCHANGE (then ``final`` is
    absent for the moment between two renames, which is logged).
    """
    new, final = Path(new), Path(final)
    try:
        os.rename(new, final)  # succeeds when final is missing or an empty directory
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise

    try:
        _rename_exchange(new, final)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        log.warning("%s: the filesystem does not support RENAME_EXCHANGE (%s); replacing "
                    "it with two renames, so it is briefly absent", final, error.strerror)
        old = _sibling(final, OLD_INFIX)
        os.rename(final, old / "tree")
        os.rename(new, final)
        shutil.rmtree(old)
        return
    shutil.rmtree(new)  # contains the old tree after the exchange


def remove_directory(final):
    """Remove the directory ``final`` so that it never appears half-deleted; return
    whether it existed."""
    final = Path(final)
    old = _sibling(final, OLD_INFIX)
    try:
        os.rename(final, old / "tree")
    except FileNotFoundError:
        os.rmdir(old)
        return False
    shutil.rmtree(old)
    return True


def remove_stale_temporaries(final):
    """Remove staging and old directories that an interrupted run left beside ``final``.

    Only safe while the caller holds whatever lock serializes writers of ``final``.
    """
    final = Path(final)
    for infix in (STAGING_INFIX, OLD_INFIX):
        for path in final.parent.glob(f".{final.name}{infix}*"):
            log.info("%s: removing %s left by an interrupted run", final, path.name)
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staging_directory(final):
    """Yield an empty directory beside ``final``; on success, move it to ``final``.

    On an exception the staging directory is removed and ``final`` is left untouched.
    """
    final = Path(final)
    staging = _sibling(final, STAGING_INFIX)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        replace_directory(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def extract_atomically(archive, final, *, allow_devices=False, members=None):
    """Extract ``archive`` into a staging directory beside ``final``, then move it there.

    Returns what ``extract_tar`` returns. ``final`` keeps its previous content when
    extraction fails.
    """
    with staging_directory(final) as staging:
        return extract_tar(archive, staging, allow_devices=allow_devices, members=members)
