"""Screenshots of the MLflow UI as a researcher sees a sweep: the runs table in "Model training" mode (children named
by their swept values, metric columns), the parent run's page (its description is the sweep's report), the compare
view of the children and a sensitivity heatmap from the parent's artifacts. Not part of CI.

    python benchmarks/ui_screenshots.py --tracking-uri sqlite:///$PWD/mlflow.db --sweep SWEEP [--heatmap-sweep S2]
                                        [--out docs/screenshots]
    python benchmarks/ui_screenshots.py --server http://127.0.0.1:5000 --sweep SWEEP

With --tracking-uri it starts its own `mlflow server` on a free port (and stops only that process); with --server it
uses a running one. It drives headless Chromium through chromedriver's WebDriver protocol (plain HTTP, no Selenium):
Debian's packages, `apt-get install -y chromium chromium-driver`.

The runs table's column choice and expanded rows are UI state that MLflow keeps in the browser's localStorage, not in
the URL; the script sets them there (metric and parameter columns, the parent row expanded) the way the column picker
would, then reloads, so the first screenshot shows what a user gets after two clicks.
"""

from __future__ import annotations

import _bootstrap  # must come first: see _bootstrap.py

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from mlflow.tracking import MlflowClient

from platform import report, tracking

INSTALL = "apt-get install -y chromium chromium-driver  (Debian/Ubuntu; then run this script again)"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_http(url: str, seconds: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            pass
        if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer within {seconds:.0f} s")
        time.sleep(0.5)


class WebDriver:
    """The few WebDriver commands a screenshot needs, spoken to chromedriver over HTTP."""

    def __init__(self, width: int, height: int):
        self.port = free_port()
        self.process = subprocess.Popen(
            ["chromedriver", f"--port={self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{self.port}/status", 30, self.process)
        options = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        options.append(f"--window-size={width},{height}")
        capabilities = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"args": options}}}}
        self.session = self._call("POST", "/session", capabilities)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["value"]

    def get(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, text: str, seconds: float = 60) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if (
                self.js(
                    "return document.body ? document.body.innerText : ''",
                ).find(text)
                >= 0
            ):
                return True
            time.sleep(1)
        return False

    def drag(self, x: float, y: float, dx: float) -> None:
        """Press at (x, y), move by dx, release: a column resize."""
        pointer = {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}}
        pointer["actions"] = [
            {"type": "pointerMove", "duration": 0, "x": int(x), "y": int(y)},
            {"type": "pointerDown", "button": 0},
            {"type": "pointerMove", "duration": 300, "x": int(x + dx), "y": int(y)},
            {"type": "pointerUp", "button": 0},
        ]
        self._call("POST", f"/session/{self.session}/actions", {"actions": [pointer]})

    def move(self, x: float, y: float) -> None:
        """Move the pointer without pressing (a hover elsewhere, so that no tooltip stays)."""
        pointer = {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}}
        pointer["actions"] = [{"type": "pointerMove", "duration": 0, "x": int(x), "y": int(y)}]
        self._call("POST", f"/session/{self.session}/actions", {"actions": [pointer]})

    def screenshot(self, path: str) -> None:
        png = base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot"))
        with open(path, "wb") as out:
            out.write(png)
        print(f"wrote {path}")

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


# MLflow 3.17's runs table keeps its UI state in localStorage under a key naming the experiment; the script writes
# the column choice and expanded rows there (the column keys are the table's own: "metrics.`name`", "params.`name`").
UI_STATE = """
const [experimentId, columns, expanded] = arguments;
const key = `MLflowLocalStorage-1.1-ExperimentPage-["${experimentId}"]-ReactComponentState`;
const state = JSON.parse(localStorage.getItem(key) || '{}');
state.selectedColumns = ['attributes.`Dataset`', ...columns];
state.runsExpanded = Object.assign(state.runsExpanded || {}, expanded);
state.columnWidths = Object.assign(state.columnWidths || {}, {'attributes.`Run Name`': 330});
localStorage.setItem(key, JSON.stringify(state));
// the assistant side panel opens by itself on a first visit
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
return key;
"""


SCROLL_TO = """
const text = arguments[0];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
while (walker.nextNode()) {
  if (walker.currentNode.textContent.trim().startsWith(text)) {
    walker.currentNode.parentElement.scrollIntoView({block: 'start'});
    return true;
  }
}
return false;
"""

HEADER_EDGE = """
const cell = document.querySelector(`.ag-header-cell[col-id="${arguments[0]}"]`);
if (!cell) { return null; }
const box = cell.getBoundingClientRect();
return [box.right, box.top + box.height / 2];
"""

CLOSE_ASSISTANT = """
const button = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
if (button) { button.click(); }
return Boolean(button);
"""

