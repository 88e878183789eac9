import pytest

from gateway.app import Service
from gateway.config import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings for a gateway + sandbox on 127.0.0.1, a free port, media on loopback."""
    return Settings(data_dir=tmp_path / "data", port=0, ring_timeout_s=30.0, media_timeout_s=10.0,
                    media_addresses=["127.0.0.1"])


#: The number most tests call; the ``service`` fixture gives it a permanent permission.
TEST_USER = "+4915112345678"


@pytest.fixture
async def service(settings):
    async with Service(settings, sandbox=True) as svc:
        await svc.sandbox.grant(TEST_USER, permanent=True)  # as if granted from the profile
        yield svc
