"""The service's shape: what a non-sandbox server loads and serves."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp

from gateway.app import Service

ROOT = Path(__file__).resolve().parent.parent


def test_the_product_does_not_import_the_sandbox():
    code = ("import sys, gateway.app, gateway.cli; "
            "loaded = [m for m in sys.modules if m.startswith('gateway.sandbox')]; "
            "assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


async def test_sandbox_admin_routes_do_not_exist_on_a_real_server(settings):
    real = replace(settings, d360_api_key="key", base_url="http://127.0.0.1:9", app_secret="s3cret")
    async with Service(real) as service, aiohttp.ClientSession(base_url=service.url) as http:
        for method, path in (("POST", "/sandbox/clock"), ("POST", "/sandbox/users/+4915112345678"),
                             ("GET", "/sandbox/users/+4915112345678/calls"), ("POST", "/sandbox/calling/calls")):
            async with http.request(method, path, json={}) as resp:
                assert resp.status == 404, (method, path, resp.status)
        assert service.sandbox is None