CLICK_ALL = """
let clicked = 0;
for (const element of document.querySelectorAll('label, button, span')) {
  if (element.textContent.trim() === arguments[0] && element.children.length === 0) { element.click(); clicked++; }
}
return clicked;
"""

CLICK_LABEL = """
const text = arguments[0];
for (const element of document.querySelectorAll('label, button, span')) {
  if (element.textContent.trim() === text) { element.click(); return true; }
}
return false;
"""


def shoot(base: str, uri: str, sweep: str, heatmap_sweep: str | None, out: str, width: int, height: int) -> None:
    client = MlflowClient(uri)
    parent = report.find_sweep(client, sweep)
    experiment_id = client.get_run(parent.run_id).info.experiment_id
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    swept = {key: None for c in children for key in json.loads(c.data.tags.get(tracking.SWEPT_TAG, "{}"))}
    hyperparams = list(swept)
    columns = [f"metrics.`{m}`" for m in ("val_target/miou", "val_target/best_miou")]
    columns += [f"params.`{p}`" for p in hyperparams] + ["params.`seed`"]
    os.makedirs(out, exist_ok=True)
    driver = WebDriver(width, height)
    try:
        driver.get(f"{base}/health")  # same origin: the UI state goes in before the UI starts
        driver.js(UI_STATE, experiment_id, columns, {parent.run_id: True})
        table = tracking.ui_link(base, experiment_id)
        for _ in range(3):  # a first visit to a fresh server may land on the home page: open the link again
            driver.get(table)
            if driver.wait_for(children[0].info.run_name if children else sweep, 60):
                break
        driver.js(CLOSE_ASSISTANT)
        time.sleep(2)
        edge = driver.js(HEADER_EDGE, "attributes.`Run Name`")
        if edge:  # widen the Run Name column (its width is not kept in the UI state), as a user drags it
            driver.drag(edge[0] - 2, edge[1], 230)
            driver.move(edge[0] + 400, edge[1] + 600)  # and away, so that no tooltip covers the table
        time.sleep(2)
        driver.screenshot(os.path.join(out, "runs_table.png"))

        driver.get(tracking.ui_link(base, experiment_id, parent.run_id))
        driver.wait_for("Configurations", 90)
        driver.js(CLOSE_ASSISTANT)
        driver.js(CLICK_LABEL, "Show more")
        driver.js(SCROLL_TO, "Configurations")
        time.sleep(2)
        driver.screenshot(os.path.join(out, "parent_run.png"))

        ids = urllib.request.quote(json.dumps([c.info.run_id for c in children]))
        experiments = urllib.request.quote(json.dumps([experiment_id]))
        driver.get(f"{base}/#/compare-runs?runs={ids}&experiments={experiments}&workflowType=machine_learning")
        driver.wait_for("Parameters", 90)
        driver.js(CLOSE_ASSISTANT)
        driver.js(CLICK_ALL, "Show diff only")  # parameters and metrics that differ between the runs
        driver.js(SCROLL_TO, "Run details")
        time.sleep(3)
        driver.screenshot(os.path.join(out, "compare_runs.png"))

        if heatmap_sweep:
            heat = report.find_sweep(client, heatmap_sweep)
            heat_experiment = client.get_run(heat.run_id).info.experiment_id
            plots = [
                a.path for a in client.list_artifacts(heat.run_id, "report/plots") if a.path.endswith("heatmap.png")
            ]
            if plots:
                link = tracking.ui_link(base, heat_experiment, heat.run_id).replace("?", f"/artifacts/{plots[0]}?", 1)
                driver.get(link)
                driver.wait_for("heatmap", 60)
                time.sleep(4)
                driver.screenshot(os.path.join(out, "sensitivity_heatmap.png"))
            else:
                print(f"sweep {heatmap_sweep} has no heatmap among its report's plots")
    finally:
        driver.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tracking-uri", help="a store to serve with a fresh `mlflow server` (sqlite:///...)")
    source.add_argument("--server", help="a running MLflow server, http://HOST:PORT")
    parser.add_argument("--sweep", required=True, help="the sweep (name or parent run id) whose runs to show")
    parser.add_argument("--heatmap-sweep", help="a 2-D grid sweep whose report has a sensitivity heatmap")
    parser.add_argument("--out", default=os.path.join(_bootstrap.ROOT, "docs", "screenshots"))
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not installed; install it with: {INSTALL}", file=sys.stderr)
            return 2
    server = None
    try:
        if args.server:
            base = uri = args.server.rstrip("/")
        else:
            port = free_port()
            artifacts = tempfile.mkdtemp(prefix="uda-screens-")
            command = [tracking.mlflow_script(), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
            command += ["--backend-store-uri", args.tracking_uri, "--artifacts-destination", artifacts]
            server = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            base = uri = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health", 120, server)
        shoot(base, uri, args.sweep, args.heatmap_sweep, args.out, args.width, args.height)
    finally:
        if server is not None:  # only the server this script started (its own process group)
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
