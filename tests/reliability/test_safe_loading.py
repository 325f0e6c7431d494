"""Nothing we load can run code, and nothing we run talks to the network.

The source scan walks the syntax tree (so a call split over lines is still seen) for the ways a
file can execute code when loaded: ``pickle.load``/``loads``/``Unpickler`` outside the
allow-list unpickler, ``torch.load`` without ``weights_only=True``, ``numpy.load`` with
``allow_pickle=True`` and ``yaml.load``/``unsafe_load``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.conftest import offline_env

SOURCE = Path(__file__).resolve().parents[2] / "src" / "cimd_pipeline"
SAFE_UNPICKLER = SOURCE / "data" / "readers" / "safe_pickle.py"
PICKLERS = ("pickle", "cPickle", "dill", "joblib")


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def unsafe_loads(source: str, allow_pickle_module: bool = False) -> list[str]:
    """``line: call`` for every unsafe deserialisation call in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        call = f"{owner}.{node.func.attr}"
        if owner in PICKLERS and node.func.attr in ("load", "loads", "Unpickler"):
            unsafe = not allow_pickle_module or owner != "pickle"
        elif call == "torch.load":
            unsafe = not _keyword_is(node, "weights_only", True)
        elif call in ("np.load", "numpy.load"):
            unsafe = _keyword_is(node, "allow_pickle", True)
        elif owner == "yaml":
            unsafe = node.func.attr in ("load", "unsafe_load", "full_load", "load_all")
        else:
            unsafe = False
        if unsafe:
            found.append(f"{node.lineno}: {call}")
    return found


def test_scanner_flags_each_unsafe_call():
    snippet = "\n".join(
        [
            "pickle.load(f)",
            "pickle.loads(\n  data)",
            "torch.load(p)",
            "torch.load(p, weights_only=False)",
            "torch.load(p, map_location='cpu', weights_only=True)",
            "np.load(p, allow_pickle=True)",
            "np.load(p, allow_pickle=False)",
            "yaml.load(text)",
            "yaml.safe_load(text)",
        ]
    )
    assert unsafe_loads(snippet) == [
        "1: pickle.load", "2: pickle.loads", "4: torch.load", "5: torch.load", "7: np.load", "9: yaml.load"
    ]


def test_source_has_no_unsafe_deserialisation():
    problems = []
    for path in sorted(SOURCE.rglob("*.py")):
        for hit in unsafe_loads(path.read_text(), allow_pickle_module=path == SAFE_UNPICKLER):
            problems.append(f"{path.relative_to(SOURCE.parent)}:{hit}")
    hint = "unsafe loading (use weights_only=True / safe_pickle.load_pickle):\n"
    assert not problems, hint + "\n".join(problems)


def test_network_guard_refuses_remote_connections_and_lookups(tmp_path):
    env = offline_env(tmp_path)
    probe = (
        "import socket\n"
        "for call in (lambda: socket.create_connection(('192.0.2.1', 80), timeout=1),\n"
        "             lambda: socket.getaddrinfo('example.org', 443)):\n"
        "    try:\n"
        "        call()\n"
        "    except OSError as exc:\n"
        "        print('refused', exc)\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "socket.create_connection(server.getsockname(), timeout=1).close()\n"
        "print('loopback ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("network access disabled by the test guard") == 2
    assert "loopback ok" in out.stdout


@pytest.mark.slow
def test_default_chain_runs_with_network_disabled(twin_runs):
    for run, log in zip(twin_runs.runs, twin_runs.guard_logs):
        run.check()
        lines = log.read_text().splitlines()
        assert f"{run.process.pid} guard loaded" in lines  # the guard was active in kedro itself
        assert not [line for line in lines if " blocked " in line], lines
