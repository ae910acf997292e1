"""A local ``tensorboard`` on a loopback port and a headless Chromium to look at the tab (tests, docs screenshots).

Example::

    with tensorboard_server("lightning_logs") as base:
        html = chromium("--dump-dom", base + "/data/plugin_entry.html?name=optdiag")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

__all__ = ["free_port", "get", "tensorboard_server", "find_chromium", "chromium"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> Any:
    """The body at ``url``: parsed when it is JSON, else bytes. Raises ``urllib.error.HTTPError`` on 4xx/5xx."""
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
        return json.loads(body) if response.headers.get_content_type() == "application/json" else body


@contextlib.contextmanager
def tensorboard_server(logdir: str | os.PathLike[str], *, runs: int = 1, timeout: float = 90.0) -> Iterator[str]:
    """Run ``tensorboard --logdir logdir`` on a free loopback port until the block ends; yields its base URL.

    Waits until the optdiag tab lists at least ``runs`` runs (TensorBoard loads a logdir in the background), and
    kills the server when the block ends, whatever happens in it.

    Raises:
        RuntimeError: when the server exits or has not listed the runs within ``timeout`` seconds (with its log).
    """
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", os.fspath(logdir), "--host", "127.0.0.1",
             "--port", str(port), "--reload_interval", "1"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(urllib.error.URLError, ConnectionError):
                    if len(get(base + "/data/plugin/optdiag/runs")["runs"]) >= runs:
                        break
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"tensorboard did not serve {runs} run(s) of {logdir}: {log.read()[-3000:]}")
                time.sleep(0.5)
            yield base
        finally:
            server.kill()
            server.wait(timeout=30)


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def chromium(*args: str, executable: str | None = None, timeout: float = 120.0) -> str:
    """Run headless Chromium with ``args`` (e.g. ``--dump-dom URL``) and return what it printed.

    Raises:
        FileNotFoundError: when there is no Chromium on PATH.
        RuntimeError: when Chromium exits with an error.
    """
    executable = executable or find_chromium()
    if executable is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    result = subprocess.run([executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited with {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout
