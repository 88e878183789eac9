import pytest

from gateway.app import Service
from gateway.config import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings for a gateway + sandbox on 127.0.0.1, a free port, media on loopback."""
    return Settings(data_dir=tmp_path / "data", port=0, ring_timeout_s=30.0, media_timeout_s=10.0,
                    media_addresses=["127.0.0.1"])


@pytest.fixture
async def service(settings):
    async with Service(settings, sandbox=True) as svc:
        yield svc
