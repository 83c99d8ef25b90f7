"""Checks that fail fast, before any trial starts: each raises `config.UsageError` with one line (exit code 2) and
leaves nothing behind (no Ray cluster joined or started, no MLflow run, no results folder).

- the MLflow tracking store answers (an `mlflow server` URI: its /health endpoint; a SQLite file: its folder can be
  written), checked before Ray starts;
- the storage path can be written (a local folder or a URI pyarrow opens), checked before Ray starts;
- the Ray cluster at --address (or RAY_ADDRESS) answers on its port within a bounded wait;
- what one trial asks for can ever be placed on the cluster (`placement`): on a fixed-size cluster an impossible
  request is an error naming what is asked and what exists; on a cluster that may grow (one we joined), a warning and
  a bounded wait for new nodes, then the same error.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from platform.config import UsageError
from platform.datasets import is_uri


def _retry(attempt: Callable[[], str | None], tries: int, pause_s: float) -> str | None:
    """Call `attempt` until it returns None (success), at most `tries` times; the last failure's text otherwise."""
    failure = None
    for index in range(tries):
        failure = attempt()
        if failure is None:
            return None
        if index + 1 < tries:
            time.sleep(pause_s)
    return failure


def check_tracking(uri: str, tries: int = 3, pause_s: float = 1.0, timeout_s: float = 5.0) -> None:
    """The MLflow store answers: a server's /health, or a writable folder for a SQLite file."""
    if uri.startswith(("http://", "https://")):

        def attempt() -> str | None:
            try:
                with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                    return None if response.status == 200 else f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as error:
                return str(getattr(error, "reason", error))

        failure = _retry(attempt, tries, pause_s)
        if failure is not None:
            raise UsageError(
                f"cannot reach the MLflow tracking server at {uri} ({failure}); start it (mlflow server --host ...) "
                "or pass another --tracking-uri"
            )
    elif uri.startswith("sqlite:///"):
        folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///") :]))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UsageError(f"--tracking-uri {uri}: the folder {folder} does not exist or cannot be written")


def check_storage(path: str) -> None:
    """The storage path (Ray results, checkpoints, per-sample stores) can be created and written."""
    probe = f".uda-write-probe-{uuid.uuid4().hex}"
    try:
        if is_uri(path):
            import pyarrow.fs as pafs

            filesystem, root = pafs.FileSystem.from_uri(path)
            filesystem.create_dir(root, recursive=True)
            with filesystem.open_output_stream(f"{root}/{probe}") as stream:
                stream.write(b"ok")
            filesystem.delete_file(f"{root}/{probe}")
        else:
            top = os.path.abspath(path)  # the outermost folder this check creates: removed again afterwards
            while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
                top = os.path.dirname(top)
            created = not os.path.exists(top)
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, probe), "w") as handle:
                handle.write("ok")
            os.remove(os.path.join(path, probe))
            if created:  # nothing left behind: the sweep creates it again when it starts
                shutil.rmtree(top)
    except (OSError, ValueError) as error:
        raise UsageError(f"--storage-path {path} cannot be written ({error}); pass a writable folder or URI") from None


def check_address(address: str | None, tries: int = 5, pause_s: float = 2.0, timeout_s: float = 3.0) -> None:
    """A cluster to join answers on its GCS (host:port) or client (ray://host:port) port, within a bounded wait."""
    if not address or address == "auto":
        return
    target = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)")

    def attempt() -> str | None:
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s):
                return None
        except OSError as error:
            return error.strerror or str(error)

    failure = _retry(attempt, tries, pause_s)
    if failure is not None:
        waited = (tries - 1) * pause_s + tries * timeout_s
        raise UsageError(
            f"cannot reach the Ray cluster at {address} ({failure}, waited up to {waited:.0f} s); check --address "
            "(or RAY_ADDRESS) and that the head is running, or leave it out to start a local cluster"
        )


