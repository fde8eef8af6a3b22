"""Set-up shared by the long-running processes circus starts (router and workers)."""

import logging
import os
import signal


def configure_logging(label):
    """Log to stderr (relayed by circus) with ``label`` and the pid on every line.

    ``force`` replaces the handler that circus' client module installs on import.
    """
    logging.basicConfig(force=True, level=os.environ.get("CERMAN_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {label}[%(process)d] %(levelname)s "
                               "%(name)s: %(message)s")


def stop_on_signals(service):
    """Make SIGTERM and SIGINT clear ``service.running``; the main loop then stops."""

    def stop(signum, frame):
        service.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
