import pytest

from tests.framework.guest import tiny_guest as build_tiny_guest


@pytest.fixture(scope="session")
def tiny_guest():
    return build_tiny_guest()
