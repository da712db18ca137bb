"""Training of the MNIST CGN against a conditional discriminator (the authors' mnists/train_cgn.py).

Each step is one jit-compiled function: a generator update (adversarial MSE + binary mask loss +
VGG16 Gram/style loss [+ optional SSIM]) followed by a discriminator update on real and detached
fake images, with the batch sharded over every device. Randomness is ``fold_in(seed, step)``, drawn
by ``draw_step_inputs`` alone; data order is a per-epoch permutation of the seed, so a resumed run
continues the same trajectory.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cgn_jax import checkpoints, losses, parallel, training
from cgn_jax.errors import check_choice
from cgn_jax.composer import compose
from cgn_jax.data import batches, mnist_variants
from cgn_jax.data.sheets import mnist_cgn_sheet
from cgn_jax.data.augment import color_jitter
from cgn_jax.models import vgg
from cgn_jax.models.mnist_cgn import DiscConv, DiscLin, MnistCGN, crop_offsets

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


def draw_step_inputs(key: jax.Array, batch: dict, config: ml_collections.ConfigDict) -> dict:
  """Every random draw of one training step, in one place.

  The authors' ``fit()`` draws ``y_gen`` and, inside ``cgn(y_gen)``, the noise ``u`` and the
  foreground and background crop offsets; the rest are keys for dropout (DiscLin) and the [Re]
  colour jitter. The step consumes only this dict, so the parity test can replay torch's recorded
  draws through the job's own step.
  """
  k_y, k_g, k_d0, k_d1, k_d2, k_aug = jax.random.split(key, 6)
  m = config.model
  n = batch["label"].shape[0]
  ks = jax.random.split(k_g, 7)  # the split MnistCGN.__call__ makes, so sampling and training agree
  return {"y_gen": jax.random.randint(k_y, (n,), 0, m.n_classes),
          "u": jax.random.normal(ks[0], (n, m.latent_sz)),
          "fg_offsets": crop_offsets(ks[5], n, m.img_sz, m.img_sz),
          "bg_offsets": crop_offsets(ks[6], n, m.img_sz, m.img_sz),
          "dropout": (k_d0, k_d1, k_d2), "jitter": k_aug}


def make_train_step(config, cgn, disc, tx_g, tx_d, features_fn, draw=draw_step_inputs):
  """Returns ``train_step(state, batch, key, constants) -> (state, losses)`` (not yet jitted).

  ``draw(key, batch, config)`` supplies the step's random draws (``draw_step_inputs``).
  """
  lam = config.lambdas
  perc_w = tuple(lam.perc)

  def disc_apply(params, stats, x, y, key):
    out, new = disc.apply({"params": params, "batch_stats": stats}, x, y, train=True,
                          rngs={"dropout": key}, mutable=["batch_stats"])
    return out, new.get("batch_stats", stats)

  def train_step(state: TrainState, batch: dict, base_key: jax.Array, constants=None):
    del constants
    draws = draw(jax.random.fold_in(base_key, state.step), batch, config)
    k_d0, k_d1, k_d2 = draws["dropout"]
    x_gt, y_gt, y_gen = batch["image"], batch["label"], draws["y_gen"]
    if config.augment.color_jitter:
      x_gt = color_jitter(draws["jitter"], x_gt)

    def g_loss_fn(g_params):
      out, g_new = cgn.apply({"params": g_params, "batch_stats": state.g_stats}, y_gen, draws["u"],
                             draws["fg_offsets"], draws["bg_offsets"], train=True,
                             method=MnistCGN.from_draws, mutable=["batch_stats"])
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
    return new_state, {**g_terms, "g_total": g_total, "d_real": d_real, "d_fake": d_fake,
                       "d_total": d_total}

  return train_step


def load_training_data(config: ml_collections.ConfigDict, workdir: str) -> batches.EpochBatches:
  images, labels, encoding = batches.load_split(batches.variant_dir(config, workdir), "train")
  return batches.EpochBatches(images, labels, encoding, config.train.batch_size, config.seed)


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """The config's named choices, checked before anything is built or written."""
  check_choice(config, "dataset", mnist_variants.VARIANTS)
  check_choice(config, "model.disc", ("linear", "conv"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) the MNIST CGN in ``workdir``; returns the final state."""
  check_inputs(config)

  def build(mesh) -> training.Task:
    parallel.check_batch_size(config.train.batch_size, mesh)
    data = load_training_data(config, workdir)
    cgn, disc = create_models(config)
    tx_g, tx_d = create_optimizers(config)
    features_fn = vgg.load_features_fn(config.vgg_checkpoint, os.path.join(workdir, "converted"),
                                       jax.random.key(config.seed + 1))

    def sheet(state: TrainState, step: int) -> None:
      variables = {"params": state.g_params, "batch_stats": state.g_stats}
      mnist_cgn_sheet(cgn, variables, jax.random.key(config.seed),
                      os.path.join(workdir, "samples", f"step_{step:07d}.png"), n_per_class=3,
                      n_classes=config.model.n_classes, train=True)

    return training.Task(
        name=f"cgn {config.dataset}",
        state=create_train_state(config, cgn, disc, tx_g, tx_d, jax.random.key(config.seed)),
        step_fn=make_train_step(config, cgn, disc, tx_g, tx_d, features_fn), metrics=LOSS_NAMES,
        num_steps=(config.train.num_steps if config.train.num_steps > 0
                   else config.train.epochs * data.steps_per_epoch),
        key=jax.random.key(config.seed + 2), batches=data,
        params=lambda s: {"generator": s.g_params, "discriminator": s.d_params},
        hooks=[training.Hook(config.log.sample_every, sheet, at_end=bool(config.log.sample_every))],
        export=lambda s: export_generator(s, cgn, os.path.join(workdir, "generator"), config),
        bar_keys=("g_adv", "g_binary", "g_perc", "d_total"))

  return training.run(config, workdir, build)


def export_generator(state: TrainState, cgn: MnistCGN, path: str, config) -> str:
  """Writes the trained generator as a converted-style checkpoint that the generation job reads.

  An older export at ``path`` is replaced only after the new one is complete.
  """
  variables = jax.tree_util.tree_map(np.asarray, {"params": state.g_params, "batch_stats": state.g_stats})
  cfg = {k: getattr(cgn, k) for k in ("n_classes", "latent_sz", "ngf", "img_sz", "init_type", "init_gain")}
  return checkpoints.replace_variables(path, variables, {
      "family": "mnist_cgn", "model_config": cfg, "source": "cgn_jax.jobs.train_cgn_mnist",
      "dataset": config.dataset, "step": int(state.step)})
