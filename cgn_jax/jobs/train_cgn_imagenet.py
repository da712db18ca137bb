"""Fine-tuning of the ImageNet CGN's three mechanisms (the authors' imagenet/train_cgn.py).

There is no dataset: every sample is drawn from the generators themselves (a class, a noise vector),
and the frozen BigGAN's image of it is the reconstruction target. One *episode* is one optimizer
update over ``micro_batch_size * accum_steps`` samples, compiled as a single function: a
``lax.scan`` over micro-batches sums the gradients (and, like torch, runs the trainable
mechanisms' spectral-norm power iteration once per micro-batch), then one Adam per mechanism with
its own learning rate. Each micro-batch is sharded over the ``data`` axis of a device mesh.

Labels and noise are drawn in-graph from ``fold_in(fold_in(seed, episode), example index)``: every
device (hence every host of a multi-host run) draws only its own rows, with distinct keys, and the
draw does not depend on the device count or on how the effective batch is split into micro-batches.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from cgn_jax import checkpoints, losses, parallel, training
from cgn_jax.errors import check_choice
from cgn_jax.data.sheets import save_image_grid
from cgn_jax.models import biggan as biggan_lib
from cgn_jax.models import imagenet_cgn, u2net as u2net_lib, vgg
from cgn_jax.models.imagenet_cgn import MECHANISMS, CGNConfig, ImagenetCGN

LOSS_NAMES = ("l1", "perc", "binary", "mask", "perc_text", "bg", "total")  # logged as loss_<name>


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # episodes done
  params: Any            # the three mechanisms only
  batch_stats: Any       # spectral-norm u/v and BigGAN/U2-Net statistics of all five parts
  opt: Any


def _missing(what: str, field: str, family: str, example: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"config.{field} is empty: the ImageNet CGN starts from a pretrained {what}. Convert it with "
      f"`python -m converters {family} {example} DIR` and pass --config.{field}=DIR (or "
      f"--config.allow_random_init=True to test the plumbing with random weights)")


def initial_variables(config: ml_collections.ConfigDict, cfg: CGNConfig, workdir: str) -> dict:
  """The whole CGN's variables: a converted cgn.pth / exported CGN, or the authors' initialisation
  (all four generators from one pretrained BigGAN, plus the pretrained U2-Net)."""
  cache = os.path.join(workdir, "converted")
  if config.cgn_checkpoint:
    model, variables = imagenet_cgn.load(config.cgn_checkpoint, cache)
    if model.config != cfg:
      raise checkpoints.CheckpointError(f"config.cgn_checkpoint holds a different architecture "
                                        f"({model.config}); set config.model to match it")
    return variables
  # (what, config field, loader, its random part, mismatch message or "", how to convert it)
  parts = (("BigGAN-deep-256", "biggan_checkpoint", biggan_lib.load, "biggan_GT",
            lambda m: "" if m.config == cfg.biggan else f"a different BigGAN ({m.config}); set "
            "config.model to match it", ("biggan", "biggan-deep-256/pytorch_model.bin")),
           ("U2-Net", "u2net_checkpoint", u2net_lib.load, "u2net",
            lambda m: "" if m.variant == cfg.u2net_variant else f"a {m.variant}; set "
            "--config.model.u2net_variant accordingly", ("u2net", "u2net.pth")))
  loaded, random = [], None
  for what, field, load, part, mismatch, (family, example) in parts:
    if config[field]:
      module, variables = load(config[field], cache)
      if mismatch(module):
        raise checkpoints.CheckpointError(f"config.{field} is {mismatch(module)}")
    elif config.allow_random_init:
      logging.warning("random %s weights (config.allow_random_init)", what)
      random = random or imagenet_cgn.random_variables(cfg, config.seed)
      variables = {col: random[col][part] for col in ("params", "batch_stats")}
    else:
      raise _missing(what, field, family, example)
    loaded.append(variables)
  gan, mask_net = loaded
  return imagenet_cgn.assemble(gan, mask_net)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """One Adam per mechanism (the authors' ``Optimizers``), each with its learning rate."""
  t = config.train
  lrs = {"f_shape": t.lr_shape, "f_text": t.lr_texture, "f_bg": t.lr_bg}
  # torch.optim.Adam's defaults besides lr/betas: eps 1e-8 added to sqrt(v_hat), no weight decay.
  return optax.multi_transform({k: optax.adam(lr, b1=t.b1, b2=t.b2, eps=1e-8) for k, lr in lrs.items()},
                               {k: k for k in MECHANISMS})


# The lambdas that are runtime inputs of the compiled step (config.lambdas minus the interval).
WEIGHT_NAMES = ("l1", "perc", "binary", "mask", "text", "bg")


def loss_weights(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """``config.lambdas`` as float32 arrays, passed to the jitted step as data rather than baked into
  it: runs that differ only in their weights (the loss ablation's rows) run one compiled program,
  which the persistent compilation cache then serves to every run after the first."""
  return {n: np.asarray(config.lambdas[n], np.float32) for n in WEIGHT_NAMES}


def cgn_losses(out: dict, features_fn, texture_keys: jax.Array, config,
               weights: dict | None = None) -> dict[str, jax.Array]:
  """The six generator losses with the authors' weights; each is a batch mean (train_cgn.py fit).

  ``weights`` (``loss_weights``, possibly traced) replaces ``config.lambdas``' values; then every
  term is computed, and a zero weight gives an exact 0 (0 * a finite loss: the mask is clamped away
  from {0, 1}, so the binary entropy and its gradient stay finite). Without it, the config's Python
  numbers are used. Either way a perceptual layer whose config weight is 0 is skipped.
  """
  lam, tex = config.lambdas, config.texture
  w = {n: lam[n] for n in WEIGHT_NAMES} if weights is None else weights
  # A traced vector -> its scalars, except a layer whose config weight is 0 stays a static 0: its
  # VGG block is then not run at all (the texture loss's [0, 5, 5, 0] skips block 4). Rows that
  # zero a whole vector (no_text, no_rec) thus compile their own, cheaper program.
  layers = lambda v, cfg: tuple(0.0 if float(cfg[k]) == 0.0 else v[k] for k in range(len(v)))
  terms = {
      "l1": losses.reconstruction_loss(out["x_gen"], out["x_gt"], w["l1"], "l1"),
      "perc": losses.perceptual_loss(features_fn, out["x_gen"], out["x_gt"],
                                     style_weights=layers(w["perc"], lam.perc))[0],
      "binary": losses.binary_loss(out["mask"], w["binary"]),
      "mask": jnp.mean(losses.mask_loss(out["mask"], w["mask"], tuple(lam.mask_interval))),
      "perc_text": losses.texture_loss(
          features_fn, texture_keys, out["x_gt"], out["mask"], out["foreground"],
          style_weights=layers(w["text"], lam.text), patch_size=(tex.patch_size,) * 2,
          sample_size=tex.sample_size, n_up=tex.n_up, work_size=(tex.work_size,) * 2)[0],
      "bg": jnp.mean(losses.background_loss(out["bg_mask"], w["bg"])),
  }
  terms["total"] = sum(terms.values())
  return terms


def draw_inputs(key: jax.Array, index: jax.Array, z_dim: int, num_classes: int, truncation: float):
  """Per example: a class (the same for all three mechanisms, as ``CGN.get_inp``), truncated noise
  (``truncnorm(-2, 2) * truncation``) and a key for the texture loss's patch draw."""
  def one(i):
    k = jax.random.split(jax.random.fold_in(key, i), 3)
    y = jax.random.randint(k[0], (), 0, num_classes)
    z = biggan_lib.truncated_noise(k[1], (z_dim,), truncation)
    return z, y, k[2]
  return jax.vmap(one)(index)


def make_grad_fn(config: ml_collections.ConfigDict, model: ImagenetCGN, features_fn, mesh=None,
                 micro_batch_size: int | None = None, accum_steps: int | None = None) -> Callable:
  """``grads(params, batch_stats, frozen, episode_key, weights=None) -> (mean gradient, batch_stats,
  mean terms)`` over ``micro_batch_size * accum_steps`` examples, summed micro-batch by micro-batch
  in a scan; ``weights`` as in ``cgn_losses`` (None: the config's lambdas, baked in)."""
  b = micro_batch_size or config.train.micro_batch_size
  k_acc = accum_steps or config.train.accum_steps
  gan = model.config.biggan
  truncation = float(config.truncation)
  rows = parallel.batch_sharding(mesh) if mesh is not None else None

  def loss_fn(params, stats, frozen, z, y, tex_keys, weights):
    variables = {"params": {**params, **frozen}, "batch_stats": stats}
    out, new = model.apply(variables, z, y, y, y, truncation, train=True, mutable=["batch_stats"])
    terms = cgn_losses(out, features_fn, tex_keys, config, weights)
    return terms["total"], (terms, new["batch_stats"])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def grads(params, stats, frozen, episode_key, weights=None):
    def micro(carry, m):
      g_sum, stats, t_sum = carry
      index = m * b + jnp.arange(b)
      if rows is not None:  # each device draws and runs its own rows
        index = jax.lax.with_sharding_constraint(index, rows)
      z, y, tex_keys = draw_inputs(episode_key, index, gan.z_dim, gan.num_classes, truncation)
      (_, (terms, stats)), g = grad_fn(params, stats, frozen, z, y, tex_keys, weights)
      return (jax.tree.map(jnp.add, g_sum, g), stats,
              {n: t_sum[n] + terms[n] for n in LOSS_NAMES}), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    t0 = {n: jnp.zeros((), jnp.float32) for n in LOSS_NAMES}
    (g_sum, stats, t_sum), _ = jax.lax.scan(micro, (zeros, stats, t0), jnp.arange(k_acc))
    return (jax.tree.map(lambda g: g / k_acc, g_sum), stats,
            {n: t / k_acc for n, t in t_sum.items()})

  return grads


def make_train_step(config: ml_collections.ConfigDict, model: ImagenetCGN,
                    tx: optax.GradientTransformation, features_fn, mesh=None) -> Callable:
  """``step(state, batch, key, constants) -> (state, losses)``: one episode, one update (there is
  no batch: the generators draw their own inputs); ``constants`` is ``step_constants(...)``."""
  grads_fn = make_grad_fn(config, model, features_fn, mesh)

  def step(state: TrainState, batch: None, key: jax.Array, constants: dict):
    del batch
    grads, stats, terms = grads_fn(state.params, state.batch_stats, constants["frozen"],
                                   jax.random.fold_in(key, state.step), constants["loss_weights"])
    # The authors' summed-gradient scale on top of the mean (see configs/imagenet.py).
    grads = jax.tree.map(lambda g: g * config.train.grad_scale, grads)
    updates, opt = tx.update(grads, state.opt, state.params)
    new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                     batch_stats=stats, opt=opt)
    return new, {f"loss_{n}": t for n, t in terms.items()}

  return step


def step_constants(config: ml_collections.ConfigDict, frozen: Any) -> dict:
  """The train step's inputs that never change during a run: the frozen parts' params and the
  loss weights (see ``loss_weights``)."""
  return {"frozen": frozen, "loss_weights": loss_weights(config)}


def sample_sheet(model: ImagenetCGN, variables: dict, u_fixed: np.ndarray, classes, truncation: float,
                 path: str, fwd=None) -> str:
  """The authors' class sheet: per class a row premask | mask | foreground | background |
  composite | x_gt, all from the fixed noise, in eval mode."""
  ys = np.asarray(classes, np.int32)
  z = np.repeat(u_fixed, len(ys), 0)
  fwd = fwd or jax.jit(lambda v, z, y: model.apply(v, z, y, y, y, truncation))
  out = jax.device_get(fwd(variables, z, ys))
  mask = 2 * out["mask"] - 1  # [0, 1] -> the grid's [-1, 1]
  cols = [out["premask"], np.repeat(mask, 3, -1), out["foreground"], out["background"],
          out["x_gen"], out["x_gt"]]
  images = np.stack(cols, 1).reshape((-1,) + cols[0].shape[1:])
  return save_image_grid(path, images, nrow=len(cols))


def export_cgn(path: str, variables: dict, cfg: CGNConfig, step: int) -> str:
  """The whole trained CGN as a converted-style checkpoint (family ``imagenet_cgn``), replaced only
  once the new copy is complete; the generation job reads it."""
  return checkpoints.replace_variables(path, jax.tree.map(np.asarray, variables), {
      "family": "imagenet_cgn", "model_config": cfg.to_dict(),
      "source": "cgn_jax.jobs.train_cgn_imagenet", "step": int(step)})


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """The config's named choices, checked before anything is built or written."""
  check_choice(config, "model.u2net_variant", ("u2net", "u2netp"))
  check_choice(config, "model.dtype", ("float32", "bfloat16"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) the ImageNet CGN in ``workdir``; returns the final state."""
  check_inputs(config)

  def build(mesh) -> training.Task:
    parallel.check_batch_size(config.train.micro_batch_size, mesh, "train.micro_batch_size")
    cfg = imagenet_cgn.config_from_fields(config.model)
    model = ImagenetCGN(cfg, dtype=jnp.dtype(config.model.dtype))
    u_fixed = imagenet_cgn.load_fixed_noise(config.u_fixed, cfg.biggan.z_dim)
    variables = initial_variables(config, cfg, workdir)
    trainable, frozen = imagenet_cgn.split_trainable(variables["params"])
    features_fn = vgg.load_features_fn(config.vgg_checkpoint, os.path.join(workdir, "converted"),
                                       jax.random.key(config.seed + 2))
    tx = create_optimizer(config)
    sheet_fwd = jax.jit(lambda v, z, y: model.apply(v, z, y, y, y, float(config.truncation)))
    whole = lambda s, frozen: {"params": {**s.params, **frozen}, "batch_stats": s.batch_stats}
    local_frozen = training.host_copy(frozen)  # for the hooks and the export on process 0

    def sheet(state: TrainState, episode: int) -> None:
      sample_sheet(model, whole(state, local_frozen), u_fixed, config.sheet_classes,
                   float(config.truncation),
                   os.path.join(workdir, "samples", f"cls_sheet_ep_{episode:07d}.png"), sheet_fwd)

    return training.Task(
        name="cgn imagenet", unit="episode",
        state=TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                         batch_stats=variables["batch_stats"], opt=tx.init(trainable)),
        step_fn=make_train_step(config, model, tx, features_fn, mesh),
        metrics=[f"loss_{n}" for n in LOSS_NAMES],
        num_steps=config.train.episodes, key=jax.random.key(config.seed + 3),
        constants=step_constants(config, frozen),
        hooks=[training.Hook(config.log.sample_every, sheet, at_end=bool(config.log.sample_every))],
        export=lambda s: export_cgn(os.path.join(workdir, "cgn"), whole(s, local_frozen), cfg,
                                    int(s.step)),
        bar_keys=tuple(f"loss_{n}" for n in LOSS_NAMES))

  return training.run(config, workdir, build)
