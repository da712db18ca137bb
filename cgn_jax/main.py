"""Entry point for every job: ``python -m cgn_jax.main --config configs/<exp>.py --workdir DIR``.

The config's ``job`` field names the job module; overrides come from the command line
(``--config.train.batch_size=64``). Known input errors end in one line with the cause and the fix.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that mean bad input (a path, a file, a config value), reported in one line."""
  from cgn_jax.checkpoints import CheckpointError  # pylint: disable=import-outside-toplevel
  from converters.common import ConversionError  # pylint: disable=import-outside-toplevel
  errors = [CheckpointError, ConversionError, FileNotFoundError, FileExistsError]
  try:
    from cgn_jax.data.storage import DataError  # pylint: disable=import-outside-toplevel
    errors.append(DataError)
  except ImportError:
    pass
  return tuple(errors)


def main(argv):
  del argv
  os.makedirs(FLAGS.workdir, exist_ok=True)
  logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; jobs print what matters
  import jax  # pylint: disable=import-outside-toplevel
  if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1 or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()  # multi-host: reads the coordinator/process env of the launcher
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
               jax.process_count())
  from cgn_jax import training  # pylint: disable=import-outside-toplevel
  from cgn_jax.jobs import UnknownJob, run_job  # pylint: disable=import-outside-toplevel
  try:
    run_job(FLAGS.config, FLAGS.workdir)
  except training.Interrupted as e:  # saved; the conventional 128 + signal number
    print(f"{e}", file=sys.stderr)
    sys.exit(128 + e.signum)
  except (training.NonFiniteError, UnknownJob, *user_errors()) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
