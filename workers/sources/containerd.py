"""Checkpoint source: a containerd checkpoint image, read through ``ctr``.

``ctr containers checkpoint --rw --image --task`` (containerd 1.6) stores an OCI index
in the content store. Its entries are distinguished by media type::

    index (application/vnd.oci.image.index.v1+json)
     ├─ ...container.criu.checkpoint.criu.tar       CRIU image files   -> images/
     ├─ application/vnd.oci.image.layer.v1.tar+gzip rw layer, a diff    -> layers/00
     │                                              against the base image
     ├─ image manifest (or index) with annotation   base image         -> layers/01..
     │  org.opencontainers.image.ref.name              (top to bottom)
     ├─ ...container.checkpoint.config.v1+proto     protobuf Any whose  -> spec.json
     │                                              value is the OCI runtime spec JSON
     └─ runtime options, checkpoint options         verified, not used

The index's annotations name the base image, the snapshotter and the runtime. When the
index lists no manifest, the base image is looked up in the image store by the name in
that annotation.

Every blob the index and the base manifest reference is checked for presence before
anything is extracted, and every blob read is checked against its digest.

Base layers are unpacked from the content store instead of mounting containerd's
snapshots. After ``fill`` returns, the prepared checkpoint therefore does not depend on
containerd running, on its garbage collector or on its snapshotter, and ``fill``
returns no extra lower directories. The cost is one copy of the base image on disk per
checkpoint.

``ctr images export`` cannot export checkpoint images, so blobs are read one by one
with ``ctr content get``.
"""

import hashlib
import json
import logging
import platform
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cerman.errors import SourceError
from workers.extract import extract_tar
from workers.rootfs import extract_layer, inherit_directory_attributes

log = logging.getLogger(__name__)

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)

MEDIA_CRIU_TAR = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
MEDIA_CHECKPOINT_CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_RUNTIME = "io.containerd.checkpoint.runtime"
ANNOTATION_SNAPSHOTTER = "io.containerd.checkpoint.snapshotter"
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"

# GOARCH names that OCI platforms use, by the kernel's machine name.
GOARCH_BY_MACHINE = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm",
                     "i686": "386", "ppc64le": "ppc64le", "s390x": "s390x",
                     "riscv64": "riscv64"}

# Timeouts in seconds. Metadata commands return at once on a healthy containerd.
# Blob copies are bounded by the connect timeout only, because images may be large.
CONNECT_TIMEOUT = 5
METADATA_TIMEOUT = 60
# Index, manifest and config blobs are read into memory, so a larger one is rejected.
METADATA_SIZE_MAX = 16 * 1024 * 1024
COPY_CHUNK = 1024 * 1024

