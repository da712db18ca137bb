"""Training of the class-conditional GAN baseline on an MNIST variant ([Re]'s mnists/train_gan.py).

The model-specific parts over ``cgn_jax.training``: each step is one jit-compiled function, a
generator update (the adversarial loss of ``D(G(u, y_gen), y_gen)`` against "real") followed by a
discriminator update on the real batch and the detached fakes of that same generator pass, the
discriminator loss being ``(L(real, 1) + L(fake, 0)) / 2``. As in [Re]: labels ``y_gen`` uniform,
``BCEWithLogitsLoss`` (``train.loss="mse"`` gives the CGN's LSGAN loss), Adam(2e-4, 0.5, 0.999) on
both nets, batch 16, the CGN's ``DiscLin``. Randomness is ``fold_in(seed, step)`` and the data order
a per-epoch permutation, so a resumed run continues the same trajectory. The generator is exported
to ``<workdir>/generator`` (family ``mnist_gan``), which ``generate_mnist`` samples from.
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

from cgn_jax import checkpoints, parallel, training
from cgn_jax.data import batches, mnist_variants
from cgn_jax.data.sheets import save_image_grid
from cgn_jax.errors import check_choice
from cgn_jax.models import mnist_gan
from cgn_jax.models.mnist_cgn import DiscLin
from cgn_jax.models.mnist_gan import MnistGANGenerator

LOSS_NAMES = ("g_adv", "d_real", "d_fake", "d_total")
LOSSES = ("bce", "mse")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  g_params: Any
  g_stats: Any
  d_params: Any
  g_opt: Any
  d_opt: Any


def adversarial_loss(kind: str, logits: jax.Array, real: bool) -> jax.Array:
  """``BCEWithLogitsLoss`` (``bce``) or ``MSELoss`` (``mse``) against all-ones / all-zeros."""
  target = jnp.full_like(logits, 1.0 if real else 0.0)
  if kind == "bce":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))
  return jnp.mean(jnp.square(logits - target))


def create_models(config: ml_collections.ConfigDict) -> tuple[MnistGANGenerator, DiscLin]:
  m = config.model
  return (MnistGANGenerator(n_classes=m.n_classes, latent_sz=m.latent_sz, ngf=m.ngf),
          DiscLin(n_classes=m.n_classes, ndf=m.ndf))


def create_train_state(config, gen, disc, tx_g, tx_d, key) -> TrainState:
  kg, kd = jax.random.split(key)
  g_vars = mnist_gan.init_variables(gen, kg)
  img = jnp.zeros((2, mnist_gan.IMG_SZ, mnist_gan.IMG_SZ, 3))
  d_vars = jax.jit(lambda k: disc.init(k, img, jnp.zeros((2,), jnp.int32)))(kd)
  return TrainState(step=jnp.zeros((), jnp.int32), g_params=g_vars["params"],
                    g_stats=g_vars["batch_stats"], d_params=d_vars["params"],
                    g_opt=tx_g.init(g_vars["params"]), d_opt=tx_d.init(d_vars["params"]))


def make_train_step(config, gen: MnistGANGenerator, disc: DiscLin, tx_g, tx_d):
  """Returns ``train_step(state, batch, key, constants) -> (state, losses)`` (not yet jitted)."""
  kind = config.train.loss

  def d_apply(params, x, y, key):
    return disc.apply({"params": params}, x, y, train=True, rngs={"dropout": key})

  def train_step(state: TrainState, batch: dict, base_key: jax.Array, constants=None):
    del constants
    k_y, k_u, k_d0, k_d1, k_d2 = jax.random.split(jax.random.fold_in(base_key, state.step), 5)
    x_gt, y_gt = batch["image"], batch["label"]
    n = y_gt.shape[0]
    y_gen = jax.random.randint(k_y, (n,), 0, config.model.n_classes)
    u = jax.random.normal(k_u, (n, config.model.latent_sz))

    def g_loss_fn(g_params):
      x_gen, new = gen.apply({"params": g_params, "batch_stats": state.g_stats}, y_gen, u,
                             train=True, mutable=["batch_stats"])
      loss = adversarial_loss(kind, d_apply(state.d_params, x_gen, y_gen, k_d0), True)
      return loss, (new["batch_stats"], x_gen)

    (g_adv, (g_stats, x_gen)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state.g_params)
    g_updates, g_opt = tx_g.update(g_grads, state.g_opt, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_updates)
    x_fake = jax.lax.stop_gradient(x_gen)  # [Re]'s x_gen.detach(): made before G's update

    def d_loss_fn(d_params):
      real = adversarial_loss(kind, d_apply(d_params, x_gt, y_gt, k_d1), True)
      fake = adversarial_loss(kind, d_apply(d_params, x_fake, y_gen, k_d2), False)
      return (real + fake) / 2, (real, fake)

    (d_total, (d_real, d_fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
        state.d_params)
    d_updates, d_opt = tx_d.update(d_grads, state.d_opt, state.d_params)
    d_params = optax.apply_updates(state.d_params, d_updates)
    new_state = TrainState(step=state.step + 1, g_params=g_params, g_stats=g_stats,
                           d_params=d_params, g_opt=g_opt, d_opt=d_opt)
    return new_state, {"g_adv": g_adv, "d_real": d_real, "d_fake": d_fake, "d_total": d_total}

  return train_step


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """The config's named choices, checked before anything is built or written."""
  check_choice(config, "dataset", mnist_variants.VARIANTS)
  check_choice(config, "train.loss", LOSSES)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) the GAN in ``workdir`` and exports ``<workdir>/generator``."""
  check_inputs(config)

  def build(mesh) -> training.Task:
    parallel.check_batch_size(config.train.batch_size, mesh)
    images, labels, encoding = batches.load_split(batches.variant_dir(config, workdir), "train")
    data = batches.EpochBatches(images, labels, encoding, config.train.batch_size, config.seed)
    gen, disc = create_models(config)
    b1, b2 = config.train.betas
    # torch.optim.Adam defaults otherwise ([Re]'s Optimizers.set, as for the CGN).
    tx_g = optax.adam(config.train.lr, b1, b2, eps=1e-8)
    tx_d = optax.adam(config.train.lr, b1, b2, eps=1e-8)
    sheet_fn = jax.jit(lambda v, y, k: gen.apply(v, y, k, True, method=MnistGANGenerator.sample,
                                                 mutable=["batch_stats"])[0])

    def sheet(state: TrainState, step: int) -> None:
      # Rows = classes; batch statistics, as [Re]'s sample_image (the generator in train mode).
      ys = np.repeat(np.arange(config.model.n_classes), 8).astype(np.int32)
      x = sheet_fn({"params": state.g_params, "batch_stats": state.g_stats}, ys,
                   jax.random.key(config.seed))
      save_image_grid(os.path.join(workdir, "samples", f"step_{step:07d}.png"), np.asarray(x),
                      nrow=8, scale=2)

    return training.Task(
        name=f"gan {config.dataset}",
        state=create_train_state(config, gen, disc, tx_g, tx_d, jax.random.key(config.seed)),
        step_fn=make_train_step(config, gen, disc, tx_g, tx_d), metrics=LOSS_NAMES,
        num_steps=(config.train.num_steps if config.train.num_steps > 0
                   else config.train.epochs * data.steps_per_epoch),
        key=jax.random.key(config.seed + 2), batches=data,
        params=lambda s: {"generator": s.g_params, "discriminator": s.d_params},
        hooks=[training.Hook(config.log.sample_every, sheet, at_end=bool(config.log.sample_every))],
        export=lambda s: export_generator(s, gen, os.path.join(workdir, "generator"), config),
        bar_keys=LOSS_NAMES)

  return training.run(config, workdir, build)


def export_generator(state: TrainState, gen: MnistGANGenerator, path: str, config) -> str:
  """Writes the generator (params + BN running stats) as a directory ``mnist_gan.load`` reads."""
  variables = jax.tree_util.tree_map(np.asarray, {"params": state.g_params,
                                                  "batch_stats": state.g_stats})
  cfg = {k: getattr(gen, k) for k in ("n_classes", "latent_sz", "ngf")}
  return checkpoints.replace_variables(path, variables, {
      "family": mnist_gan.FAMILY, "model_config": cfg, "source": "cgn_jax.jobs.train_gan_mnist",
      "dataset": config.dataset, "step": int(state.step)})
