"""Hooks circus calls for the router watcher.

circus resolves hook names, and so imports this module, while it loads circus.ini and
before it binds its control socket under the runtime directory. That socket cannot be
bound in a directory that does not exist yet (``/run`` is emptied at boot), so the
import creates the runtime and state directories.
"""

import logging

from cerman import paths

log = logging.getLogger(__name__)


def create_directories():
    resolved = paths.resolve()
    for directory in (resolved.run_dir, resolved.state_dir):
        directory.mkdir(parents=True, exist_ok=True)
    return resolved


create_directories()


def before_start(watcher, arbiter, hook_name, **kwargs):
    """Create the directories again in case they were removed while circusd ran."""
    create_directories()
    return True
