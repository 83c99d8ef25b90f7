"""Helpers for tests that start real services: bounded readiness waits, the processes a test started, and a local
S3-compatible server (moto's, spoken to over HTTP by pyarrow's real S3 client, as it would speak to AWS or MinIO)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(ready: Callable[[], object], what: str, timeout_s: float = 180, pause_s: float = 1.0) -> None:
    """Bounded readiness wait: `ready()` until it is truthy or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"{what} was not ready after {timeout_s:.0f} s"
        time.sleep(pause_s)


def descendants(pid: int) -> list:
    """The processes a process started, recursively (psutil objects; empty if it is gone)."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


AWS_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@contextlib.contextmanager
def moto_server() -> Iterator[tuple[str, dict[str, str]]]:
    """A local S3-compatible server for the block: (endpoint, the AWS environment variables that point clients at
    it). The variables are also set in this process for the block; the server is stopped afterwards."""
    port = free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in AWS_KEYS}
    os.environ.update(env)
    try:

        def up() -> bool:
            assert server.poll() is None, "moto_server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(up, f"moto_server on port {port}", timeout_s=60, pause_s=0.2)
        yield endpoint, env
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
