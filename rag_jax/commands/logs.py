"""Logging for the ``rag-jax`` command: quiet by default, everything when asked.

By default rag_jax's own messages are bare lines (stage lines at INFO; ``warning: ...`` and
``error: ...`` above), and the libraries' chatter is hidden: absl (orbax's checkpoint logs; orbax
raises what goes wrong, and rag_jax reports it) below CRITICAL, jax below WARNING (its backend probes,
e.g. "Unable to initialize backend 'tpu'", are INFO), transformers below ERROR (its advisory notices,
e.g. "PyTorch was not found").

``--verbose``, or ``RAG_JAX_LOG_LEVEL=<level>`` (DEBUG, INFO, ...), puts every logger at that level
(INFO for ``--verbose``) with time, level and logger name, and ``rag-jax`` then prints a traceback
with an error.
"""

from __future__ import annotations

import logging
import os

LEVEL_VARIABLE = "RAG_JAX_LOG_LEVEL"
QUIET_LIBRARIES = {"absl": logging.CRITICAL, "jax": logging.WARNING, "transformers": logging.ERROR}
VERBOSE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ShortFormatter(logging.Formatter):
    """The message alone at INFO and below; ``warning: message`` above."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


def verbose_level(flag: bool, environ: dict[str, str] | os._Environ = os.environ) -> int | None:
    """The level every logger is set to, or None for the quiet default."""
    name = environ.get(LEVEL_VARIABLE, "").strip().upper()
    if name:
        level = logging.getLevelName(name)
        if not isinstance(level, int):
            raise ValueError(f"{LEVEL_VARIABLE}={name!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
        return level
    return logging.INFO if flag else None


def configure(level: int | None) -> None:
    """Set up logging for a ``rag-jax`` run at ``verbose_level(...)``. Call it before transformers is
    imported: its verbosity is read from the environment then."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(VERBOSE_FORMAT) if level is not None else _ShortFormatter("%(message)s"))
    logging.basicConfig(level=logging.INFO if level is None else level, handlers=[handler], force=True)
    transformers_level = QUIET_LIBRARIES["transformers"] if level is None else level
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", logging.getLevelName(transformers_level).lower())
    if level is None:
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name, quiet in QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(quiet if level is None else level)
