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
import time
from typing import Any, Callable

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
from cgn_jax.data.sheets import save_image_grid
from cgn_jax.models import biggan as biggan_lib
from cgn_jax.models import imagenet_cgn, init as inits, u2net as u2net_lib, vgg
from cgn_jax.models.imagenet_cgn import MECHANISMS, CGNConfig, ImagenetCGN
from cgn_jax.writers import MetricWriter

LOSS_NAMES = ("l1", "perc", "binary", "mask", "perc_text", "bg", "total")

# Logged as loss_<name>: clu reserves the keyword ``mask`` in ``single_from_model_output``.
TrainMetrics = clu_metrics.Collection.create(
    **{f"loss_{n}": clu_metrics.Average.from_output(f"loss_{n}") for n in LOSS_NAMES})


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # episodes done
  params: Any            # the three mechanisms only
  batch_stats: Any       # spectral-norm u/v and BigGAN/U2-Net statistics of all five parts
  opt: Any


def model_config(config: ml_collections.ConfigDict) -> CGNConfig:
  m = config.model
  layers = tuple(tuple(l) for l in m.layers) or biggan_lib.PUBLISHED_LAYERS.get(m.output_dim)
  if layers is None:
    raise ValueError(f"config.model.output_dim={m.output_dim} has no published layout; "
                     f"set config.model.layers or use one of {sorted(biggan_lib.PUBLISHED_LAYERS)}")
  gan = biggan_lib.BigGANConfig(output_dim=m.output_dim, channel_width=m.channel_width,
                                layers=tuple((bool(u), int(i), int(o)) for u, i, o in layers),
                                attention_layer_position=m.attention_layer_position)
  return CGNConfig(gan, m.u2net_variant)


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
    variables, meta = checkpoints.load_or_convert(config.cgn_checkpoint, "imagenet_cgn", cache)
    stored = CGNConfig.from_dict(meta["model_config"])
    if stored != cfg:
      raise checkpoints.CheckpointError(
          f"config.cgn_checkpoint holds a different architecture ({stored}); set config.model to match it")
    return variables
  if config.biggan_checkpoint:
    gan, meta = checkpoints.load_or_convert(config.biggan_checkpoint, "biggan", cache)
    stored = biggan_lib.BigGANConfig.from_dict(meta["model_config"])
    if stored != cfg.biggan:
      raise checkpoints.CheckpointError(
          f"config.biggan_checkpoint is a different BigGAN ({stored}); set config.model to match it")
  elif config.allow_random_init:
    logging.warning("random BigGAN weights (config.allow_random_init)")
    gan = biggan_lib.init_variables(cfg.biggan, config.seed)
  else:
    raise _missing("BigGAN-deep-256", "biggan_checkpoint", "biggan", "biggan-deep-256/pytorch_model.bin")
  if config.u2net_checkpoint:
    mask_net, meta = checkpoints.load_or_convert(config.u2net_checkpoint, "u2net", cache)
    if meta["model_config"].get("variant") != cfg.u2net_variant:
      raise checkpoints.CheckpointError(
          f"config.u2net_checkpoint is a {meta['model_config'].get('variant')}; set "
          f"--config.model.u2net_variant accordingly")
  elif config.allow_random_init:
    logging.warning("random U2-Net weights (config.allow_random_init)")
    size = cfg.biggan.output_dim
    mask_net = inits.host_random_variables(u2net_lib.U2Net(cfg.u2net_variant),
                                           (jnp.zeros((1, size, size, 3)),),
                                           np.random.default_rng(config.seed + 1))
  else:
    raise _missing("U2-Net", "u2net_checkpoint", "u2net", "u2net.pth")
  return imagenet_cgn.assemble(gan, mask_net)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """One Adam per mechanism (the authors' ``Optimizers``), each with its learning rate."""
  t = config.train
  lrs = {"f_shape": t.lr_shape, "f_text": t.lr_texture, "f_bg": t.lr_bg}
  # torch.optim.Adam's defaults besides lr/betas: eps 1e-8 added to sqrt(v_hat), no weight decay.
  return optax.multi_transform({k: optax.adam(lr, b1=t.b1, b2=t.b2, eps=1e-8) for k, lr in lrs.items()},
                               {k: k for k in MECHANISMS})


