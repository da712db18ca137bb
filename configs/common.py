"""Defaults shared by every config: where the data lives and the training loop's settings.

``DATA_DIR`` is absolute, so a config works from any current directory: ``$CGN_DATA`` when set,
otherwise the ``shared/data`` folder beside the checkout (``<checkout>/../shared/data``).
"""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections

from cgn_jax.errors import closest

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.abspath(os.environ.get("CGN_DATA") or
                           os.path.join(_CHECKOUT, "..", "shared", "data"))


def check_variant(variant: str, variants: Sequence[str]) -> None:
  """Refuses a variant that ``get_config`` does not know, naming the valid ones and the nearest.

  Each config lists its ``VARIANTS`` (``python -m cgn_jax.main --help`` shows them); ``""`` and
  ``"default"`` there mean the default.
  """
  if variant not in variants:
    named = [v for v in variants if v not in ("", "default")]
    near = closest(variant, named)
    default = ", or none (the default)" if {"", "default"} & set(variants) else ""
    hint = f"; did you mean :{near}?" if near else ""
    raise ValueError(f"unknown variant '{variant}'; choose one of "
                     f"{', '.join(':' + v for v in named)}{default}{hint}")


def data_path(*parts: str) -> str:
  """A path under ``DATA_DIR``."""
  return os.path.join(DATA_DIR, *parts)


def loop_config(every_steps: int, checkpoint_every: int, sample_every: int = 0,
                keep_checkpoints: int = 2) -> ml_collections.ConfigDict:
  """``config.log``: the fields ``cgn_jax.training`` reads (intervals in steps; 0 = never)."""
  log = ml_collections.ConfigDict()
  log.every_steps = every_steps            # metrics row (means since the last row) + progress text
  log.checkpoint_every = checkpoint_every  # the last step is always saved
  log.keep_checkpoints = keep_checkpoints  # older ones rotate out; non-finite states never go in
  log.sample_every = sample_every          # sample sheet (PNG) interval, on process 0
  log.tensorboard = True                   # used only if the tensorboard extra is installed
  log.progress_bar = True
  # Stop at the first non-finite loss or parameter, naming it; False only to debug a divergence.
  log.check_finite = True
  return log


def tiny_log(log: ml_collections.ConfigDict) -> None:
  """The ``:tiny`` variants' quiet logging (tests run many of them)."""
  log.progress_bar = False
  log.tensorboard = False


def apply_overrides(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """``apply_overrides(c, **{"train.lr": 1e-3})``: dotted-path overrides on a locked config."""
  with config.unlocked():
    for dotted, value in overrides.items():
      node, *path = config, *dotted.split(".")
      for part in path[:-1]:
        node = node[part]
      node[path[-1]] = value
  return config