CHECKPOINT_HINT = "re-create it with 'ctr containers checkpoint --rw --image --task'"


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and its size in bytes.

    ``size`` is None for a blob reached through ``ctr images list``, which prints
    sizes only rounded.
    """

    media_type: str
    digest: str
    size: int | None

    @classmethod
    def parse(cls, data, where):
        try:
            media_type = data["mediaType"]
            digest = data["digest"]
            size = data["size"]
        except (KeyError, TypeError) as error:
            raise SourceError(f"{where}: descriptor {data!r} lacks mediaType, digest or "
                              "size") from error
        if not (isinstance(digest, str) and digest.startswith("sha256:")
                and len(digest) == 71 and isinstance(size, int) and size >= 0):
            raise SourceError(f"{where}: descriptor has an invalid digest {digest!r} or "
                              f"size {size!r}")
        return cls(media_type, digest, size)


@dataclass
class CheckpointLayout:
    """The blobs of one checkpoint image, sorted by role."""

    index: Descriptor
    criu_tar: Descriptor
    config: Descriptor
    rw_layers: list
    base_image: str
    # The base image's manifest and config, and its layers topmost first.
    base_manifest: Descriptor
    base_config: Descriptor | None
    base_layers: list
    other: list
    annotations: dict


class ContentStore:
    """The content and image store of one containerd namespace, reached with ``ctr``.

    ``label`` starts every error message, so that it names the checkpoint and image.
    """

    def __init__(self, address, namespace, label):
        self.address = Path(address)
        self.namespace = namespace
        self.label = label

    def _command(self, *args):
        return ["ctr", "--address", str(self.address), "--namespace", self.namespace,
                "--connect-timeout", f"{CONNECT_TIMEOUT}s", *args]

    def check_reachable(self):
        """Raise SourceError unless something accepts connections on the socket.

        ctr retries a missing socket until its connect timeout, so the common
        mistakes are caught here with a clearer message and at once.
        """
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(CONNECT_TIMEOUT)
                probe.connect(str(self.address))
        except FileNotFoundError:
            raise SourceError(f"{self.label}: containerd socket {self.address} does not "
                              "exist; start containerd or correct source.address") from None
        except ConnectionRefusedError:
            raise SourceError(f"{self.label}: containerd is not running at {self.address} "
                              "(connection refused); start containerd or correct "
                              "source.address") from None
        except OSError as error:
            raise SourceError(f"{self.label}: cannot connect to containerd at "
                              f"{self.address}: {error.strerror or error}; start containerd "
                              "or correct source.address") from error

    def run(self, *args):
        """Run a ctr command that prints metadata, and return its stdout as bytes."""
        command = self._command(*args)
        try:
            result = subprocess.run(command, capture_output=True, timeout=METADATA_TIMEOUT)
        except FileNotFoundError:
            raise SourceError(f"{self.label}: ctr is not on PATH; install containerd's "
                              "client (Debian package containerd)") from None
        except subprocess.TimeoutExpired:
            raise SourceError(f"{self.label}: 'ctr {' '.join(args)}' timed out after "
                              f"{METADATA_TIMEOUT} s; check containerd at "
                              f"{self.address}") from None
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            raise SourceError(f"{self.label}: 'ctr {' '.join(args)}' failed: {stderr}; "
                              f"check containerd at {self.address}")
        return result.stdout

    def image_target(self, name):
        """Return the media type and digest of the image ``name``, or None if absent."""
        # Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS. A reference has no spaces.
        lines = self.run("images", "list").decode().splitlines()
        for line in lines[1:]:
            columns = line.split()
            if len(columns) >= 3 and columns[0] == name:
                return columns[1], columns[2]
        return None

    def digests(self):
        """Return the set of digests present in the content store."""
        return set(self.run("content", "list", "--quiet").decode().split())

    def read(self, descriptor):
        """Return the blob's bytes after checking its size and digest."""
        if descriptor.size is not None and descriptor.size > METADATA_SIZE_MAX:
            raise SourceError(f"{self.label}: blob {descriptor.digest} "
                              f"({descriptor.media_type}) is {descriptor.size} bytes, more "
                              f"than the {METADATA_SIZE_MAX} a metadata blob may have; "
                              f"{CHECKPOINT_HINT}")
        data = self.run("content", "get", descriptor.digest)
        self._verify(descriptor, len(data), hashlib.sha256(data).hexdigest())
        return data

    def copy(self, descriptor, path):
        """Write the blob to ``path``, checking its size and digest on the way."""
        hasher = hashlib.sha256()
        written = 0
        command = self._command("content", "get", descriptor.digest)
        with open(path, "wb") as output, tempfile.TemporaryFile() as stderr:
            try:
                process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr)
            except FileNotFoundError:
                raise SourceError(f"{self.label}: ctr is not on PATH; install containerd's "
                                  "client (Debian package containerd)") from None
            with process:
                while chunk := process.stdout.read(COPY_CHUNK):
                    hasher.update(chunk)
                    output.write(chunk)
                    written += len(chunk)
            if process.returncode != 0:
                stderr.seek(0)
                message = stderr.read().decode(errors="replace").strip()
                raise SourceError(f"{self.label}: 'ctr content get {descriptor.digest}' "
                                  f"failed: {message}; check containerd at {self.address}")
        self._verify(descriptor, written, hasher.hexdigest())

    def _verify(self, descriptor, size, hexdigest):
        size_matches = descriptor.size is None or size == descriptor.size
        if not size_matches or f"sha256:{hexdigest}" != descriptor.digest:
            raise SourceError(f"{self.label}: blob {descriptor.digest} "
                              f"({descriptor.media_type}) in the content store at "
                              f"{self.address} is corrupt: {size} bytes with digest "
                              f"sha256:{hexdigest}; remove it with 'ctr content rm' and "
                              "re-import the image")


def _label(config):
    source = config.source
    return (f"checkpoint {config.name!r}: containerd image {source.image!r} "
            f"(namespace {source.namespace!r})")


def _open_store(config):
    store = ContentStore(config.source.address, config.source.namespace, _label(config))
    store.check_reachable()
    return store


def _index_target(store, image):
    """Return the media type and digest of the checkpoint image's index."""
    target = store.image_target(image)
    if target is None:
        raise SourceError(f"{store.label}: image not found; import it with "
                          "'ctr images import --no-unpack' or correct source.image and "
                          "source.namespace")
    media_type, digest = target
    if media_type not in INDEX_TYPES:
        raise SourceError(f"{store.label}: image is a {media_type}, not a checkpoint index; "
                          f"name a checkpoint image or {CHECKPOINT_HINT}")
    return media_type, digest


def _read_json(store, descriptor, what):
    data = store.read(descriptor)
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{store.label}: {what} {descriptor.digest} is not valid JSON: "
                          f"{error}; {CHECKPOINT_HINT}") from error
    if not isinstance(document, dict):
        raise SourceError(f"{store.label}: {what} {descriptor.digest} is not a JSON object; "
                          f"{CHECKPOINT_HINT}")
    return document


def _one(store, entries, media_type, what):
    if len(entries) != 1:
        raise SourceError(f"{store.label}: the index lists {len(entries)} {what} blobs "
                          f"({media_type}), expected one; {CHECKPOINT_HINT}")
    return entries[0]


def _host_platform():
    machine = platform.machine()
    return "linux", GOARCH_BY_MACHINE.get(machine, machine)


def _select_platform_manifest(store, index_descriptor, index, image):
    """Return the manifest for this host's platform from a multi-platform base image."""
    want_os, want_arch = _host_platform()
    for entry in index.get("manifests") or []:
        descriptor = Descriptor.parse(entry, f"{store.label}: base image {image!r}")
        wanted = entry.get("platform") or {}
        if (descriptor.media_type in MANIFEST_TYPES and wanted.get("os") == want_os
                and wanted.get("architecture") == want_arch):
            return descriptor
    raise SourceError(f"{store.label}: base image {image!r} ({index_descriptor.digest}) has "
                      f"no manifest for {want_os}/{want_arch}; checkpoint a container of "
                      "this platform")


def _require_present(store, present, descriptors, referrer, next_step):
    missing = [descriptor for descriptor in descriptors if descriptor.digest not in present]
    if missing:
        listed = ", ".join(f"{descriptor.digest} ({descriptor.media_type})"
                           for descriptor in missing)
        raise SourceError(f"{store.label}: {referrer} references {listed}, missing from "
                          f"the content store at {store.address}; {next_step}")


def _read_layout(store, image):
    """Read the index and the base manifest, and check that every blob is present."""
    media_type, digest = _index_target(store, image)
    present = store.digests()
    reimport = (f"re-import the checkpoint image with 'ctr images import --no-unpack' or "
                f"{CHECKPOINT_HINT}")
    _require_present(store, present, [Descriptor(media_type, digest, None)],
                     f"image {image!r}", reimport)
    index = _read_json(store, Descriptor(media_type, digest, None), "index")
    raw_entries = index.get("manifests")
    if not isinstance(raw_entries, list):
        raise SourceError(f"{store.label}: index {digest} has no manifests list; "
                          f"{CHECKPOINT_HINT}")

    where = f"{store.label}: index {digest}"
    entries = [Descriptor.parse(entry, where) for entry in raw_entries]
    _require_present(store, present, entries, f"checkpoint index {digest}", reimport)

    by_type = {}
    for descriptor, raw in zip(entries, raw_entries):
        by_type.setdefault(descriptor.media_type, []).append((descriptor, raw))
    criu_tar = _one(store, by_type.pop(MEDIA_CRIU_TAR, []), MEDIA_CRIU_TAR, "CRIU image")
    config = _one(store, by_type.pop(MEDIA_CHECKPOINT_CONFIG, []), MEDIA_CHECKPOINT_CONFIG,
                  "checkpoint config")
    rw_layers = [descriptor for media in LAYER_TYPES for descriptor, _ in by_type.pop(media, [])]
    if len(rw_layers) > 1:
        raise SourceError(f"{store.label}: index {digest} lists {len(rw_layers)} rw layers, "
                          f"expected at most one; {CHECKPOINT_HINT}")
    base_entries = [pair for media in MANIFEST_TYPES + INDEX_TYPES
                    for pair in by_type.pop(media, [])]
    if len(base_entries) > 1:
        raise SourceError(f"{store.label}: index {digest} lists {len(base_entries)} base "
                          f"image manifests, expected at most one; {CHECKPOINT_HINT}")
    other = [descriptor for pairs in by_type.values() for descriptor, _ in pairs]

    annotations = index.get("annotations") or {}
    base_image, base_target = _base_image_target(store, digest, annotations, base_entries)
    base_manifest, manifest = _read_base_manifest(store, present, base_image, base_target)
    base_config, base_layers = _base_manifest_blobs(store, present, base_image,
                                                    base_manifest, manifest)
    return CheckpointLayout(
        index=Descriptor(media_type, digest, None), criu_tar=criu_tar[0], config=config[0],
        rw_layers=rw_layers, base_image=base_image, base_manifest=base_manifest,
        base_config=base_config, base_layers=base_layers, other=other,
        annotations=annotations)


