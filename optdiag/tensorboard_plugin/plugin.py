"""The TensorBoard side of the optdiag tab: static files and two JSON routes under ``/data/plugin/optdiag/``.

* ``/runs``: ``{"runs": [{"run": name, "optdiag": bool}, ...]}``, every run TensorBoard knows, sorted.
* ``/run?run=<name>``: :func:`optdiag.tensorboard_plugin.data.run_view` of that run.
* ``/index.js`` (the ES module TensorBoard loads into the tab's frame, ``/data/plugin_entry.html?name=optdiag``),
  ``/chart.js`` and ``/style.css``. Extra ``run=<name>`` parameters of the frame's address choose the runs shown.

Scalars are read through TensorBoard's data provider, ``events.jsonl`` from the run's folder under the logdir at
every request, so the tab follows a run while it trains (the page polls). JSON is strict: a non-finite number is
sent as ``"nan"``, ``"inf"`` or ``"-inf"``, as in ``events.jsonl``.

Example::

    tensorboard --logdir lightning_logs   # the "optdiag" tab
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Callable

from tensorboard import context as tb_context
from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from optdiag.sinks.events import events_path, read_events
from optdiag.tensorboard_plugin import data

__all__ = ["OptDiagPlugin", "STATIC_FILES"]

#: The frontend: two plain ES modules and a style sheet, shipped as package data (no build step, no network).
STATIC_FILES = {"index.js": "text/javascript", "chart.js": "text/javascript", "style.css": "text/css"}
_SCALARS = "scalars"
_TEXT = "text"
# Scalars per tag sent to the page: as many as TensorBoard keeps by default (its reservoir holds 1000 per tag).
_DOWNSAMPLE = 1000


class OptDiagPlugin(base_plugin.TBPlugin):
    """The "optdiag" tab: per run, the loss with its verdicts, lambda_max against the stability threshold,
    lambda_min, and each verdict's evidence, outcome and suggestions.

    Args:
        context: TensorBoard's ``TBContext`` (its ``data_provider`` and ``logdir`` are used).

    Example::

        # found by TensorBoard through the entry point; by hand:
        OptDiagPlugin(base_plugin.TBContext(data_provider=provider, logdir="lightning_logs"))
    """

    plugin_name = "optdiag"

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._data_provider = context.data_provider
        self._logdir = context.logdir

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="optdiag")

    def get_plugin_apps(self) -> dict[str, Callable]:
        apps: dict[str, Callable] = {"/" + name: self._static(name, kind) for name, kind in STATIC_FILES.items()}
        apps["/runs"] = self._serve_runs
        apps["/run"] = self._serve_run
        return apps

    def is_active(self) -> bool:
        """Whether any run has optdiag scalars or an ``optdiag/events.jsonl`` in its folder."""
        if self._data_provider is None:
            return False
        ctx = tb_context.RequestContext()
        scalars = self._data_provider.list_scalars(ctx, experiment_id="", plugin_name=_SCALARS)
        if any(tag.startswith(data.PREFIX) for tags in scalars.values() for tag in tags):
            return True
        return any(self._events_file(run.run_name) for run in self._data_provider.list_runs(ctx, experiment_id=""))

    # --- reading ----------------------------------------------------------------------------------------------------
    def _run_dir(self, run: str) -> str | None:
        """The run's folder under the logdir, or None (no local logdir, or a name that leads outside it)."""
        if not self._logdir or "://" in self._logdir:
            return None
        root = os.path.realpath(self._logdir)
        path = os.path.realpath(os.path.join(root, run))
        return path if path == root or path.startswith(root + os.sep) else None

    def _events_file(self, run: str) -> str | None:
        directory = self._run_dir(run)
        path = events_path(directory) if directory else None
        return path if path and os.path.isfile(path) else None

    def run_names(self, ctx: Any, experiment: str) -> list[str]:
        """Every run TensorBoard knows, sorted."""
        return sorted(run.run_name for run in self._data_provider.list_runs(ctx, experiment_id=experiment))

    def run_view(self, ctx: Any, experiment: str, run: str) -> dict[str, Any]:
        """:func:`data.run_view` of one run, read now (scalars from the data provider, verdicts from the file)."""
        only_run = provider.RunTagFilter(runs=[run])
        read = self._data_provider.read_scalars(ctx, experiment_id=experiment, plugin_name=_SCALARS,
                                                downsample=_DOWNSAMPLE, run_tag_filter=only_run)
        scalars = {tag: [(d.step, d.value) for d in points] for tag, points in read.get(run, {}).items()}
        texts = self._data_provider.list_tensors(ctx, experiment_id=experiment, plugin_name=_TEXT,
                                                 run_tag_filter=provider.RunTagFilter(runs=[run], tags=[data.TEXT_TAG]))
        path = self._events_file(run)
        records = read_events(path, skip_invalid=True) if path else None
        return data.run_view(run, scalars, records, text_verdicts=bool(texts.get(run)))

    # --- routes -------------------------------------------------------------------------------------------------------
    def _static(self, name: str, content_type: str) -> Callable:
        @wrappers.Request.application
        def serve(request: wrappers.Request) -> wrappers.Response:
            body = resources.files(__package__).joinpath("static", name).read_bytes()
            return http_util.Respond(request, body, content_type)

        return serve

    @wrappers.Request.application
    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)
        scalars = self._data_provider.list_scalars(ctx, experiment_id=experiment, plugin_name=_SCALARS)
        runs = [{"run": run, "optdiag": any(t.startswith(data.PREFIX) for t in scalars.get(run, {}))
                 or self._events_file(run) is not None} for run in self.run_names(ctx, experiment)]
        return _json(request, {"runs": runs})

    @wrappers.Request.application
    def _serve_run(self, request: wrappers.Request) -> wrappers.Response:
        run = request.args.get("run")
        ctx, experiment = plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)
        if run is None or run not in self.run_names(ctx, experiment):
            return _json(request, {"error": f"no run named {run!r}"}, code=404)
        return _json(request, self.run_view(ctx, experiment, run))


def _json(request: wrappers.Request, body: Any, code: int = 200) -> wrappers.Response:
    # strict JSON: run_view already turned non-finite numbers into strings, so allow_nan=False only guards that
    return http_util.Respond(request, json.dumps(body, allow_nan=False), "application/json", code=code)
