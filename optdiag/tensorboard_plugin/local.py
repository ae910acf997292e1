"""A local ``tensorboard`` on a loopback port and a headless Chromium to look at the tab (tests, docs screenshots).

:func:`chromium` runs the browser once (``--dump-dom``, ``--screenshot``); :class:`Page` keeps a page open and
evaluates JavaScript in it while it runs (Chrome's DevTools protocol over ``--remote-debugging-pipe``), to watch the
tab follow a run that changes.

Example::

    with tensorboard_server("lightning_logs") as base:
        html = chromium("--dump-dom", base + "/data/plugin_entry.html?name=optdiag")
        with Page(base + "/data/plugin_entry.html?name=optdiag") as page:
            page.wait_for("document.querySelectorAll('article.verdict').length > 0")
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

__all__ = ["free_port", "get", "tensorboard_server", "find_chromium", "chromium", "Page"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now.

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> Any:
    """The body at ``url``: parsed when it is JSON, else bytes. Raises ``urllib.error.HTTPError`` on 4xx/5xx.

    Example::

        get(base + "/data/plugin/optdiag/runs")  # {"runs": [{"run": "version_0", "optdiag": True}]}
    """
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
        return json.loads(body) if response.headers.get_content_type() == "application/json" else body


@contextlib.contextmanager
def tensorboard_server(logdir: str | os.PathLike[str], *, runs: int = 1, timeout: float = 90.0) -> Iterator[str]:
    """Run ``tensorboard --logdir logdir`` on a free loopback port until the block ends; yields its base URL.

    Waits until the optdiag tab lists at least ``runs`` runs (TensorBoard loads a logdir in the background), and
    kills the server when the block ends, whatever happens in it.

    Example::

        with tensorboard_server("lightning_logs") as base:
            print(base)  # http://127.0.0.1:41923

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
    """The Chromium (or Chrome) executable on PATH, or None.

    Example::

        find_chromium()  # '/usr/bin/chromium'
    """
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def chromium(*args: str, executable: str | None = None, timeout: float = 120.0) -> str:
    """Run headless Chromium with ``args`` (e.g. ``--dump-dom URL``) and return what it printed.

    Raises:
        FileNotFoundError: when there is no Chromium on PATH.
        RuntimeError: when Chromium exits with an error.

    Example::

        chromium("--window-size=1400,1000", "--screenshot=tab.png", base + "/#optdiag")
    """
    executable = executable or find_chromium()
    if executable is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    result = subprocess.run([executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited with {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


_HEADLESS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars")


class Page:
    """One page open in headless Chromium, driven through the DevTools protocol on a pipe (no extra package).

    Chromium reads commands on its file descriptor 3 and answers on 4, one JSON message per NUL-terminated chunk.

    Args:
        url: the page to open.
        executable: the browser (default :func:`find_chromium`).

    Raises:
        FileNotFoundError: when there is no Chromium on PATH.

    Example::

        with Page(base + "/data/plugin_entry.html?name=optdiag") as page:
            page.wait_for("document.querySelectorAll('article.verdict').length")  # 3
    """

    def __init__(self, url: str, *, executable: str | None = None) -> None:
        executable = executable or find_chromium()
        if executable is None:
            raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
        to_browser, self._send = os.pipe()
        self._receive, from_browser = os.pipe()

        def as_fds_3_and_4() -> None:  # in the child, before exec: its ends of the pipes become 3 and 4
            read, write = os.dup(to_browser), os.dup(from_browser)  # copies first: a dup2 may overwrite an original
            os.dup2(read, 3)
            os.dup2(write, 4)

        self._process = subprocess.Popen([executable, *_HEADLESS, "--remote-debugging-pipe", "about:blank"],
                                          preexec_fn=as_fds_3_and_4, pass_fds=(3, 4),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._id = 0
        try:
            target = self._call("Target.createTarget", url=url)["targetId"]
            self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, session: str | None = None, **params: Any) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._send, json.dumps(message).encode() + b"\0")
        while True:  # skip events until the answer to this call
            while b"\0" not in self._buffer:
                chunk = os.read(self._receive, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values)."""
        result = self._call("Runtime.evaluate", self._session, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate ``expression`` every 0.2 s until it is truthy; return that value.

        Raises:
            TimeoutError: when it is still falsy after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout:g} s: {expression}")
            time.sleep(0.2)

    def close(self) -> None:
        """Stop the browser."""
        for fd in (self._send, self._receive):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._process.kill()
        self._process.wait(timeout=30)

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