def _base_image_target(store, index_digest, annotations, base_entries):
    """Return the base image's name and the descriptor of its manifest or index.

    An index without a manifest entry still names its base image in its annotations,
    and the image store then provides the manifest.
    """
    if base_entries:
        descriptor, raw = base_entries[0]
        name = ((raw.get("annotations") or {}).get(ANNOTATION_REF_NAME)
                or annotations.get(ANNOTATION_REF_NAME) or descriptor.digest)
        return name, descriptor

    name = annotations.get(ANNOTATION_REF_NAME)
    if not name:
        raise SourceError(f"{store.label}: index {index_digest} neither lists nor names its "
                          f"base image; {CHECKPOINT_HINT}")
    target = store.image_target(name)
    if target is None:
        raise SourceError(f"{store.label}: base image {name!r}, which the checkpoint does "
                          "not carry, is not in the image store; pull or import it into "
                          f"namespace {store.namespace!r}")
    media_type, digest = target
    return name, Descriptor(media_type, digest, None)


def _read_base_manifest(store, present, image, descriptor):
    """Return the base image's manifest descriptor for this host, and the manifest."""
    next_step = f"pull or import the base image {image!r} again"
    _require_present(store, present, [descriptor], f"base image {image!r}", next_step)
    if descriptor.media_type in INDEX_TYPES:
        index = _read_json(store, descriptor, f"base image {image!r} index")
        descriptor = _select_platform_manifest(store, descriptor, index, image)
        _require_present(store, present, [descriptor], f"base image {image!r}", next_step)
    if descriptor.media_type not in MANIFEST_TYPES:
        raise SourceError(f"{store.label}: base image {image!r} is a {descriptor.media_type}, "
                          "not an image manifest; checkpoint a container of an OCI or "
                          "Docker image")
    return descriptor, _read_json(store, descriptor, f"base image {image!r} manifest")


def _base_manifest_blobs(store, present, image, descriptor, manifest):
    """Return the base config descriptor and the layer descriptors, topmost first."""
    where = f"{store.label}: base image {image!r} manifest {descriptor.digest}"
    config = Descriptor.parse(manifest.get("config"), where)
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise SourceError(f"{where}: has no layers list; pull or import the base image again")
    layers = [Descriptor.parse(layer, where) for layer in raw_layers]
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise SourceError(f"{where}: layer {layer.digest} has media type "
                              f"{layer.media_type}, which cerman cannot unpack (supported: "
                              f"{', '.join(LAYER_TYPES)})")
    _require_present(store, present, [config, *layers],
                     f"base image {image!r} manifest {descriptor.digest}",
                     f"pull or import the base image {image!r} again")
    return config, layers[::-1]


def _read_varint(data, position, where):
    value = 0
    for shift in range(0, 64, 7):
        if position >= len(data):
            raise SourceError(f"{where}: protobuf varint is truncated")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    raise SourceError(f"{where}: protobuf varint is longer than 10 bytes")


