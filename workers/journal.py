"""The lease journal: what a worker has handed out, kept on disk across crashes.

A worker writes the journal *before* it replies to a ``get`` and removes an entry only
*after* the namespace's pin is gone, so a restarted worker never treats a leased
namespace as free: every pinned namespace that is not in the journal was never handed
out. The file is replaced atomically (write, rename). It is not fsynced: the journal
must survive a crash of the worker process, which the page cache does, while a crash
of the machine also ends every pin it describes (pins are mounts), so the adoption
that follows drops its entries anyway.
"""

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = 1


class Journal:
    def __init__(self, path):
        self.path = Path(path)
        self.leases = {}
        self.checkpoint_refs = 0

    def load(self):
        """Read the journal; a missing file is an empty journal."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return self
        except (OSError, ValueError) as error:
            # Keep the unreadable file for inspection; leases in it are lost, and their
            # pins are released as unknown on adoption rather than handed out again.
            broken = self.path.with_suffix(".broken")
            log.error("lease journal %s is unreadable (%s); moved to %s", self.path, error, broken)
            os.replace(self.path, broken)
            return self
        self.leases = dict(data.get("leases", {}))
        self.checkpoint_refs = int(data.get("checkpoint_refs", 0))
        return self

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        data = {"version": VERSION, "leases": self.leases, "checkpoint_refs": self.checkpoint_refs}
        with open(temporary, "w") as file:
            json.dump(data, file, indent=1, sort_keys=True)
        os.replace(temporary, self.path)

    def add_lease(self, lease_id, entry):
        self.leases[lease_id] = entry
        self.save()

    def remove_lease(self, lease_id):
        self.leases.pop(lease_id, None)
        self.save()

    def leased_pins(self):
        return {entry["pin"] for entry in self.leases.values()}
