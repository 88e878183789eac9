import os

import pytest

from gateway.app import Service
from gateway.config import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings for a gateway + sandbox on 127.0.0.1, a free port, media on loopback
    (in-process; ``WACALL_TEST_WORKERS=N``: in N media worker processes)."""
    return Settings(data_dir=tmp_path / "data", port=0, ring_timeout_s=30.0, media_timeout_s=10.0,
                    media_addresses=["127.0.0.1"], workers=int(os.environ.get("WACALL_TEST_WORKERS", "0")))


#: The number most tests call; the ``service`` fixture gives it a permanent permission.
TEST_USER = "+4915112345678"


@pytest.fixture
async def service(settings):
    async with Service(settings, sandbox=True) as svc:
        await svc.sandbox.grant(TEST_USER, permanent=True)  # as if granted from the profile
        yield svc


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A redis-server of the tests' own, on a free port of 127.0.0.1, stopped by pid."""
    import shutil
    import socket
    import subprocess
    import time

    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        pytest.skip("redis-server is not installed (apt install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.02)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(params=["native", "python"])
def rtp_core(request, monkeypatch):
    """The lean path (the SIP leg's RTP, stereo.ogg's slots) with their C core (media._rtpcore), then with
    the core switched off, which is what runs where it was not built: the same tests
    hold both."""
    from media import rtpcore

    if request.param == "native":
        from tests.helpers import native_rtp_core

        native_rtp_core()
    else:
        monkeypatch.setattr(rtpcore, "core", None)  # (what rtpcore.enable(False) does)
    return request.param
