"""The team server's address, reachability check and race-free experiment creation."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cimd_pipeline.errors import ConfigError
from cimd_pipeline.tracking_server import (
    check_reachable,
    ensure_experiment,
    is_remote,
    required_env,
)


def test_required_env_names_the_variable(monkeypatch):
    monkeypatch.setenv("CIMD_TEST_URI", "http://team:5000")
    assert required_env("CIMD_TEST_URI") == "http://team:5000"
    for value in (None, "", "  "):
        if value is None:
            monkeypatch.delenv("CIMD_TEST_URI")
        else:
            monkeypatch.setenv("CIMD_TEST_URI", value)
        with pytest.raises(ConfigError, match="environment variable CIMD_TEST_URI is not set: conf/team"):
            required_env("CIMD_TEST_URI")


def test_only_http_addresses_are_remote():
    assert is_remote("http://a:5000") and is_remote("https://a")
    assert not is_remote("sqlite:///x/mlflow.db") and not is_remote(None) and not is_remote("mlruns")


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # http.server's method name
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_unreachable_server_is_named(health_server, monkeypatch):
    check_reachable(health_server + "/")  # answers: nothing raised
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(ConfigError, match=f"MLflow tracking server {closed} is unreachable"):
        check_reachable(closed, timeout=2)
    monkeypatch.setattr(_Health, "status", 503)
    with pytest.raises(ConfigError, match="is unreachable .*503"):
        check_reachable(health_server, timeout=2)


def test_experiment_created_by_another_process_is_used(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    created = ensure_experiment(client, "team", str(tmp_path / "a"), {"k": "v"})
    assert client.get_experiment(created).tags["k"] == "v"
    assert ensure_experiment(client, "team") == created

    class LateClient:
        """Sees no experiment, then loses the race to create it."""

        calls = 0

        def get_experiment_by_name(self, name):
            LateClient.calls += 1
            return None if LateClient.calls == 1 else client.get_experiment_by_name(name)

        def create_experiment(self, name, **kwargs):
            return client.create_experiment(name, **kwargs)  # "already exists"

    assert ensure_experiment(LateClient(), "team") == created

    class BrokenClient(LateClient):
        def create_experiment(self, name, **kwargs):
            raise MlflowException("permission denied", error_code="PERMISSION_DENIED")

    LateClient.calls = 0
    with pytest.raises(MlflowException, match="permission denied"):
        ensure_experiment(BrokenClient(), "team")
