"""Entry point for every job: ``python -m cgn_jax.main --config configs/<exp>.py --workdir DIR``.

The config's ``job`` field names the job module; overrides come from the command line
(``--config.train.batch_size=64``). A bad input (a config key or value, a path, a full disk) ends in
one line on stderr, ``error: <cause>; <fix>``, with exit status 1 and nothing half-written;
``--help`` lists the jobs and the configs.
"""

from __future__ import annotations

import glob
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from cgn_jax import cli, errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process: HOST:PORT of process 0 (default $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Multi-process: how many (default $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-process: this one's index (default $JAX_PROCESS_ID).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "auto: join JAX's distributed runtime when the three settings above are given or "
                  "a Slurm/Open MPI/TPU-pod launch is detected; on: always let JAX detect; off: never.")
_REQUIRED = ("config", "workdir")
flags.mark_flags_as_required(list(_REQUIRED))
_HELP = ("-h", "-help", "--help", "-?", "--helpshort")
_FLAGS = ("config", "workdir", "coordinator_address", "num_processes", "process_id", "distributed")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  _exit(1)


def _exit(code: int) -> None:
  """``sys.exit``, except that a process of a multi-process run that fails alone leaves at once.

  Python's exit would wait in JAX's shutdown barrier (5 min) for peers that never come; leaving
  stops this process's heartbeat, so the others stop at JAX's heartbeat timeout.
  """
  jax = sys.modules.get("jax")
  if jax is not None and code and jax.process_count() > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (``app.run``'s ``flags_parser``), a bad flag or config in one line."""
  if any(a in _HELP for a in argv[1:argv.index("--") if "--" in argv else None]):
    print(cli.usage(__doc__, {n: FLAGS[n].help for n in _FLAGS}))
    sys.exit(0)
  try:
    rest = FLAGS(argv)
    FLAGS.config.get("job")  # a config file that failed to load raises only when first touched
    return rest
  except (flags.Error, AttributeError, KeyError, OSError) as e:
    message = cli.explain_flag_error(e, argv, "config", _REQUIRED)
    if message is None:
      raise
    _fail(message)
  raise AssertionError("unreachable")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; jobs print what matters
  held = errors.HeldLibraryErrors()
  try:
    created = cli.prepare_workdir(FLAGS.workdir)
  except errors.InputError as e:
    _fail(str(e))
  import jax  # pylint: disable=import-outside-toplevel
  from cgn_jax import parallel, training  # pylint: disable=import-outside-toplevel
  try:
    if parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                       FLAGS.process_id, FLAGS.distributed):
      print(f"process {jax.process_index()} of {jax.process_count()}: "
            f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
  except parallel.DistributedSetupError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  from cgn_jax.jobs import UnknownJob, run_job  # pylint: disable=import-outside-toplevel
  try:
    run_job(FLAGS.config, FLAGS.workdir)
  except training.Interrupted as e:  # saved; the conventional 128 + signal number
    held.release()
    print(f"{e}", file=sys.stderr)
    sys.exit(128 + e.signum)
  except Exception as e:  # pylint: disable=broad-except  # a bad input in one line, a bug in full
    # Nothing half-written: emptied temporary folders of atomic writes, a workdir made for nothing.
    root = glob.escape(FLAGS.workdir)
    errors.remove_empty_trees([os.path.join(root, "*.tmp-*"), os.path.join(root, "*", "*.tmp-*"),
                               *([root] if created else [])],
                              settle_s=0.5 if errors.write_failed(e) else 0.0)
    line = errors.one_line(e, f"--workdir {FLAGS.workdir}", "--workdir",
                           (training.NonFiniteError, UnknownJob))
    if line is None:
      held.release()
      if jax.process_count() > 1:  # a bug: its traceback, then out without the shutdown wait
        traceback.print_exc()
        _exit(1)
      raise
    held.drop()
    _fail(line)
  held.release()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
