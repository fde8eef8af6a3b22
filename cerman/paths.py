"""Locations of cerman's config, runtime and state directories.

Each comes from an environment variable, so several instances can run side by side;
unset variables fall back to the defaults an installed service uses.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

RUN_DIR_DEFAULT = "/run/cerman"
STATE_DIR_DEFAULT = "/var/lib/cerman"


def _env_path(name):
    """Return the variable's value, or None when unset, empty or a literal circus reference."""
    value = os.environ.get(name, "")
    # circus leaves "$(circus.env.NAME)" as literal text when NAME is unset.
    if not value or value.startswith("$("):
        return None
    return Path(value)


@dataclass(frozen=True)
class Paths:
    config_dir: Path
    run_dir: Path
    state_dir: Path

    @property
    def client_socket(self):
        return self.run_dir / "cerman.sock"

    @property
    def client_endpoint(self):
        return f"ipc://{self.client_socket}"

    @property
    def worker_endpoint(self):
        """Endpoint where the router's worker-facing ROUTER socket listens."""
        return f"ipc://{self.run_dir / 'workers.sock'}"

    @property
    def circus_endpoint(self):
        return f"ipc://{self.run_dir / 'circus.sock'}"

    def ns_dir(self, checkpoint):
        """Directory holding the pinned namespaces of one checkpoint."""
        return self.run_dir / "ns" / checkpoint

    def checkpoint_state_dir(self, checkpoint):
        return self.state_dir / "checkpoints" / checkpoint

    def as_env(self):
        """Return the variables that give a child process the same paths."""
        return {
            "CERMAN_CONFIG_DIR": str(self.config_dir),
            "CERMAN_RUN_DIR": str(self.run_dir),
            "CERMAN_STATE_DIR": str(self.state_dir),
        }


def default_config_dir():
    """Return ``configs/`` next to the circus.ini that started this process tree.

    The router runs under circusd, whose command line names the ini file; outside
    circus (or when that fails) the current directory's ``configs/`` is used.
    """
    try:
        for process in psutil.Process().parents():
            cmdline = process.cmdline()
            if not cmdline or "circusd" not in " ".join(cmdline[:2]):
                continue
            for argument in cmdline[1:]:
                if argument.endswith(".ini"):
                    ini = Path(process.cwd(), argument)
                    return (ini.parent / "configs").resolve()
    except (psutil.Error, OSError):
        pass
    return Path.cwd() / "configs"


def resolve():
    """Return the paths in force for this process, from the environment or defaults."""
    config_dir = _env_path("CERMAN_CONFIG_DIR") or default_config_dir()
    run_dir = _env_path("CERMAN_RUN_DIR") or Path(RUN_DIR_DEFAULT)
    state_dir = _env_path("CERMAN_STATE_DIR") or Path(STATE_DIR_DEFAULT)
    return Paths(config_dir=config_dir.absolute(), run_dir=run_dir.absolute(),
                 state_dir=state_dir.absolute())
