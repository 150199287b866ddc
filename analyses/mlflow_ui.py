"""An ablation in the MLflow UI, checked in headless Chromium, with a screenshot.

    python -m analyses.mlflow_ui --parent PARENT_RUN_ID [--tracking-uri URI] [--out reports/x.png]

Starts `daro-lab ui` on a free local port against the store, opens the ablation's experiment in
headless Chromium (Playwright driving the system's `chromium`), expands the parent run and returns
the run names the page then lists: the ablation's child runs, one per arm and seed.
Needs `pip install playwright` (the `ui-check` extra) and Debian's `chromium` (no browser download).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = [  # no sandbox as root; no background connections, which this machine's network refuses
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class UICheckError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """$DARO_LAB_CHROMIUM, or chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("DARO_LAB_CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(tracking_uri: str, timeout: float = 90):
    """`daro-lab ui` on a free port for the duration of the block; yields its base URL."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "daro_lab.cli", "ui", "--port", str(port), "--tracking-uri", tracking_uri],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise UICheckError(f"daro-lab ui exited: {proc.stdout.read().decode()[-2000:]}") from None
                if time.time() > deadline:
                    raise UICheckError(f"daro-lab ui did not answer on {base} within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)  # the command stops the server and its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def ablation_page(
    tracking_uri: str,
    parent_run_id: str,
    screenshot: str | Path | None = None,
    chromium: str | None = None,
    timeout_s: float = 60,
) -> list[str]:
    """Run names the MLflow UI lists under the ablation's parent run, once the parent is expanded."""
    from playwright.sync_api import sync_playwright

    from daro_lab.tracking import RunStore

    store = RunStore(tracking_uri)
    parent = store.run(parent_run_id, what="ablation parent run")
    children = store.children(parent_run_id)
    exe = chromium or find_chromium()
    if exe is None:
        raise UICheckError("no chromium found: apt-get install chromium, or set DARO_LAB_CHROMIUM")
    ms = int(timeout_s * 1000)
    with serve(tracking_uri) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1800, "height": 260 + 36 * (len(children) + 1)})
            page.goto(f"{base}/#/experiments/{parent.info.experiment_id}/runs")
            page.wait_for_function("() => /[1-9][0-9]* matching runs/.test(document.body.innerText)", timeout=ms)
            row = page.locator(".ag-row", has=page.get_by_text(parent.info.run_name, exact=True))
            row.locator("button[data-component-id*='runnamecellrenderer']").click()  # the +: show the children
            if children:
                page.get_by_text(children[0].info.run_name, exact=True).wait_for(timeout=ms)
            close = page.locator("button[data-component-id='mlflow.assistant.chat_panel.close']")
            if close.count():  # a cleaner picture: close the assistant side panel
                close.first.click()
            names = [n.strip() for n in page.locator(".ag-row [col-id='attributes.`Run Name`'] a").all_inner_texts()]
            if screenshot:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    return [n for n in names if n and n != parent.info.run_name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", required=True, help="the ablation's parent run id")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    ap.add_argument("--out", default=None, help="PNG screenshot of the page")
    a = ap.parse_args(argv)
    from daro_lab.tracking import RunStore

    store = RunStore(a.tracking_uri)
    names = ablation_page(store.uri, a.parent, a.out)
    want = {r.info.run_name for r in store.children(a.parent)}
    missing = sorted(want - set(names))
    print(
        f"the MLflow UI lists {len(set(names) & want)} of the {len(want)} child runs"
        + (f"; missing: {', '.join(missing)}" if missing else "")
        + (f"; screenshot {a.out}" if a.out else "")
    )
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
