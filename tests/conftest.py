import os

import pytest

from service import CermanService


def pytest_configure(config):
    if os.geteuid() != 0:
        raise pytest.UsageError("cerman's tests use real namespaces and mounts: run them as root")


@pytest.fixture
def cerman(tmp_path):
    """A running cerman (circusd + router) on temporary directories, removed afterwards."""
    service = CermanService(tmp_path / "cerman")
    try:
        yield service
    finally:
        service.cleanup()
