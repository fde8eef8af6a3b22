"""The prepared form of a checkpoint source, as the namespace builders use it."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PreparedCheckpoint:
    """A checkpoint extracted under the state directory, ready for namespace builders.

    ``images_dir`` contains the CRIU image files. ``rootfs_layers`` are read-only
    directories for the overlay's ``lowerdir``, topmost first; empty when the source
    carries no root filesystem and the config names none. ``spec_path`` is the
    container's OCI runtime spec as JSON when the source carries one. ``devshm_tar``
    is podman's separate archive of /dev/shm contents.
    """

    name: str
    images_dir: Path
    rootfs_layers: tuple = ()
    spec_path: Path | None = None
    devshm_tar: Path | None = None

    def as_dict(self):
        return {
            "name": self.name,
            "images_dir": str(self.images_dir),
            "rootfs_layers": [str(layer) for layer in self.rootfs_layers],
            "spec_path": str(self.spec_path) if self.spec_path else None,
            "devshm_tar": str(self.devshm_tar) if self.devshm_tar else None,
        }

    @classmethod
    def from_dict(cls, data):
        return cls(
            name=data["name"],
            images_dir=Path(data["images_dir"]),
            rootfs_layers=tuple(Path(layer) for layer in data.get("rootfs_layers", ())),
            spec_path=Path(data["spec_path"]) if data.get("spec_path") else None,
            devshm_tar=Path(data["devshm_tar"]) if data.get("devshm_tar") else None,
        )
