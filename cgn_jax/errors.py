"""Bad inputs end in one line, ``error: <cause>; <fix>``, never in a traceback.

The command lines (``cgn_jax.main``, ``python -m converters``) hand every exception to
:func:`one_line`. It returns a line for what means a wrong input: the project's own error classes,
a ``ValueError`` raised by the project's own checks (each names the field and the fix), and an
``OSError`` of a full disk or an unwritable folder, also when a library only quotes one in its text
(tensorstore writing an Orbax checkpoint). Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import errno
import glob
import linecache
import logging
import os
import re
import sys
import time
from typing import Any, Iterable, Iterator, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_CODE = tuple(os.path.join(_ROOT, d) + os.sep for d in ("cgn_jax", "configs", "converters"))

_DISK_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
              errno.EFBIG: "a file-size limit such as ulimit -f, or a full disk"}
_NO_WRITE = {errno.EROFS, errno.EACCES, errno.EPERM}


class InputError(Exception):
  """A bad input; the message is one line with the cause and the fix."""


class ConfigError(InputError, ValueError):
  """A config value the job cannot use; the message names the ``--config`` field."""


def closest(value: Any, options: Iterable[Any]) -> str | None:
  """The option the user probably meant: the same word in another case, the one option it
  abbreviates (``cf`` -> ``counterfactual``), else the nearest spelling; None when none is near."""
  options = [str(o) for o in options]
  text = str(value).lower()
  for match in ([o for o in options if o.lower() == text],
                [o for o in options if o.lower().startswith(text)] if text else [],
                [o for o in options if text and _abbreviates(text, o.lower())]):
    if len(match) == 1:
      return match[0]
  near = difflib.get_close_matches(text, [o.lower() for o in options], n=1, cutoff=0.6)
  return next(o for o in options if o.lower() == near[0]) if near else None


def _abbreviates(short: str, word: str) -> bool:
  """The letters of ``short`` appear in ``word`` in order, the first one first."""
  if short[0] != word[0]:
    return False
  it = iter(word)
  return all(c in it for c in short)


def check_choice(config: Any, field: str, choices: Sequence[str]) -> None:
  """Raises ConfigError unless ``config.<field>`` (a dotted path) is one of ``choices``."""
  value = config
  for part in field.split("."):
    value = value[part]
  if value not in choices:
    best = closest(value, choices)
    hint = f"; did you mean --config.{field}={best}?" if best else ""
    raise ConfigError(f"--config.{field}={value!r} is not one of "
                      f"{', '.join(repr(c) if c == '' else str(c) for c in choices)}{hint}")


def _chain(e: BaseException) -> Iterator[BaseException]:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _raised_by_own_code(e: BaseException) -> bool:
  """``e`` came from a ``raise`` statement of this project: a deliberate check, not a bug deep in
  a library (numpy and JAX raise ValueError for shape errors too)."""
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  path = os.path.abspath(tb.tb_frame.f_code.co_filename)
  return (path.startswith(_OWN_CODE)
          and linecache.getline(path, tb.tb_lineno).lstrip().startswith("raise"))


def _os_error(e: BaseException) -> tuple[int | None, str, str | None] | None:
  """(errno, reason, file) of a full disk or an unwritable path in ``e`` or what caused it."""
  for x in _chain(e):
    if isinstance(x, OSError) and (x.errno in _DISK_FULL or x.errno in _NO_WRITE):
      return x.errno, x.strerror or os.strerror(x.errno), x.filename
    text = str(x)
    m = re.search(r"os_error_code='(\d+)'|\[Errno (\d+)\]", text)  # tensorstore / a quoted OSError
    code = int(next(g for g in m.groups() if g)) if m else None
    if code in _DISK_FULL or code in _NO_WRITE:
      return code, os.strerror(code), None
    if isinstance(x, OSError) and re.search(r"\d+ requested and \d+ written", text):
      return errno.ENOSPC, "a short write", None  # numpy's tofile/np.save on a full disk
  return None


def one_line(e: BaseException, target: str, flag: str,
             also: tuple[type[BaseException], ...] = ()) -> str | None:
  """The one-line report of ``e`` when it means a bad input, else None (a bug: keep the traceback).

  Args:
    e: the exception that ended the command.
    target: what the command writes, named in the report of a full disk (``--workdir /x``).
    flag: the argument to change to write elsewhere (``--workdir``, ``DST``).
    also: further exception classes whose message is already the one line (e.g. NonFiniteError).
  """
  found = _os_error(e)
  if found is not None:
    code, reason, path = found
    if code in _DISK_FULL:
      return (f"cannot write {path or target}: {reason} ({_DISK_FULL[code]}); free some space or "
              f"raise the limit, or choose a {flag} on another disk")
    return f"cannot write {path or target}: {reason}; make it writable or choose another {flag}"
  if isinstance(e, (InputError, FileNotFoundError, FileExistsError, *_error_classes(), *also)):
    return _flat(e)
  if isinstance(e, ValueError) and _raised_by_own_code(e):
    return _flat(e)
  return None


_ERROR_CLASSES = (("cgn_jax.checkpoints", "CheckpointError"), ("cgn_jax.data.storage", "DataError"),
                  ("converters.common", "ConversionError"))


def _error_classes() -> tuple[type[BaseException], ...]:
  """The other modules' one-line error classes, of those imported: an exception of a module not
  imported cannot have been raised, and importing them (JAX, Orbax) would slow every error down."""
  return tuple(getattr(sys.modules[m], n) for m, n in _ERROR_CLASSES if m in sys.modules)


def write_failed(e: BaseException) -> bool:
  """``e`` is (or quotes) a write refused by the filesystem: full, read-only, no permission."""
  return _os_error(e) is not None


def remove_empty_trees(patterns: Sequence[str], settle_s: float = 0.0) -> None:
  """Removes every folder matching a glob pattern that holds no file, only (empty) folders.

  That is what a failed run leaves behind: the emptied temporary folder of an atomic write, a
  workdir it created. After a failed write tensorstore may still create folders for the writes
  that were in flight, so with ``settle_s`` the removal repeats for that long.
  """
  deadline = time.time() + settle_s
  while True:
    for pattern in patterns:
      for path in glob.glob(pattern):
        if os.path.isdir(path):
          _remove_if_empty(path)
    if time.time() >= deadline:
      return
    time.sleep(0.05)


def _remove_if_empty(path: str) -> None:
  for folder, _, files in os.walk(path, topdown=False):
    if files:
      return
    try:
      os.rmdir(folder)
    except OSError:  # a file appeared, or another process removed it first
      return


def _flat(e: BaseException) -> str:
  text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
  return text or type(e).__name__


def _from_orbax(record: logging.LogRecord) -> bool:
  """The record was logged by Orbax (absl's logger names no caller; the traceback does)."""
  marker = f"{os.sep}orbax{os.sep}"
  tb = record.exc_info[2] if record.exc_info else None
  while tb is not None:
    if marker in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return marker in record.pathname


class HeldLibraryErrors(logging.Filter):
  """Holds the error logs of Orbax's background work until the command knows how it ends.

  A failed asynchronous save logs its exception (with a traceback, several times, on absl's logger
  and at exit on asyncio's) and re-raises it in the main thread. When that is a full disk the
  one-line report is all the user needs: ``drop`` discards them, up to exit; ``release`` shows them
  when the command fails for any other reason. The tracebacks of late tensorstore callbacks into
  Orbax's closed event loop are never shown.
  """

  _LOGGERS = ("absl", "asyncio")

  def __init__(self):
    super().__init__()
    self.held: list[logging.LogRecord] = []
    self.discarding = False
    for name in self._LOGGERS:
      logging.getLogger(name).addFilter(self)
    previous = sys.unraisablehook

    def unraisable(info):
      # After a failed save Orbax closes its event loop while tensorstore still completes the
      # other writes; each completion then reports "Event loop is closed", up to exit.
      if not (isinstance(info.exc_value, RuntimeError)
              and str(info.exc_value) == "Event loop is closed"):
        previous(info)

    sys.unraisablehook = unraisable

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and _from_orbax(record):
      if not self.discarding:
        self.held.append(record)
      return False
    return True

  def drop(self) -> None:
    self.discarding = True
    self.held.clear()

  def release(self) -> None:
    for name in self._LOGGERS:
      logging.getLogger(name).removeFilter(self)
    for record in self.held:
      logging.getLogger(record.name).handle(record)
    self.held.clear()