def cgn_losses(out: dict, features_fn, texture_keys: jax.Array, config) -> dict[str, jax.Array]:
  """The six generator losses with the authors' weights; each is a batch mean (train_cgn.py fit)."""
  lam, tex = config.lambdas, config.texture
  terms = {
      "l1": losses.reconstruction_loss(out["x_gen"], out["x_gt"], lam.l1, "l1"),
      "perc": losses.perceptual_loss(features_fn, out["x_gen"], out["x_gt"],
                                     style_weights=tuple(lam.perc))[0],
      "binary": losses.binary_loss(out["mask"], lam.binary),
      "mask": jnp.mean(losses.mask_loss(out["mask"], lam.mask, tuple(lam.mask_interval))),
      "perc_text": losses.texture_loss(
          features_fn, texture_keys, out["x_gt"], out["mask"], out["foreground"],
          style_weights=tuple(lam.text), patch_size=(tex.patch_size,) * 2,
          sample_size=tex.sample_size, n_up=tex.n_up, work_size=(tex.work_size,) * 2)[0],
      "bg": jnp.mean(losses.background_loss(out["bg_mask"], lam.bg)),
  }
  terms["total"] = sum(terms.values())
  return terms


def draw_inputs(key: jax.Array, index: jax.Array, z_dim: int, num_classes: int, truncation: float):
  """Per example: a class (the same for all three mechanisms, as ``CGN.get_inp``), truncated noise
  (``truncnorm(-2, 2) * truncation``) and a key for the texture loss's patch draw."""
  def one(i):
    k = jax.random.split(jax.random.fold_in(key, i), 3)
    y = jax.random.randint(k[0], (), 0, num_classes)
    z = jax.random.truncated_normal(k[1], -2.0, 2.0, (z_dim,), jnp.float32) * truncation
    return z, y, k[2]
  return jax.vmap(one)(index)


def make_grad_fn(config: ml_collections.ConfigDict, model: ImagenetCGN, features_fn, mesh=None,
                 micro_batch_size: int | None = None, accum_steps: int | None = None) -> Callable:
  """``grads(params, batch_stats, frozen, episode_key) -> (mean gradient, batch_stats, mean terms)``
  over ``micro_batch_size * accum_steps`` examples, summed micro-batch by micro-batch in a scan."""
  b = micro_batch_size or config.train.micro_batch_size
  k_acc = accum_steps or config.train.accum_steps
  gan = model.config.biggan
  truncation = float(config.truncation)
  rows = parallel.batch_sharding(mesh) if mesh is not None else None

  def loss_fn(params, stats, frozen, z, y, tex_keys):
    variables = {"params": {**params, **frozen}, "batch_stats": stats}
    out, new = model.apply(variables, z, y, y, y, truncation, train=True, mutable=["batch_stats"])
    terms = cgn_losses(out, features_fn, tex_keys, config)
    return terms["total"], (terms, new["batch_stats"])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def grads(params, stats, frozen, episode_key):
    def micro(carry, m):
      g_sum, stats, t_sum = carry
      index = m * b + jnp.arange(b)
      if rows is not None:  # each device draws and runs its own rows
        index = jax.lax.with_sharding_constraint(index, rows)
      z, y, tex_keys = draw_inputs(episode_key, index, gan.z_dim, gan.num_classes, truncation)
      (_, (terms, stats)), g = grad_fn(params, stats, frozen, z, y, tex_keys)
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
  """``step(state, frozen_params, key) -> (state, metrics)``: one episode, one update."""
  grads_fn = make_grad_fn(config, model, features_fn, mesh)

  def step(state: TrainState, frozen: Any, key: jax.Array):
    grads, stats, terms = grads_fn(state.params, state.batch_stats, frozen,
                                   jax.random.fold_in(key, state.step))
    # The authors' summed-gradient scale on top of the mean (see configs/imagenet.py).
    grads = jax.tree.map(lambda g: g * config.train.grad_scale, grads)
    updates, opt = tx.update(grads, state.opt, state.params)
    new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                     batch_stats=stats, opt=opt)
    return new, TrainMetrics.single_from_model_output(**{f"loss_{n}": t for n, t in terms.items()})

  return step


