"""Training of the MNIST CGN against a conditional discriminator (the authors' mnists/train_cgn.py).

Each step is one jit-compiled function: a generator update (adversarial MSE + binary mask loss +
VGG16 Gram/style loss [+ optional SSIM]) followed by a discriminator update on real and detached
fake images, with the batch sharded over every device. Randomness is ``fold_in(seed, step)``, data
order a per-epoch permutation of the seed, so a resumed run continues the same trajectory.
"""

from __future__ import annotations

import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
from tqdm import tqdm

from cgn_jax import checkpoints, losses, parallel
from cgn_jax.composer import compose
from cgn_jax.data import build, storage
from cgn_jax.data.augment import color_jitter
from cgn_jax.jobs.sample_mnist import sample_sheet
from cgn_jax.models import vgg
from cgn_jax.models.mnist_cgn import DiscConv, DiscLin, MnistCGN
from cgn_jax.writers import MetricWriter

LOSS_NAMES = ("g_adv", "g_binary", "g_perc", "g_ssim", "g_total", "d_real", "d_fake", "d_total")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  g_params: Any
  g_stats: Any
  d_params: Any
  d_stats: Any
  g_opt: Any
  d_opt: Any


# clu metrics: per-step values are merged on device; only ``compute()`` at log time syncs the host.
TrainMetrics = clu_metrics.Collection.create(
    **{name: clu_metrics.Average.from_output(name) for name in LOSS_NAMES})


def create_models(config: ml_collections.ConfigDict) -> tuple[MnistCGN, Any]:
  m = config.model
  cgn = MnistCGN(n_classes=m.n_classes, latent_sz=m.latent_sz, ngf=m.ngf, img_sz=m.img_sz,
                 init_type=m.init_type, init_gain=m.init_gain)
  if m.disc == "linear":
    disc = DiscLin(n_classes=m.n_classes, ndf=m.ndf)
  elif m.disc == "conv":
    disc = DiscConv(n_classes=m.n_classes, ndf=m.ndf)
  else:
    raise ValueError(f"config.model.disc must be 'linear' or 'conv', got '{m.disc}'")
  return cgn, disc


def create_optimizers(config: ml_collections.ConfigDict):
  b1, b2 = config.train.betas
  # torch.optim.Adam defaults (eps 1e-8, no weight decay), the authors' Optimizers.set.
  return optax.adam(config.train.lr, b1, b2, eps=1e-8), optax.adam(config.train.lr, b1, b2, eps=1e-8)


def create_train_state(config, cgn, disc, tx_g, tx_d, key) -> TrainState:
  kg, kd = jax.random.split(key)
  img = jnp.zeros((2, config.model.img_sz, config.model.img_sz, 3))
  ys = jnp.zeros((2,), jnp.int32)
  g_vars = jax.jit(lambda k: cgn.init(k, ys, k, train=False))(kg)
  d_vars = jax.jit(lambda k: disc.init(k, img, ys, train=False))(kd)
  return TrainState(step=jnp.zeros((), jnp.int32), g_params=g_vars["params"],
                    g_stats=g_vars.get("batch_stats", {}), d_params=d_vars["params"],
                    d_stats=d_vars.get("batch_stats", {}), g_opt=tx_g.init(g_vars["params"]),
                    d_opt=tx_d.init(d_vars["params"]))


