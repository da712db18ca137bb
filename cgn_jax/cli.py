"""What ``cgn_jax.main`` tells a user before any job runs: ``--help``, flag errors, the workdir.

ml_collections parses ``--config`` (and every ``--config.FIELD=VALUE``) during absl's flag parsing,
so its errors surface there as tracebacks whose useful part is buried (the "did you mean" of an
unknown key sits in a chained KeyError; a variant error inside a formatted traceback).
:func:`explain_flag_error` loads the config once more and says in one line which field or file is
wrong and what to type instead.
"""

from __future__ import annotations

import ast
import glob
import importlib
import importlib.util
import os
import re
import textwrap
from typing import Any, Sequence

from cgn_jax.errors import InputError, closest

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_HELPERS = ("common.py", "mnist_base.py")  # config modules without a get_config()


# ---------------------------------------------------------------------------------------------
# --help


def _first_sentence(doc: str) -> str:
  text = " ".join(doc.strip().split("\n\n")[0].split())
  while re.search(r"\s*\([^()]*\)", text):
    text = re.sub(r"\s*\([^()]*\)", "", text)
  text = text.split(". ")[0].rstrip(".:")
  return text if len(text) <= 72 else text[:71].rsplit(" ", 1)[0] + "…"


def config_variants(name: str, doc: str) -> list[str]:
  """A config's variants: its module's ``VARIANTS``, else the ``:name`` its docstring mentions."""
  try:
    variants = importlib.import_module(f"configs.{name}").VARIANTS
  except Exception:  # pylint: disable=broad-except  # no VARIANTS, or a config that fails to import
    variants = re.findall(r"(?:``|\.py):(\w+)", doc)
  return [v for v in dict.fromkeys(variants) if v not in ("", "default")]


def list_configs() -> list[tuple[str, list[str], str]]:
  """(path as typed from the checkout, variants, first sentence of the docstring) per config."""
  out = []
  for path in sorted(glob.glob(os.path.join(CONFIGS_DIR, "*.py"))):
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
      source = f.read()
    if name.startswith("_") or name in _HELPERS or "def get_config" not in source:
      continue
    doc = ast.get_docstring(ast.parse(source)) or ""
    shown = os.path.relpath(path)  # as typed from here; absolute when outside this folder
    shown = path if shown.startswith("..") else shown
    out.append((shown, config_variants(name[:-3], doc), _first_sentence(doc)))
  return out


def usage(doc: str, flag_help: dict[str, str]) -> str:
  """The ``--help`` text: how to call, the jobs, the configs with their variants, the flags."""
  from cgn_jax.jobs import JOBS  # pylint: disable=import-outside-toplevel
  about = doc.strip().split("\n\n")[1:2] or [""]
  lines = ["usage: python -m cgn_jax.main --config configs/NAME.py[:VARIANT] --workdir DIR "
           "[--config.FIELD=VALUE ...]", "", *textwrap.wrap(" ".join(about[0].split()), 100), "",
           "jobs (a config's `job` field picks one):",
           *textwrap.wrap(", ".join(JOBS), 98, initial_indent="  ", subsequent_indent="  "), "",
           "configs (configs/NAME.py[:VARIANT]; no variant = the default):"]
  rows = list_configs()
  width = max(len(p) for p, _, _ in rows) + 2
  for path, variants, summary in rows:
    lines.append(f"  {path:<{width}}{summary}")
    if variants:
      lines += textwrap.wrap(f"variants: {', '.join(variants)}", 100,
                             initial_indent=" " * (width + 2), subsequent_indent=" " * (width + 12))
  lines += ["", "flags:"] + [f"  --{name}: {text}" for name, text in flag_help.items()]
  lines.append("  --helpfull: every flag, absl's and JAX's included")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# flag errors


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    for prefix in (f"--{name}=", f"-{name}="):
      if arg.startswith(prefix):
        return arg[len(prefix):]
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overridden_fields(argv: Sequence[str], name: str) -> list[str]:
  fields = []
  for arg in argv[1:]:
    if arg == "--":
      break
    m = re.match(rf"--?(?:no)?{name}\.([^=]+)", arg)
    if m:
      fields.append(m.group(1))
  return fields