@dataclass(frozen=True)
class Request:
    """What one trial asks the cluster for: `bundles` placed at once, each on one node ({"CPU": 1.01, "GPU": 1})."""

    bundles: tuple[Mapping[str, float], ...]

    def words(self) -> str:
        """ "1 x {CPU: 0.01} + 3 x {CPU: 1} (3.01 CPU in all)"."""
        groups: list[list] = []
        for bundle in self.bundles:
            text = "{" + ", ".join(f"{key}: {value:g}" for key, value in sorted(bundle.items())) + "}"
            if groups and groups[-1][1] == text:
                groups[-1][0] += 1
            else:
                groups.append([1, text])
        total: dict[str, float] = {}
        for bundle in self.bundles:
            for key, value in bundle.items():
                total[key] = total.get(key, 0.0) + value
        shown = ", ".join(f"{value:g} {key}" for key, value in sorted(total.items()))
        return " + ".join(f"{count} x {text}" for count, text in groups) + f" ({shown} in all)"


def trial_request(
    inline: bool, workers: int, cpus_per_worker: float, gpus_per_worker: float, driver_cpus: float
) -> Request:
    """Inline: one process with the worker's resources plus the driver's token; train: the token, then one bundle per
    Ray Train worker (placed together, possibly on different nodes)."""
    worker = {"CPU": float(cpus_per_worker), **({"GPU": float(gpus_per_worker)} if gpus_per_worker else {})}
    if inline:
        return Request(({**worker, "CPU": worker["CPU"] + driver_cpus},))
    return Request(({"CPU": driver_cpus},) + tuple(dict(worker) for _ in range(workers)))


def fits(request: Request, nodes: Sequence[Mapping[str, float]]) -> bool:
    """Whether the bundles can be packed onto the nodes' total resources (first fit, largest bundles first)."""
    free = [dict(node) for node in nodes]
    for bundle in sorted(request.bundles, key=lambda b: -sum(b.values())):
        for node in free:
            if all(node.get(key, 0.0) + 1e-9 >= value for key, value in bundle.items()):
                for key, value in bundle.items():
                    node[key] = node.get(key, 0.0) - value
                break
        else:
            return False
    return True


def placement(request: Request, nodes: Sequence[Mapping[str, float]], may_grow: bool) -> str:
    """ "ok", "wait" (it does not fit now, but the cluster may add nodes) or "never" (a fixed cluster cannot)."""
    if fits(request, nodes):
        return "ok"
    return "wait" if may_grow else "never"


def cluster_words(nodes: Sequence[Mapping[str, float]]) -> str:
    parts = [", ".join(f"{node.get(key, 0):g} {key}" for key in ("CPU", "GPU") if key in node) for node in nodes]
    return f"{len(nodes)} node(s): " + "; ".join(parts)


def check_placement(
    request: Request,
    nodes: Callable[[], Sequence[Mapping[str, float]]],
    may_grow: bool,
    wait_s: float = 120.0,
    pause_s: float = 5.0,
    warn: Callable[[str], None] = print,
) -> None:
    """UsageError if `request` can never be placed; on a cluster that may grow, warn and wait up to `wait_s`."""
    verdict = placement(request, nodes(), may_grow)
    if verdict == "ok":
        return
    message = f"a trial asks for {request.words()} and the cluster has {cluster_words(nodes())}"
    if verdict == "wait":
        warn(f"warning: {message}; waiting up to {wait_s:.0f} s for the autoscaler to add nodes")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(pause_s)
            if fits(request, nodes()):
                return
    raise UsageError(f"{message}: lower --workers, --cpus-per-worker or --gpus-per-worker, or add nodes")


def check_decoded_cache() -> None:
    """UDA_DECODED_CACHE_MB, if set, is a number of megabytes (platform.stream.DecodedRows)."""
    from platform import stream

    try:
        stream.cache_budget()
    except ValueError as error:
        raise UsageError(str(error)) from None
