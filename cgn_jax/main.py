"""Entry point for every job: ``python -m cgn_jax.main --config configs/<exp>.py --workdir DIR``.

The config's ``job`` field names the job module; overrides come from the command line
(``--config.train.batch_size=64``). Known input errors end in one line with the cause and the fix.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

JOBS = {
    "sample_mnist": "cgn_jax.jobs.sample_mnist:run",
    "sample_biggan": "cgn_jax.jobs.sample_biggan:run",
    "train_cgn_mnist": "cgn_jax.jobs.train_cgn_mnist:train_and_evaluate",
    "generate_mnist": "cgn_jax.jobs.generate_mnist:run",
    "train_classifier": "cgn_jax.jobs.train_classifier:train_and_evaluate",
    "mnist_pipeline": "cgn_jax.jobs.mnist_pipeline:run",
    "train_cgn_imagenet": "cgn_jax.jobs.train_cgn_imagenet:train_and_evaluate",
    "generate_imagenet": "cgn_jax.jobs.generate_imagenet:run",
}

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


def run_job(config, workdir: str):
  job = config.get("job")
  if job not in JOBS:
    raise SystemExit(f"error: config.job='{job}' is not a job; choose one of {', '.join(JOBS)}")
  module, fn = JOBS[job].split(":")
  return getattr(importlib.import_module(module), fn)(config, workdir)


def main(argv):
  del argv
  os.makedirs(FLAGS.workdir, exist_ok=True)
  logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; jobs print what matters
  import jax  # pylint: disable=import-outside-toplevel
  if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1 or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()  # multi-host: reads the coordinator/process env of the launcher
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
               jax.process_count())
  try:
    run_job(FLAGS.config, FLAGS.workdir)
  except user_errors() as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