def load_fixed_noise(path: str, z_dim: int) -> np.ndarray:
  """The authors' sheet noise u_fixed [1, z_dim] from .npy, or from their .pth (needs torch)."""
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"fixed noise '{path}' not found; point --config.u_fixed at "
                            f"u_fixed.npy/.pth (shipped in the authors' imagenet/data/)")
  if path.endswith(".npy"):
    u = np.load(path)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    u = torch.load(path, map_location="cpu").numpy()
  u = np.asarray(u, np.float32).reshape(-1, u.shape[-1])
  if u.shape[-1] != z_dim:
    raise ValueError(f"fixed noise '{path}' has dimension {u.shape[-1]}, the model expects {z_dim}")
  return u[:1]


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) the ImageNet CGN in ``workdir``; returns the final state."""
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.create_mesh(jax.devices()[:config.num_devices] if config.num_devices > 0 else None)
  parallel.check_batch_size(config.train.micro_batch_size, mesh, "train.micro_batch_size")
  cfg = model_config(config)
  model = ImagenetCGN(cfg, dtype=jnp.dtype(config.model.dtype))
  u_fixed = load_fixed_noise(config.u_fixed, cfg.biggan.z_dim)
  variables = initial_variables(config, cfg, workdir)
  trainable, frozen = imagenet_cgn.split_trainable(variables["params"])
  features_fn = vgg.load_features_fn(config.vgg_checkpoint, os.path.join(workdir, "converted"),
                                     jax.random.key(config.seed + 2))
  tx = create_optimizer(config)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                     batch_stats=variables["batch_stats"], opt=tx.init(trainable))
  ckpt = checkpoints.TrainCheckpointer(workdir, config.log.keep_checkpoints, config.log.checkpoint_every)
  state, start = ckpt.restore_or(state)
  if start:
    print(f"resuming from episode {start} in {workdir}")
  else:
    logging.info("%s", parameter_overview.get_parameter_overview(trainable))

  repl = parallel.replicated(mesh)
  state, frozen = jax.device_put(state, repl), jax.device_put(frozen, repl)
  step_fn = jax.jit(make_train_step(config, model, tx, features_fn, mesh),
                    in_shardings=(repl, repl, repl), out_shardings=(repl, repl), donate_argnums=(0,))
  sheet_fwd = jax.jit(lambda v, z, y: model.apply(v, z, y, y, y, float(config.truncation)))
  key = jax.random.key(config.seed + 3)
  writer = MetricWriter(workdir, tensorboard=config.log.tensorboard)
  episodes = config.train.episodes
  bar = tqdm(total=episodes, initial=start, desc="cgn imagenet", unit="episode",
             disable=jax.process_index() != 0 or not config.log.progress_bar)
  acc, t0, last = None, time.time(), start
  for episode in range(start, episodes):
    state, m = step_fn(state, frozen, key)
    acc = m if acc is None else acc.merge(m)
    done = episode + 1
    if done % config.log.every_steps == 0 or done == episodes:
      scalars = acc.compute()  # the loop's only host sync
      scalars["episodes_per_sec"] = (done - last) / max(time.time() - t0, 1e-9)
      writer.write_scalars(done, scalars)
      bar.set_postfix({k[5:]: f"{float(v):.3f}" for k, v in scalars.items() if k.startswith("loss_")})
      acc, t0, last = None, time.time(), done
    if config.log.sample_every and (done % config.log.sample_every == 0 or done == episodes):
      if jax.process_index() == 0:
        full = {"params": {**state.params, **frozen}, "batch_stats": state.batch_stats}
        sample_sheet(model, full, u_fixed, config.sheet_classes, float(config.truncation),
                     os.path.join(workdir, "samples", f"cls_sheet_ep_{done:07d}.png"), sheet_fwd)
    ckpt.maybe_save(done, state, force=done == episodes)
    bar.update(1)
  bar.close()
  ckpt.close()
  writer.flush()
  if jax.process_index() == 0:
    export_cgn(os.path.join(workdir, "cgn"),
               {"params": {**state.params, **frozen}, "batch_stats": state.batch_stats},
               cfg, int(state.step))
  return state