def load_config(spec: str) -> Any:
  """``get_config(variant)`` of ``FILE[:VARIANT]``, as ml_collections would call it."""
  path, *variant = spec.split(":", 1)
  module_spec = importlib.util.spec_from_file_location("cgn_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*variant)


def _is_group(node: Any) -> bool:
  return hasattr(node, "keys") and hasattr(node, "get")


def _paths(node: Any, prefix: str = "") -> list[str]:
  out = []
  for key in node.keys():
    out.append(prefix + key)
    if _is_group(node[key]):
      out += _paths(node[key], prefix + key + ".")
  return out


def _meant(config: Any, node: Any, parts: list[str], i: int) -> str | None:
  """The field path the user probably meant where ``parts[i]`` is not a key of ``node``: a near
  key beside it (``n_per_clas``), else the one field of that name elsewhere (``batch_size`` for
  ``train.batch_size``)."""
  near = closest(parts[i], list(node.keys()))
  if near:
    return ".".join(parts[:i] + [near] + parts[i + 1:])
  leaf = ".".join(parts[i:]).lower()
  elsewhere = [p for p in _paths(config) if p.lower().endswith("." + leaf)]
  return elsewhere[0] if len(elsewhere) == 1 else None


def _field_problem(config: Any, spec: str, field: str) -> str | None:
  """Why ``--config.<field>`` names no field of ``config`` (None when it does)."""
  node, parts = config, field.split(".")
  for i, part in enumerate(parts):
    here = ".".join(parts[:i])
    if not _is_group(node):
      return (f"--config.{field}: config.{here} is a value ({node!r:.40}), not a group of fields; "
              f"set it as --config.{here}=VALUE")
    if part not in node:
      best = _meant(config, node, parts, i)
      if best:
        fix = f"did you mean --config.{best}?"
      else:
        fix = (f"config{'.' + here if here else ''} has: "
               f"{_shorten(', '.join(node.keys()), 160)}")
      return f"{spec} has no field '{'.'.join(parts[:i + 1])}'; {fix}"
    node = node[part]
  return None


def _shorten(text: str, n: int) -> str:
  return text if len(text) <= n else text[:n].rsplit(", ", 1)[0] + ", …"


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  last = lines[-1] if lines else text
  return re.sub(r"^\w*(Error|Exception): ", "", last)


def explain_flag_error(e: BaseException, argv: Sequence[str], config_flag: str = "config",
                       required: Sequence[str] = ()) -> str | None:
  """One line for an exception of flag parsing, or None when it is not about the command line."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  text = str(e)
  if isinstance(e, flags.UnrecognizedFlagError):
    return " ".join(text.split()) + " (--help lists the flags)"
  missing = [f"--{n}" for n in required if _flag_value(argv, n) is None]
  if missing:
    return (f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required, e.g. "
            f"python -m cgn_jax.main --config configs/mnist_sample.py --workdir /tmp/cgn_sample "
            f"(--help lists the configs)")
  spec = _flag_value(argv, config_flag)
  if spec is not None:
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
      names = [p for p, _, _ in list_configs()]
      best = closest(path, names) or closest(os.path.basename(path), names)
      hint = f"did you mean {best}? " if best else ""
      return (f"--{config_flag} {path}: no such file (from {os.getcwd()}); {hint}"
              f"python -m cgn_jax.main --help lists the configs")
    if "Error whilst parsing config file" in text:
      return f"--{config_flag} {spec}: {_last_line(text)}"
    try:
      config = load_config(spec)
    except Exception:  # pylint: disable=broad-except  # reported below as ml_collections said
      config = None
    if config is not None:
      for field in _overridden_fields(argv, config_flag):
        problem = _field_problem(config, spec, field)
        if problem:
          return problem
      m = re.match(rf"flag --{config_flag}\.([\w.]+)=(.*?): (.*)", text, re.S)
      if m:
        field, value, reason = m.groups()
        default = config
        for part in field.split("."):
          default = default[part]
        return (f"--{config_flag}.{field}={value!r}: {_last_line(reason)}; the field holds "
                f"{type(default).__name__} values (default {default!r})")
  if isinstance(e, flags.Error):
    return " ".join(text.split())
  return None


# ---------------------------------------------------------------------------------------------
# the workdir


class WorkdirError(InputError):
  """``--workdir`` cannot be used (a file, read-only, not creatable)."""


def prepare_workdir(path: str) -> bool:
  """Creates ``path`` if it is missing; True when this run created it (removed again if the run
  fails having written nothing, see ``errors.remove_empty_trees``)."""
  if not path:
    raise WorkdirError("--workdir is empty; pass the folder for checkpoints and outputs")
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {path} is a file, not a folder; pass a folder (it is created "
                       f"if missing)")
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise WorkdirError(f"--workdir {path}: {probe} is a file, so the folder cannot be created; "
                       f"choose another --workdir")
  if not os.access(probe, os.W_OK | os.X_OK):
    where = (f"--workdir {path} is" if probe == os.path.abspath(path)
             else f"cannot create --workdir {path}: {probe} is")
    raise WorkdirError(f"{where} not writable (read-only or no permission); choose a folder you "
                       f"can write to")
  existed = os.path.isdir(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create --workdir {path}: {e.strerror}; choose a folder you can "
                       f"write to") from e
  return not existed
