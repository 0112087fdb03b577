"""Messages to the user on stderr (errors, warnings, notes): one place for every command.

As text: ``diskvault: error: …``, ``diskvault: warning: …``, ``diskvault: note: …``, or
``diskvault: …`` for plain information. With ``--log-json`` (a common option, as in
Borg) each message is one JSON line in Borg's ``log_message`` form instead::

    {"type": "log_message", "time": 1767225600.5, "levelname": "WARNING",
     "name": "diskvault", "message": "…"}

Progress lines keep their ``progress_percent`` form (progress.py), so a frontend reads
stderr line by line, every line JSON. Records of Python's ``logging`` under
``diskvault.*`` (storage retries, the FUSE view) take the same path in JSON mode.
"""

from __future__ import annotations

import json
import logging
import sys
import time

NAME = "diskvault"
_json = False


def configure(log_json: bool) -> None:
    """Text or JSON lines from now on (main() calls it before and after parsing)."""
    global _json
    _json = log_json
    logger = logging.getLogger(NAME)
    ours = [h for h in logger.handlers if isinstance(h, _JsonHandler)]
    if log_json and not ours:
        logger.addHandler(_JsonHandler())
        logger.propagate = False  # not a second, text copy through the root logger
    elif not log_json:
        for h in ours:
            logger.removeHandler(h)
        logger.propagate = True


def json_mode() -> bool:
    return _json


def _emit(levelname: str, label: str, message: str, name: str = NAME,
          when: float | None = None) -> None:
    if _json:
        line = json.dumps({"type": "log_message", "time": time.time() if when is None else when,
                           "levelname": levelname, "name": name, "message": message})
    else:
        line = f"diskvault: {label}{message}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def error(message: str) -> None:
    _emit("ERROR", "error: ", message)


def warning(message: str) -> None:
    _emit("WARNING", "warning: ", message)


def note(message: str) -> None:
    _emit("INFO", "note: ", message)


def info(message: str) -> None:
    """Plain information (``diskvault: …``)."""
    _emit("INFO", "", message)


def relay(line: str) -> None:
    """A line another diskvault process wrote to its stderr (mount's child): as it is
    when it is one of ours already, else as information."""
    if _json:
        try:
            ours = json.loads(line).get("type") in ("log_message", "progress_percent")
        except (ValueError, AttributeError):
            ours = False
    else:
        ours = line.startswith("diskvault: ")
    if ours:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    else:
        info(line)


class _JsonHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            _emit(record.levelname, "", record.getMessage(), record.name, record.created)
        except Exception:  # noqa: BLE001 - logging must never end the command
            self.handleError(record)