def make_train_step(config, cgn, disc, tx_g, tx_d, features_fn):
  """Returns ``train_step(state, batch, key) -> (state, metrics)`` (not yet jitted)."""
  lam = config.lambdas
  perc_w = tuple(lam.perc)

  def disc_apply(params, stats, x, y, key):
    out, new = disc.apply({"params": params, "batch_stats": stats}, x, y, train=True,
                          rngs={"dropout": key}, mutable=["batch_stats"])
    return out, new.get("batch_stats", stats)

  def train_step(state: TrainState, batch: dict, base_key: jax.Array):
    key = jax.random.fold_in(base_key, state.step)
    k_y, k_g, k_d0, k_d1, k_d2, k_aug = jax.random.split(key, 6)
    x_gt, y_gt = batch["image"], batch["label"]
    if config.augment.color_jitter:
      x_gt = color_jitter(k_aug, x_gt)
    y_gen = jax.random.randint(k_y, y_gt.shape, 0, config.model.n_classes)

    def g_loss_fn(g_params):
      out, g_new = cgn.apply({"params": g_params, "batch_stats": state.g_stats}, y_gen, k_g,
                             train=True, mutable=["batch_stats"])
      x_gen = compose(out["mask"], out["foreground"], out["background"])
      # Like torch, the generator's pass through D (train mode) also moves D's BN running stats.
      validity, d_stats = disc_apply(state.d_params, state.d_stats, x_gen, y_gen, k_d0)
      terms = {"g_adv": losses.adversarial_mse_loss(validity, True),
               "g_binary": losses.binary_loss(out["mask"], lam.mask),
               "g_perc": losses.perceptual_loss(features_fn, x_gen, x_gt, style_weights=perc_w)[0],
               # The [Re] SSIM extra; unlike their code (a detached copy), its gradient reaches G.
               "g_ssim": (lam.ssim * losses.ssim_loss(x_gen, x_gt) if lam.ssim
                          else jnp.zeros((), jnp.float32))}
      total = sum(terms.values())
      return total, (terms, g_new["batch_stats"], d_stats, x_gen)

    (g_total, (g_terms, g_stats, d_stats, x_gen)), g_grads = jax.value_and_grad(
        g_loss_fn, has_aux=True)(state.g_params)
    g_updates, g_opt = tx_g.update(g_grads, state.g_opt, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_updates)

    x_fake = jax.lax.stop_gradient(x_gen)  # the authors' x_gen.detach(): made before G's update

    def d_loss_fn(d_params):
      v_real, stats = disc_apply(d_params, d_stats, x_gt, y_gt, k_d1)
      v_fake, stats = disc_apply(d_params, stats, x_fake, y_gen, k_d2)
      real = losses.adversarial_mse_loss(v_real, True)
      fake = losses.adversarial_mse_loss(v_fake, False)
      return (real + fake) / 2, (real, fake, stats)

    (d_total, (d_real, d_fake, d_stats)), d_grads = jax.value_and_grad(
        d_loss_fn, has_aux=True)(state.d_params)
    d_updates, d_opt = tx_d.update(d_grads, state.d_opt, state.d_params)
    d_params = optax.apply_updates(state.d_params, d_updates)

    new_state = TrainState(step=state.step + 1, g_params=g_params, g_stats=g_stats,
                           d_params=d_params, d_stats=d_stats, g_opt=g_opt, d_opt=d_opt)
    metrics = TrainMetrics.single_from_model_output(
        **g_terms, g_total=g_total, d_real=d_real, d_fake=d_fake, d_total=d_total)
    return new_state, metrics

  return train_step


