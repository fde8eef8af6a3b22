"""The lease journal: what a worker has handed out, kept on disk across crashes.

Layout, under ``$CERMAN_STATE_DIR/journal/<checkpoint>/``: one file per lease,
``leases/<lease id>.json``, and ``checkpoint-refs`` with the number of ``checkpoint
get`` references. A lease costs one small file written and renamed, and a ``put`` one
unlink, whatever the number of leases outstanding.

A worker writes a lease *before* it replies to a ``get`` and removes it only *after*
the namespace's pin is gone, so a restarted worker never treats a leased namespace as
free: every pinned namespace that is not in the journal was never handed out. Files are
replaced atomically (write, rename) but not fsynced. The journal must survive a crash
of the worker process, which the page cache does. A crash of the machine also ends
every pin it describes (pins are mounts), so the adoption that follows drops its
entries anyway.
"""

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LEASE_SUFFIX = ".json"


def _write_atomically(path, text):
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class Journal:
    def __init__(self, directory):
        self.directory = Path(directory)
        self.lease_dir = self.directory / "leases"
        self.refs_path = self.directory / "checkpoint-refs"
        self.leases = {}
        self.checkpoint_refs = 0

    def load(self):
        """Read the journal; a missing directory is an empty journal."""
        self.lease_dir.mkdir(parents=True, exist_ok=True)
        for path in self.lease_dir.iterdir():
            if path.name.startswith("."):
                # A write interrupted before its rename: the get was never replied to.
                path.unlink()
                continue
            try:
                self.leases[path.name[:-len(LEASE_SUFFIX)]] = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                # Renames are atomic, so this file was damaged from outside. Its pin is
                # unknown and may be adopted as free, so log an error and keep the file.
                log.error("lease journal entry %s is unreadable (%s); the namespace it "
                          "leased may be handed out again", path, error)
        try:
            self.checkpoint_refs = int(self.refs_path.read_text())
        except FileNotFoundError:
            self.checkpoint_refs = 0
        except (OSError, ValueError) as error:
            log.error("checkpoint reference count %s is unreadable (%s); starting from 0",
                      self.refs_path, error)
            self.checkpoint_refs = 0
        return self

    def save(self):
        """Write the checkpoint reference count."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.refs_path, f"{self.checkpoint_refs}\n")

    def add_lease(self, lease_id, entry):
        self.lease_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.lease_dir / f"{lease_id}{LEASE_SUFFIX}",
                          json.dumps(entry, sort_keys=True))
        self.leases[lease_id] = entry

    def remove_lease(self, lease_id):
        try:
            (self.lease_dir / f"{lease_id}{LEASE_SUFFIX}").unlink()
        except FileNotFoundError:
            pass
        self.leases.pop(lease_id, None)

    def leased_pins(self):
        return {entry["pin"] for entry in self.leases.values()}
