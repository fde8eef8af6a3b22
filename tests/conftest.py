import os

import pytest

from workers.builder_client import BuilderProcess

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


@pytest.fixture(scope="module")
def builder():
    """A builder process shared by the tests of one module."""
    process = BuilderProcess()
    process.start()
    try:
        yield process
    finally:
        process.stop()