class EpochBatches:
  """Deterministic minibatches: epoch e uses permutation ``default_rng([seed, e])``; the last
  incomplete batch is dropped (the authors' sizes divide exactly: 60000/16, 50000/16)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, encoding: str, batch_size: int, seed: int):
    self.images, self.labels, self.encoding = images, labels, encoding
    self.batch_size, self.seed = batch_size, seed
    self.steps_per_epoch = len(labels) // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch size {batch_size} exceeds the {len(labels)} training images")
    self._epoch, self._perm = -1, None

  def batch(self, step: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
    idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
    return {"image": storage.decode_images(self.images[idx], self.encoding),
            "label": self.labels[idx].astype(np.int32)}


def load_training_data(config, workdir: str) -> EpochBatches:
  out = config.dataset_dir or os.path.join(workdir, "data", config.dataset)
  limit = config.dataset_limit if config.dataset_limit > 0 else None
  build.build_variant(config.dataset, config.data_dir, out, seed=config.data_seed, limit=limit)
  manifest = storage.read_manifest(out)
  images, labels = storage.read_split(out, "train", decode=False)
  return EpochBatches(images, labels[manifest["target"]], manifest["image"]["encoding"],
                      config.train.batch_size, config.seed)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) the MNIST CGN in ``workdir``; returns the final state."""
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.create_mesh(jax.devices()[:config.num_devices] if config.num_devices > 0 else None)
  parallel.check_batch_size(config.train.batch_size, mesh)
  data = load_training_data(config, workdir)
  num_steps = (config.train.num_steps if config.train.num_steps > 0
               else config.train.epochs * data.steps_per_epoch)

  cgn, disc = create_models(config)
  tx_g, tx_d = create_optimizers(config)
  features_fn = vgg.load_features_fn(config.vgg_checkpoint, os.path.join(workdir, "converted"),
                                     jax.random.key(config.seed + 1))
  state = create_train_state(config, cgn, disc, tx_g, tx_d, jax.random.key(config.seed))
  ckpt = checkpoints.TrainCheckpointer(workdir, config.log.keep_checkpoints, config.log.checkpoint_every)
  state, start = ckpt.restore_or(state)
  if start:
    print(f"resuming from step {start} in {workdir}")
  else:
    logging.info("%s", parameter_overview.get_parameter_overview(state.g_params))

  repl = parallel.replicated(mesh)
  state = jax.device_put(state, repl)
  step_fn = jax.jit(make_train_step(config, cgn, disc, tx_g, tx_d, features_fn),
                    in_shardings=(repl, parallel.batch_sharding(mesh), repl),
                    out_shardings=(repl, repl), donate_argnums=(0,))
  base_key = jax.random.key(config.seed + 2)
  writer = MetricWriter(workdir, tensorboard=config.log.tensorboard)
  sheets = os.path.join(workdir, "samples")
  acc, t0, last = None, time.time(), start
  bar = tqdm(total=num_steps, initial=start, desc=f"cgn {config.dataset}", unit="step",
             disable=jax.process_index() != 0 or not config.log.progress_bar)
  for step in range(start, num_steps):
    state, m = step_fn(state, parallel.shard_batch(data.batch(step), mesh), base_key)
    acc = m if acc is None else acc.merge(m)
    done = step + 1
    if done % config.log.every_steps == 0 or done == num_steps:
      scalars = acc.compute()  # the only host sync of the loop
      scalars["steps_per_sec"] = (done - last) / max(time.time() - t0, 1e-9)
      writer.write_scalars(done, scalars)
      bar.set_postfix({k: f"{float(v):.3f}" for k, v in scalars.items()
                       if k in ("g_adv", "g_binary", "g_perc", "d_total")})
      acc, t0, last = None, time.time(), done
    if config.log.sample_every and (done % config.log.sample_every == 0 or done == num_steps):
      variables = {"params": state.g_params, "batch_stats": state.g_stats}
      sample_sheet(cgn, variables, jax.random.key(config.seed), f"{sheets}/step_{done:07d}.png",
                   n_per_class=3, n_classes=config.model.n_classes, train=True)
    ckpt.maybe_save(done, state, force=done == num_steps)
    bar.update(1)
  bar.close()
  ckpt.close()
  writer.flush()
  if jax.process_index() == 0:
    export_generator(state, cgn, os.path.join(workdir, "generator"), config)
  return state


def export_generator(state: TrainState, cgn: MnistCGN, path: str, config) -> str:
  """Writes the trained generator as a converted-style checkpoint that the generation job reads.

  An older export at ``path`` is replaced only after the new one is complete.
  """
  variables = jax.tree_util.tree_map(np.asarray, {"params": state.g_params, "batch_stats": state.g_stats})
  cfg = {k: getattr(cgn, k) for k in ("n_classes", "latent_sz", "ngf", "img_sz", "init_type", "init_gain")}
  return checkpoints.replace_variables(path, variables, {
      "family": "mnist_cgn", "model_config": cfg, "source": "cgn_jax.jobs.train_cgn_mnist",
      "dataset": config.dataset, "step": int(state.step)})
