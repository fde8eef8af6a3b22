"""Prepare one checkpoint and print the result as JSON: ``python -m workers.prepare NAME``.

The worker runs this as a subprocess, started with fork and exec, so that a slow
extraction (a containerd image, a large archive) does not block its request loop.
Output on stdout: ``{"ok": true, "prepared": {...}, "pools": {TYPE: null | reason}}``
or ``{"ok": false, "error": {"code": ..., "message": ...}}``; exit code 0 either way.
"""

import hashlib
import json
import logging
import sys

from cerman import paths as cerman_paths
from cerman import protocol
from cerman.config import scan_config_dir
from cerman.errors import CermanError, ConfigError, ImageError


def find_config(paths, name):
    scan = scan_config_dir(paths.config_dir)
    if name in scan.configs:
        return scan.configs[name]
    for file, message in scan.errors.items():
        if file.rsplit("/", 1)[-1].rsplit(".", 1)[0] == name:
            raise ConfigError(file, "", message.split(": ", 1)[-1])
    raise ConfigError(paths.config_dir, "", f"no valid config names checkpoint {name!r}; "
                      "check the file and run 'cerman ctl reload'")


def generation(prepared):
    """Return a short id of this preparation, stored in the names of pins built from it."""
    fingerprint = prepared.images_dir.parent / "source.json"
    try:
        return hashlib.sha256(fingerprint.read_bytes()).hexdigest()[:12]
    except OSError:
        return hashlib.sha256(str(prepared.images_dir).encode()).hexdigest()[:12]


def pool_availability(config, prepared):
    """Return, per pool type in the config, None when it can be built or why not."""
    from workers.criu import images
    from workers.ipc_builder import check_ipc_image
    from workers.sources import describe_source

    reasons = {}
    for ns_type in config.pools:
        try:
            if ns_type == "ipc":
                image = images.read_ipc_namespace(prepared.images_dir)
                if image is None:
                    raise CermanError("the checkpoint has no IPC namespace images: the container "
                                      "shared the host IPC namespace, so there is nothing to pool")
                check_ipc_image(image)
            elif ns_type == "uts":
                if images.read_uts_namespace(prepared.images_dir) is None:
                    raise CermanError("the checkpoint has no UTS namespace image: the container "
                                      "shared the host UTS namespace, so there is nothing to pool")
            elif ns_type == "mnt":
                if not prepared.rootfs_layers:
                    raise CermanError("no root filesystem: the source carries none; set rootfs.path "
                                      f"in {config.file}")
                if not list(prepared.images_dir.glob("mountpoints-*.img")):
                    raise CermanError("the checkpoint has no mount namespace image: the process "
                                      "shared the host mount namespace, so there is nothing to pool")
                images.read_mountpoints(prepared.images_dir)
            reasons[ns_type] = None
        except ImageError as error:
            reasons[ns_type] = f"{error} (images prepared from {describe_source(config)})"
        except CermanError as error:
            reasons[ns_type] = str(error)
    return reasons


def main(argv):
    logging.basicConfig(force=True, level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s prepare[%(process)d] %(levelname)s %(name)s: %(message)s")
    name = argv[1]
    # --keep: the worker still has leases or references on the current preparation.
    replace = "--keep" not in argv[2:]
    paths = cerman_paths.resolve()
    try:
        from workers import sources

        config = find_config(paths, name)
        prepared = sources.prepare(config, paths.state_dir, replace=replace)
        result = {"ok": True, "prepared": prepared.as_dict(),
                  "generation": generation(prepared),
                  "pools": pool_availability(config, prepared)}
    except CermanError as error:
        logging.getLogger(__name__).error("preparing checkpoint %r failed: %s", name, error)
        result = protocol.failure(error)
    except Exception as error:  # reported to the worker, which shows it in status
        logging.getLogger(__name__).exception("preparing checkpoint %r failed", name)
        result = protocol.failure(error)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
