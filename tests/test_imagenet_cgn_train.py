"""The ImageNet CGN's training job on the tiny config (random 32-px BigGANs, U2NETP, random VGG).

One module-scoped run on the 4 simulated devices is shared by the checks of what it writes and
the kill-and-rerun. Gradient accumulation, 1 vs 4 devices (on the gradient function: a second
training run would compile a whole second step), the fixed-batch descent and the initialisation
are in test_imagenet_cgn_grad.py, so that the two files run on separate workers.
"""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from cgn_jax import checkpoints
from cgn_jax.jobs import train_cgn_imagenet as job
from cgn_jax.models import imagenet_cgn
from cgn_jax.writers import read_metrics
from configs import imagenet as imagenet_config
from configs.common import apply_overrides

EPISODES = 4


def _config(data_dir, **overrides):
  c = imagenet_config.get_config("tiny")
  c.unlock()
  c.u_fixed = os.path.join(data_dir, "pretrained", "imagenet", "u_fixed.npy")
  c.train.episodes = EPISODES
  c.log.checkpoint_every = 2
  c.log.sample_every = EPISODES
  c.lock()
  return apply_overrides(c, **overrides)


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
  c = _config(data_dir)
  workdir = str(tmp_path_factory.mktemp("imagenet_tiny"))
  state = job.train_and_evaluate(c, workdir)
  return c, workdir, state


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_tiny_run_logs_checkpoints_sheets_and_export(tiny_run):
  c, workdir, state = tiny_run
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(1, EPISODES + 1))
  for r in rows:
    for n in job.LOSS_NAMES:
      assert np.isfinite(r[f"loss_{n}"]), (r["step"], n)
    parts = sum(r[f"loss_{n}"] for n in job.LOSS_NAMES if n != "total")
    assert r["loss_total"] == pytest.approx(parts, rel=1e-5)
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == [2, 4]
  sheet = Image.open(os.path.join(workdir, "samples", f"cls_sheet_ep_{EPISODES:07d}.png"))
  size, pad = c.model.output_dim, 2  # 6 columns (premask, mask, fg, bg, composite, x_gt) x classes
  assert sheet.size == (6 * (size + pad) + pad, len(c.sheet_classes) * (size + pad) + pad)
  meta = checkpoints.load_meta(os.path.join(workdir, "cgn"))
  assert meta["family"] == "imagenet_cgn" and meta["step"] == EPISODES
  assert imagenet_cgn.CGNConfig.from_dict(meta["model_config"]) == imagenet_cgn.config_from_fields(c.model)
  assert int(state.step) == EPISODES


def test_frozen_parts_are_bit_identical_and_outside_the_optimizer(tiny_run, tmp_path):
  c, workdir, state = tiny_run
  initial = job.initial_variables(c, imagenet_cgn.config_from_fields(c.model), str(tmp_path))
  trained = checkpoints.load_variables(os.path.join(workdir, "cgn"), "imagenet_cgn")
  for name in imagenet_cgn.FROZEN:
    for col in ("params", "batch_stats"):
      a, b = _flat(initial[col][name]), _flat(trained[col][name])
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{col}/{name}{k}")
  for name in imagenet_cgn.MECHANISMS:  # trained, and their spectral norms iterated
    a, b = _flat(initial["params"][name]), _flat(trained["params"][name])
    assert any(not np.array_equal(a[k], b[k]) for k in a), name
    u0 = _flat(initial["batch_stats"][name])
    u1 = _flat(trained["batch_stats"][name])
    assert any(not np.array_equal(u0[k], u1[k]) for k in u0 if k.endswith("['u']")), name
  opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt)[0]]
  assert opt_paths and not any(f in p for p in opt_paths for f in imagenet_cgn.FROZEN)
  assert {m for m in imagenet_cgn.MECHANISMS if any(m in p for p in opt_paths)} == set(imagenet_cgn.MECHANISMS)


def test_sigkill_between_saves_then_rerun_equals_the_shared_run(tiny_run, data_dir,
                                                                           tmp_path):
  """The CLI, killed (SIGKILL) after episode 3's metrics (between checkpoints 2 and 4), rerun to
  the end: bitwise the shared run, so this job's whole state (spectral vectors, RNG, optimizer) is
  in its checkpoint. A kill while a checkpoint is being written is the shared loop's, tested for
  the MNIST jobs in test_crash_safety.py (each kill here is a ~70 s CLI run of CI time)."""
  from crash import assert_same_run, ok, run_cli
  _, ref, _ = tiny_run
  args = ["--config", "configs/imagenet.py:tiny", f"--workdir={tmp_path}",
          f"--config.u_fixed={os.path.join(data_dir, 'pretrained', 'imagenet', 'u_fixed.npy')}",
          f"--config.train.episodes={EPISODES}", "--config.log.checkpoint_every=2",
          f"--config.log.sample_every={EPISODES}"]
  killed = run_cli(args, "kill_after_row", 3)
  assert killed.returncode == -9, killed.stderr[-2000:]
  resumed = run_cli(args)
  ok(resumed)
  assert "resuming from episode 2" in resumed.stdout, resumed.stdout
  assert_same_run(ref, str(tmp_path), export="cgn")
