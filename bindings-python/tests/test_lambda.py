"""The Lambda handlers of examples/lambda, called as plain functions / processes with the
event shape Lambda delivers, N at once, joined through a standalone ``fmi rendezvous``."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

LAMBDA = REPO / "examples" / "lambda"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def rendezvous(fmi_bin: Path):
    """``host:port`` of a fresh ``fmi rendezvous`` on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"127.0.0.1:{port}"
    server = subprocess.Popen([str(fmi_bin), "rendezvous", "--listen", addr],
                              stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"fmi rendezvous did not listen on {addr}"
                time.sleep(0.05)
        yield addr
    finally:
        server.kill()
        server.wait()


def test_handler_as_a_plain_function() -> None:
    handler = load("fmi_lambda_handler", LAMBDA / "python" / "handler.py")
    response = handler.handler({"rank": 0, "size": 1, "job": "solo", "values": [1.5, -2]})
    assert response == {"rank": 0, "size": 1, "job": "solo", "sum": [1.5, -2.0]}


def test_driver_fans_out_four_python_invocations(rendezvous: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(LAMBDA / "invoke.py"), "--local", "--ranks", "4",
         "--rendezvous", rendezvous],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    responses = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["rank"] for r in responses] == [0, 1, 2, 3]
    assert all(r["sum"] == [10.0] and r["size"] == 4 for r in responses)
    assert len({r["job"] for r in responses}) == 1


def test_python_and_rust_handlers_join_one_job(rendezvous: str, fmi_bin: Path) -> None:
    rust = Path(os.environ.get("FMI_LAMBDA_RUST_HANDLER", fmi_bin.with_name("fmi-lambda-handler")))
    if not rust.is_file():
        pytest.skip(f"{rust} is not built (cargo build -p fmi-lambda-example)")
    invoke = load("fmi_lambda_invoke", LAMBDA / "invoke.py")
    events = invoke.events(4, rendezvous, None, None)
    for e in events:
        e["values"] = [e["rank"] + 1.0, 2.0]
    python = [sys.executable, str(LAMBDA / "python" / "handler.py")]
    procs = [
        subprocess.Popen([*(python if e["rank"] % 2 == 0 else [str(rust)]), json.dumps(e)],
                         stdout=subprocess.PIPE, text=True)
        for e in events
    ]
    for rank, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        response = json.loads(out)
        assert response["rank"] == rank and response["sum"] == [10.0, 8.0]
