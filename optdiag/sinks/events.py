"""``events.jsonl``: every diagnosis as one JSON object per line, appended, never overwritten.

The file lives at ``<logger log_dir>/optdiag/events.jsonl`` (or ``<trainer.default_root_dir>/optdiag/events.jsonl``
when the trainer has no logger) and is written on global rank 0 only. Each line is ``Diagnosis.to_dict()``, so
``Diagnosis.from_dict(json.loads(line))`` gives the diagnosis back.

Lines are strict JSON (``jq``, JavaScript and pandas read them). The encoding is the diagnosis layer's own
(:func:`optdiag.diagnosis.types.to_jsonable`): a non-finite number, which a diverging run does produce, is written as
the string ``"nan"``, ``"inf"`` or ``"-inf"``, and :func:`read_events` turns those strings back into floats.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "optdiag", "events.jsonl")
    >>> append_event(path, {"kind": "divergence", "evidence": {"loss": float("inf")}})
    >>> read_events(path)
    [{'kind': 'divergence', 'evidence': {'loss': inf}}]
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

from optdiag.diagnosis.types import from_jsonable, to_jsonable
from optdiag.errors import UsageError

__all__ = ["EVENTS_FILENAME", "events_path", "append_event", "append_events", "read_events", "to_json_line"]

EVENTS_FILENAME = "events.jsonl"


def events_path(log_dir: str | os.PathLike[str]) -> str:
    """``<log_dir>/optdiag/events.jsonl``.

    Example:
        >>> events_path("lightning_logs/version_0").replace(os.sep, "/")
        'lightning_logs/version_0/optdiag/events.jsonl'
    """
    return os.path.join(os.fspath(log_dir), "optdiag", EVENTS_FILENAME)


def to_json_line(record: Mapping[str, Any]) -> str:
    """One strict-JSON line (no newline inside) for ``record``.

    Raises:
        UsageError: when ``record`` is not a mapping, or holds something JSON cannot represent (naming its type).
    """
    if not isinstance(record, Mapping):
        raise UsageError(f"an event must be a mapping (e.g. Diagnosis.to_dict()), got {type(record).__name__}")
    return json.dumps(to_jsonable(dict(record)), allow_nan=False, separators=(",", ":"))


def append_events(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> int:
    """Append ``records`` to ``path``, one JSON object per line, creating the folder if needed.

    The file is opened in append mode, so an existing file (a previous run, or a resumed one) is never truncated.
    Every line is encoded before the file is opened: a record that cannot be encoded leaves the file untouched.

    Returns:
        The number of lines written.
    """
    lines = [to_json_line(record) + "\n" for record in records]
    if not lines:
        return 0
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
    return len(lines)


def append_event(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one record as one line (see :func:`append_events`)."""
    append_events(path, [record])


def read_events(path: str | os.PathLike[str], *, skip_invalid: bool = False) -> list[dict[str, Any]]:
    """Every record in an ``events.jsonl`` file, oldest first, with non-finite markers turned back into floats.

    Blank lines are skipped.

    Args:
        path: the file.
        skip_invalid: leave out a line that is not a JSON object instead of raising: a reader of a run that is
            still training (the TensorBoard tab) may find its last line half written.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: naming the file and line number of a line that is not a JSON object (unless ``skip_invalid``).
    """
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if skip_invalid:
                    continue
                raise ValueError(f"{os.fspath(path)}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                if skip_invalid:
                    continue
                raise ValueError(f"{os.fspath(path)}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(from_jsonable(record))
    return records
