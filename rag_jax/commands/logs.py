"""Logging for the ``rag-jax`` command: quiet by default, everything when asked.

By default rag_jax's own messages are bare lines (stage lines at INFO; ``warning: ...`` and
``error: ...`` above) and the libraries log only warnings and errors (none of jax's backend probes,
e.g. "Unable to initialize backend 'tpu'", nor matplotlib's font cache notes); absl, which carries
orbax's checkpoint logs, is silent below CRITICAL (orbax raises what goes wrong, and rag_jax reports
it), transformers below ERROR (no advisory notices such as "PyTorch was not found").

``--verbose``, or ``RAG_JAX_LOG_LEVEL=<level>`` (DEBUG, INFO, ...), puts every logger at that level
(INFO for ``--verbose``) with time, level and logger name, and ``rag-jax`` then prints a traceback
with an error.

Records are written with ``tqdm.write``, so a line logged during a progress bar does not run into it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Mapping

from tqdm import tqdm

LEVEL_VARIABLE = "RAG_JAX_LOG_LEVEL"
QUIET_LEVELS = {"rag_jax": logging.INFO, "absl": logging.CRITICAL, "transformers": logging.ERROR}
VERBOSE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ShortFormatter(logging.Formatter):
    """The message alone at INFO and below; ``warning: message`` above."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


class _ProgressBarSafeHandler(logging.Handler):
    """Writes each record to the current ``sys.stderr`` above any progress bar (``tqdm.write`` clears
    the bars, writes, redraws)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging's contract: report, never raise)
            self.handleError(record)


def verbose_level(flag: bool, environ: Mapping[str, str] = os.environ) -> int | None:
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
    handler = _ProgressBarSafeHandler()
    handler.setFormatter(logging.Formatter(VERBOSE_FORMAT) if level is not None else _ShortFormatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING if level is None else level, handlers=[handler], force=True)
    for name, quiet in QUIET_LEVELS.items():
        logging.getLogger(name).setLevel(quiet if level is None else level)
    transformers_level = logging.getLogger("transformers").level
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", logging.getLevelName(transformers_level).lower())
    if level is None:
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        _start_backends_quietly()


def _start_backends_quietly() -> None:
    """Where libtpu is installed (the test and planning set-up), start jax's backends now with their
    native start-up notes hidden: on a host without a TPU, libtpu's probe writes its missing accelerator
    type and worker hostnames to file descriptor 2, past the logging above, at the first jax call."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    import jax

    from rag_jax.planning.targets import native_stderr_silenced

    with native_stderr_silenced():
        jax.devices()
