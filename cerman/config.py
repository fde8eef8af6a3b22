"""Checkpoint config files: one YAML file per checkpoint in the config directory.

Example::

    name: fn-hello
    source:
      type: directory            # directory | archive | containerd
      path: /srv/checkpoints/fn-hello
    rootfs:
      path: /srv/rootfs/hello    # lower layer for mnt pools of a directory source
    pools:
      ipc: 8
      uts: 8
      mnt: 4

A missing pool type means no pool of that type. Relative paths are taken from the
directory of the config file. ``source.address`` (containerd's socket) must be absolute.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cerman.errors import ConfigError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SOURCE_TYPES = ("directory", "archive", "containerd")
POOL_TYPES = ("ipc", "uts", "mnt")
CONTAINERD_ADDRESS_DEFAULT = "/run/containerd/containerd.sock"
CONTAINERD_NAMESPACE_DEFAULT = "default"
# Upper bound on one pool, so that a typo (80000 for 8) cannot pin the machine's memory.
POOL_CAPACITY_MAX = 4096


@dataclass(frozen=True)
class SourceConfig:
    type: str
    path: Path | None = None
    image: str | None = None
    namespace: str = CONTAINERD_NAMESPACE_DEFAULT
    address: Path = Path(CONTAINERD_ADDRESS_DEFAULT)

    def as_dict(self):
        if self.type == "containerd":
            return {"type": self.type, "image": self.image, "namespace": self.namespace,
                    "address": str(self.address)}
        return {"type": self.type, "path": str(self.path)}


@dataclass(frozen=True)
class CheckpointConfig:
    name: str
    file: Path
    source: SourceConfig
    rootfs_path: Path | None = None
    pools: dict = field(default_factory=dict)

    def as_dict(self):
        return {
            "name": self.name,
            "file": str(self.file),
            "source": self.source.as_dict(),
            "rootfs": {"path": str(self.rootfs_path)} if self.rootfs_path else None,
            "pools": dict(self.pools),
        }


def _mapping(path, key, value):
    if not isinstance(value, dict):
        raise ConfigError(path, key, f"expected a mapping, got {type(value).__name__}")
    return value


def _string(path, key, value):
    if not isinstance(value, str) or not value:
        raise ConfigError(path, key, f"expected a non-empty string, got {value!r}")
    return value


def _absolute_path(path, key, value):
    """Return ``value`` as an absolute path; a relative one is taken from the file's directory."""
    text = _string(path, key, value)
    return (Path(path).absolute().parent / text) if not text.startswith("/") else Path(text)


def _socket_path(path, key, value):
    text = _string(path, key, value)
    if not text.startswith("/"):
        raise ConfigError(path, key, f"expected an absolute path, got {text!r}")
    return Path(text)


def _reject_unknown(path, prefix, mapping, known):
    for key in mapping:
        if key not in known:
            allowed = ", ".join(known)
            raise ConfigError(path, f"{prefix}{key}", f"unknown key; allowed keys: {allowed}")


def _parse_source(path, raw):
    source = _mapping(path, "source", raw)
    source_type = source.get("type")
    if source_type not in SOURCE_TYPES:
        raise ConfigError(path, "source.type",
                          f"expected one of {', '.join(SOURCE_TYPES)}, got {source_type!r}")

    if source_type == "containerd":
        _reject_unknown(path, "source.", source, ("type", "image", "namespace", "address"))
        if "image" not in source:
            raise ConfigError(path, "source.image", "missing; name the checkpoint image")
        return SourceConfig(
            type=source_type,
            image=_string(path, "source.image", source["image"]),
            namespace=_string(path, "source.namespace",
                              source.get("namespace", CONTAINERD_NAMESPACE_DEFAULT)),
            address=_socket_path(path, "source.address",
                                 source.get("address", CONTAINERD_ADDRESS_DEFAULT)),
        )

    _reject_unknown(path, "source.", source, ("type", "path"))
    if "path" not in source:
        raise ConfigError(path, "source.path", f"missing; a {source_type} source needs a path")
    return SourceConfig(type=source_type, path=_absolute_path(path, "source.path", source["path"]))


def _parse_pools(path, raw):
    pools = _mapping(path, "pools", raw if raw is not None else {})
    _reject_unknown(path, "pools.", pools, POOL_TYPES)
    result = {}
    for pool_type, capacity in pools.items():
        key = f"pools.{pool_type}"
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise ConfigError(path, key, f"expected an integer capacity, got {capacity!r}")
        if not 0 <= capacity <= POOL_CAPACITY_MAX:
            raise ConfigError(path, key,
                              f"capacity {capacity} is out of range 0..{POOL_CAPACITY_MAX}")
        result[pool_type] = capacity
    return result


def parse_config(path, data):
    """Validate the parsed YAML ``data`` of the file at ``path``; raise ConfigError."""
    document = _mapping(path, "", data)
    _reject_unknown(path, "", document, ("name", "source", "rootfs", "pools"))

    if "name" not in document:
        raise ConfigError(path, "name", "missing; give the checkpoint a name")
    name = document["name"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(path, "name",
                          f"{name!r} is invalid; use 1-128 characters from A-Z a-z 0-9 _ . - "
                          "starting with a letter or digit")

    if "source" not in document:
        raise ConfigError(path, "source", "missing; say where the checkpoint is")
    source = _parse_source(path, document["source"])

    rootfs_path = None
    if document.get("rootfs") is not None:
        rootfs = _mapping(path, "rootfs", document["rootfs"])
        _reject_unknown(path, "rootfs.", rootfs, ("path",))
        if "path" not in rootfs:
            raise ConfigError(path, "rootfs.path", "missing")
        rootfs_path = _absolute_path(path, "rootfs.path", rootfs["path"])

    pools = _parse_pools(path, document.get("pools"))
    return CheckpointConfig(name=name, file=Path(path), source=source,
                            rootfs_path=rootfs_path, pools=pools)


def _yaml_problem(error):
    """Return a one-line description of a YAML error with its line and column."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return problem
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def load_config(path):
    """Read and validate one checkpoint config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(path, "", f"cannot be read: {error.strerror}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(path, "", f"is not valid YAML: {_yaml_problem(error)}") from error
    return parse_config(path, data)


@dataclass
class ConfigScan:
    """Result of reading a config directory: valid configs by name, errors by file."""

    configs: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)


def scan_config_dir(config_dir, keep=()):
    """Read every ``*.yaml`` and ``*.yml`` file; one bad file never hides the others.

    Names must be unique ignoring case, because circus watcher names are. When files
    clash, a name in ``keep`` (the checkpoints already running) wins, so a new file
    cannot take a running checkpoint's name. Otherwise the first file in sorted order
    wins.
    """
    scan = ConfigScan()
    config_dir = Path(config_dir)
    if not config_dir.is_dir():
        return scan

    parsed = []
    for file in sorted(list(config_dir.glob("*.yaml")) + list(config_dir.glob("*.yml"))):
        try:
            parsed.append(load_config(file))
        except ConfigError as error:
            scan.errors[str(file)] = str(error)

    winners = {}
    for config in sorted(parsed, key=lambda config: config.name not in keep):
        clash = winners.get(config.name.lower())
        if clash is not None:
            scan.errors[str(config.file)] = str(ConfigError(
                config.file, "name", f"{config.name!r} is already used by {clash.file}; "
                "names must be unique, ignoring case"))
            continue
        winners[config.name.lower()] = config
    for config in sorted(winners.values(), key=lambda config: str(config.file)):
        scan.configs[config.name] = config
    return scan
