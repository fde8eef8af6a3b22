"""Checkpoint config files: validation and per-file errors."""

import pytest

from cerman.config import load_config, scan_config_dir
from cerman.errors import ConfigError


def write(directory, name, text):
    path = directory / name
    path.write_text(text)
    return path


def test_config_directory_source(tmp_path):
    path = write(tmp_path, "a.yaml", "name: fn-a\nsource: {type: directory, path: /srv/a}\n"
                 "pools: {ipc: 3, uts: 1}\n")
    config = load_config(path)
    assert config.name == "fn-a"
    assert str(config.source.path) == "/srv/a"
    assert config.pools == {"ipc": 3, "uts": 1}


def test_config_containerd_defaults(tmp_path):
    path = write(tmp_path, "c.yaml", "name: c\nsource: {type: containerd, image: ck}\n")
    config = load_config(path)
    assert config.source.namespace == "default"
    assert str(config.source.address) == "/run/containerd/containerd.sock"
    assert config.pools == {}


@pytest.mark.parametrize("text, key", [
    ("source: {type: directory, path: /a}\n", "name"),
    ("name: 'bad name'\nsource: {type: directory, path: /a}\n", "name"),
    ("name: a\nsource: {type: zip, path: /a}\n", "source.type"),
    ("name: a\nsource: {type: containerd, image: c, address: relative.sock}\n", "source.address"),
    ("name: a\nsource: {type: directory}\n", "source.path"),
    ("name: a\nsource: {type: containerd}\n", "source.image"),
    ("name: a\nsource: {type: directory, path: /a}\npools: {ipc: -1}\n", "pools.ipc"),
    ("name: a\nsource: {type: directory, path: /a}\npools: {net: 1}\n", "pools.net"),
    ("name: a\nsource: {type: directory, path: /a}\npools: {ipc: 'many'}\n", "pools.ipc"),
    ("name: a\nsource: {type: directory, path: /a}\ncolour: blue\n", "colour"),
])
def test_config_invalid_key_named(tmp_path, text, key):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key
    assert str(path) in str(caught.value)


def test_config_invalid_yaml(tmp_path):
    path = write(tmp_path, "broken.yaml", "name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_scan_keeps_good_files(tmp_path):
    write(tmp_path, "good.yaml", "name: good\nsource: {type: directory, path: /a}\n")
    write(tmp_path, "bad.yaml", "name: bad\nsource: {type: nope}\n")
    scan = scan_config_dir(tmp_path)
    assert list(scan.configs) == ["good"]
    assert list(scan.errors) == [str(tmp_path / "bad.yaml")]


def test_scan_duplicate_name_ignoring_case(tmp_path):
    write(tmp_path, "a.yaml", "name: Fn\nsource: {type: directory, path: /a}\n")
    write(tmp_path, "b.yaml", "name: fn\nsource: {type: directory, path: /b}\n")
    scan = scan_config_dir(tmp_path)
    assert list(scan.configs) == ["Fn"]
    assert "already used" in scan.errors[str(tmp_path / "b.yaml")]


def test_config_relative_path_from_file(tmp_path):
    path = write(tmp_path, "r.yaml", "name: r\nsource: {type: directory, path: ../images}\n")
    assert load_config(path).source.path == tmp_path / "../images"


def test_scan_running_name_kept(tmp_path):
    write(tmp_path, "b-own.yaml", "name: own\nsource: {type: directory, path: /a}\n")
    write(tmp_path, "a-dup.yaml", "name: OWN\nsource: {type: directory, path: /b}\n")
    scan = scan_config_dir(tmp_path, keep={"own"})
    assert list(scan.configs) == ["own"]
    assert "already used" in scan.errors[str(tmp_path / "a-dup.yaml")]