def decode_any(data, where):
    """Return the type URL and value of a serialized ``google.protobuf.Any``.

    Field 1 is the type URL and field 2 the value, both length-delimited. Fields of
    other numbers are skipped, as protobuf parsers do.
    """
    fields = {}
    position = 0
    while position < len(data):
        key, position = _read_varint(data, position, where)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = _read_varint(data, position, where)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _read_varint(data, position, where)
            if position + length > len(data):
                raise SourceError(f"{where}: field {number} of {length} bytes runs past the "
                                  f"end at byte {len(data)}")
            fields[number] = data[position:position + length]
            position += length
        else:
            raise SourceError(f"{where}: field {number} has unsupported wire type "
                              f"{wire_type}")
    if position > len(data):
        raise SourceError(f"{where}: last field runs past the end at byte {len(data)}")

    try:
        type_url = fields.get(1, b"").decode()
    except UnicodeDecodeError as error:
        raise SourceError(f"{where}: type URL is not UTF-8") from error
    return type_url, fields.get(2, b"")


def _write_spec(store, layout, target):
    where = f"{store.label}: checkpoint config {layout.config.digest}"
    type_url, value = decode_any(store.read(layout.config), where)
    if type_url != SPEC_TYPE_URL:
        raise SourceError(f"{where}: contains {type_url!r}, expected {SPEC_TYPE_URL!r}; "
                          f"{CHECKPOINT_HINT}")
    try:
        spec = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{where}: runtime spec is not valid JSON: {error}; "
                          f"{CHECKPOINT_HINT}") from error
    if not isinstance(spec, dict):
        raise SourceError(f"{where}: runtime spec is not a JSON object; {CHECKPOINT_HINT}")
    (target / "spec.json").write_bytes(value)


def _extract_images(store, layout, target, download_dir):
    archive = download_dir / "criu.tar"
    store.copy(layout.criu_tar, archive)
    images_dir = target / "images"
    images_dir.mkdir()
    extract_tar(archive, images_dir)
    archive.unlink()


def _extract_layers(store, layout, target, download_dir):
    """Unpack the rw layer and the base layers as ``layers/00``, ``layers/01``, ..."""
    layers_dir = target / "layers"
    layers_dir.mkdir()
    layer_dirs = []
    implicit_dirs = []
    for number, descriptor in enumerate(layout.rw_layers + layout.base_layers):
        archive = download_dir / f"layer-{number:02d}"
        store.copy(descriptor, archive)
        layer_dir = layers_dir / f"{number:02d}"
        layer_dir.mkdir()
        implicit_dirs.append(extract_layer(archive, layer_dir))
        archive.unlink()
        layer_dirs.append(layer_dir)

    # Only now are the layers below each one on disk.
    for number, layer_dir in enumerate(layer_dirs):
        inherit_directory_attributes(layer_dir, implicit_dirs[number], layer_dirs[number + 1:])


def fill(config, target):
    """Fill the empty directory ``target`` from the checkpoint image in containerd.

    Writes ``images/`` (CRIU image files), ``layers/00``, ``layers/01``, ... (overlay
    lower layers, topmost first: the rw layer, then the base image's layers) and
    ``spec.json`` (the container's OCI runtime spec). Returns no extra lower
    directories, because base layers are unpacked rather than borrowed from
    containerd's snapshots. Raises SourceError before extracting anything when
    containerd is unreachable, the image is missing or a blob it references is absent.
    """
    target = Path(target)
    store = _open_store(config)
    layout = _read_layout(store, config.source.image)
    log.info("checkpoint %r: preparing containerd image %r (index %s, base image %r, "
             "%d rw and %d base layers, runtime %s, snapshotter %s)",
             config.name, config.source.image, layout.index.digest, layout.base_image,
             len(layout.rw_layers), len(layout.base_layers),
             layout.annotations.get(ANNOTATION_RUNTIME, "unknown"),
             layout.annotations.get(ANNOTATION_SNAPSHOTTER, "unknown"))

    download_dir = target / ".download"
    download_dir.mkdir()
    try:
        _write_spec(store, layout, target)
        _extract_images(store, layout, target, download_dir)
        _extract_layers(store, layout, target, download_dir)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)

    log.info("checkpoint %r: prepared containerd image %r in %s", config.name,
             config.source.image, target)
    return []


def fingerprint(config):
    """Return the checkpoint image's index digest, which changes with any of its blobs."""
    store = _open_store(config)
    media_type, digest = _index_target(store, config.source.image)
    return {"image": config.source.image, "digest": digest}
