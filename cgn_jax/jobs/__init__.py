"""One module per job; each exposes ``run(config, workdir)`` or ``train_and_evaluate(config, workdir)``.

``run_job`` picks the module by ``config.job`` and imports it only then, so no job module imports
another one (a pipeline of jobs calls ``run_job`` on each stage's config).
"""

from __future__ import annotations

import importlib
from typing import Any

JOBS = {
    "sample_mnist": "cgn_jax.jobs.sample_mnist:run",
    "sample_biggan": "cgn_jax.jobs.sample_biggan:run",
    "train_cgn_mnist": "cgn_jax.jobs.train_cgn_mnist:train_and_evaluate",
    "train_gan_mnist": "cgn_jax.jobs.train_gan_mnist:train_and_evaluate",
    "generate_mnist": "cgn_jax.jobs.generate_mnist:run",
    "train_classifier": "cgn_jax.jobs.train_classifier:train_and_evaluate",
    "mnist_pipeline": "cgn_jax.jobs.mnist_pipeline:run",
    "train_cgn_imagenet": "cgn_jax.jobs.train_cgn_imagenet:train_and_evaluate",
    "generate_imagenet": "cgn_jax.jobs.generate_imagenet:run",
    "train_classifier_imagenet": "cgn_jax.jobs.train_classifier_imagenet:train_and_evaluate",
    "evaluate_classifier_imagenet": "cgn_jax.jobs.evaluate_classifier_imagenet:run",
    "evaluate_generation": "cgn_jax.jobs.evaluate_generation:run",
    "explain_classifier": "cgn_jax.jobs.explain_classifier:run",
    "explain_ensemble": "cgn_jax.jobs.explain_ensemble:run",
}


class UnknownJob(ValueError):
  """``config.job`` names no job."""


def run_job(config: Any, workdir: str) -> Any:
  """Runs the job that ``config.job`` names in ``workdir``; returns what the job returns."""
  job = config.get("job")
  if job not in JOBS:
    raise UnknownJob(f"config.job='{job}' is not a job; choose one of {', '.join(JOBS)}")
  module, fn = JOBS[job].split(":")
  return getattr(importlib.import_module(module), fn)(config, workdir)
