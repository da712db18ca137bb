"""The rows of ``scripts/bench.py``: each builds one step on the JAX side and the same step from the
authors' PyTorch classes, imported from their checkout (never copied).

A builder returns a zero-argument function that runs one step and waits for its result. Both sides
draw their weights from the same initialisers (the authors' init for the MNIST models, torch's
defaults elsewhere) but not the same numbers: these rows time work, the parity tests check values.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Callable

import numpy as np

# row -> (batch sizes of the table, what one call does)
ROWS: dict[str, tuple[tuple[int, ...], str]] = {
    "cgn_step": ((16, 64), "MNIST CGN train step (G + D, double-colored config, VGG perceptual)"),
    "classifier_step": ((64,), "MNIST CNN classifier step (Adadelta)"),
    "generate": ((100,), "counterfactual generation, 100 masks x 10"),
    "biggan": ((1, 8), "BigGAN-deep-256 forward"),
    "u2net": ((1, 8), "U2NET 256x256 forward"),
}
NO_CFS = 10  # counterfactuals per mask, generate_cf_dataset's default (mnists/generate_data.py)


# ---- the authors' code -------------------------------------------------------------------------

def _load_file(name: str, path: str) -> types.ModuleType:
  if not os.path.isfile(path):
    raise SystemExit(f"error: {path} not found; --authors-repo must be a checkout of "
                     "autonomousvision/counterfactual_generative_networks")
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  return mod


def _torchvision_vgg16_layout():
  """torchvision's ``vgg16().features`` layout (cfg "D") in plain torch, with torch's default init.

  The authors' PerceptualLoss asks for ``torchvision.models.vgg16(pretrained=True)``, which downloads
  weights; torchvision also does not import beside the project's torch pin. The timing needs the
  layers only, so this stands in for both cases.
  """
  from torch import nn  # pylint: disable=import-outside-toplevel
  layers, cin = [], 3
  for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
    if v == "M":
      layers.append(nn.MaxPool2d(2, 2))
    else:
      layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
      cin = v
  net = types.SimpleNamespace(features=nn.Sequential(*layers))
  return net


def authors_modules(repo: str) -> dict[str, types.ModuleType]:
  """The authors' MNIST models and losses, with stand-ins for what they import but never need here.

  Their ``utils`` package pulls in plotting and evaluation code; the models need only
  ``utils/train_utils.py`` and ``utils/patch_utils.py``. ``torchvision`` is replaced by a stub that
  builds VGG16's layout (see ``_torchvision_vgg16_layout``) and the grid helper they import.
  """
  utils = types.ModuleType("utils")
  for part in ("train_utils", "patch_utils"):
    utils.__dict__.update(vars(_load_file(f"authors_{part}", os.path.join(repo, "utils", f"{part}.py"))))
  sys.modules["utils"] = utils
  tv = types.ModuleType("torchvision")
  tv.models = types.SimpleNamespace(vgg16=lambda *a, **k: _torchvision_vgg16_layout())
  tv.utils = types.SimpleNamespace(make_grid=None)
  sys.modules["torchvision"], sys.modules["torchvision.utils"] = tv, tv.utils
  sys.modules["torchvision.models"] = tv.models
  return {name: _load_file(f"authors_{name}", os.path.join(repo, *path)) for name, path in (
      ("cgn", ("mnists", "models", "cgn.py")),
      ("disc", ("mnists", "models", "discriminator.py")),
      ("classifier", ("mnists", "models", "classifier.py")),
      ("losses", ("shared", "losses.py")),
      ("u2net", ("imagenet", "models", "u2net.py")))}


# ---- torch side --------------------------------------------------------------------------------

def torch_row(row: str, batch: int, repo: str) -> Callable[[], None]:
  """One step of the authors' code for ``row`` at ``batch``."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  if row == "biggan":
    return _torch_biggan(batch)
  mods = authors_modules(repo)
  if row == "cgn_step":
    return _torch_cgn_step(mods, batch)
  if row == "classifier_step":
    net = mods["classifier"].CNN()
    opt = torch.optim.Adadelta(net.parameters(), lr=1.0)  # mnists/train_classifier.py: --lr 1.0
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step():  # mnists/train_classifier.py train()'s body
      opt.zero_grad()
      loss = torch.nn.functional.nll_loss(net(x), y)
      loss.backward()
      opt.step()
    return step
  if row == "generate":
    # mnists/experiments/cgn_double_colored_MNIST/cfg.yaml: latent 32, ngf 32
    net = mods["cgn"].CGN(n_classes=10, latent_sz=32, ngf=32, init_type="orthogonal",
                          init_gain=0.2).eval()
    net.batch_size = batch
    y = torch.randint(0, 10, (batch,))

    def step():  # generate_cf_dataset's loop body (mnists/generate_data.py), under no_grad
      with torch.no_grad():
        mask, _, _ = net(y)
        for _ in range(NO_CFS):
          _, fg, bg = net(y, counterfactual=True)
          mask * fg + (1 - mask) * bg
    return step
  if row == "u2net":
    net = mods["u2net"].U2NET(3, 1).eval()
    x = torch.rand(batch, 3, 256, 256) * 2 - 1

    def step():
      with torch.inference_mode():
        net(x)
    return step
  raise ValueError(f"unknown row '{row}'")


def _torch_cgn_step(mods, batch: int) -> Callable[[], None]:
  """mnists/train_cgn.py fit()'s body with the double-colored config (cfg.yaml of that experiment)."""
  import torch  # pylint: disable=import-outside-toplevel
  cgn = mods["cgn"].CGN(n_classes=10, latent_sz=32, ngf=32, init_type="orthogonal", init_gain=0.2)
  cgn.batch_size = batch
  disc = mods["disc"].DiscLin(n_classes=10, ndf=512)
  l_adv = torch.nn.MSELoss()
  l_binary = mods["losses"].BinaryLoss(0.3)
  l_perc = mods["losses"].PerceptualLoss(style_wgts=[0.0, 0.05, 0.0, 0.05])
  opt_g = torch.optim.Adam(cgn.parameters(), lr=2e-4, betas=(0.5, 0.999))
  opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
  x_gt, y_gt = torch.rand(batch, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (batch,))
  valid, fake = torch.ones(batch), torch.zeros(batch)

  def step():
    opt_g.zero_grad()
    y_gen = torch.randint(10, (batch,))
    mask, fg, bg = cgn(y_gen)
    x_gen = mask * fg + (1 - mask) * bg
    loss_g = l_adv(disc(x_gen, y_gen), valid) + l_binary(mask) + l_perc(x_gen, x_gt)
    loss_g.backward()
    opt_g.step()
    opt_d.zero_grad()
    loss_d = (l_adv(disc(x_gt, y_gt), valid) + l_adv(disc(x_gen.detach(), y_gen), fake)) / 2
    loss_d.backward()
    opt_d.step()
  return step


def _torch_biggan(batch: int) -> Callable[[], None]:
  """pytorch-pretrained-biggan's BigGAN (the model the authors' file copies), 256 layout, random
  weights made numerically sane (see ``biggan_reference``)."""
  import torch  # pylint: disable=import-outside-toplevel
  net = biggan_reference()
  z = torch.from_numpy(np.random.default_rng(0).uniform(-0.4, 0.4, (batch, 128)).astype(np.float32))
  y = torch.nn.functional.one_hot(torch.arange(batch) * 97 % 1000, 1000).float()

  def step():
    with torch.inference_mode():
      net(z, y, 0.4)
  return step


def biggan_reference(seed: int = 0):
  """pytorch-pretrained-biggan's ``BigGAN`` with the 256 layout and random weights.

  Its ``file_utils`` imports boto3 and requests for downloads that never happen here, so stubs
  stand in when they are missing. The final BN's affine is made with ``torch.Tensor(n)``
  (uninitialised memory), and random spectral-norm vectors can make sigma ~ 0: both are set.
  """
  import torch  # pylint: disable=import-outside-toplevel
  for name in ("boto3", "requests", "botocore"):
    if name not in sys.modules and importlib.util.find_spec(name) is None:
      sys.modules[name] = types.ModuleType(name)
      if name == "botocore":
        sys.modules["botocore.exceptions"] = types.SimpleNamespace(ClientError=Exception)
  try:
    from pytorch_pretrained_biggan import BigGAN, BigGANConfig  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit("error: the BigGAN row's reference needs `pip install --no-deps "
                     f"pytorch-pretrained-biggan` in the torch environment ({e})") from e
  from cgn_jax.models.biggan import LAYERS_256  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  net = BigGAN(BigGANConfig(output_dim=256, layers=[list(l) for l in LAYERS_256])).eval()
  with torch.no_grad():
    net.generator.bn.weight.fill_(1.0)
    net.generator.bn.bias.zero_()
    for mod in net.modules():
      if hasattr(mod, "weight_u"):
        w = mod.weight_orig.reshape(mod.weight_orig.shape[0], -1)
        u, v = mod.weight_u, mod.weight_v
        for _ in range(5):
          v.copy_(torch.nn.functional.normalize(w.t() @ u, dim=0))
          u.copy_(torch.nn.functional.normalize(w @ v, dim=0))
  return net


# ---- JAX side ----------------------------------------------------------------------------------

def jax_row(row: str, batch: int, dtype: str = "float32", tiny: bool = False) -> Callable[[], None]:
  """One jitted step of this project for ``row`` at ``batch`` (the jobs' own step functions).

  ``dtype`` is the compute dtype of BigGAN and U2-Net (the MNIST rows are float32, as their jobs).
  ``tiny`` swaps in the small networks of the ``:tiny`` configs (BigGAN at 32 px, U2NETP at 32 px,
  the tiny MNIST CGN), to check the plumbing of ``scripts/gpu_check_imagenet.py`` on a CPU.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  if row == "cgn_step":
    return _jax_cgn_step(batch, tiny)
  if row == "classifier_step":
    import optax  # pylint: disable=import-outside-toplevel
    from cgn_jax.jobs import train_classifier  # pylint: disable=import-outside-toplevel
    from cgn_jax.models.classifiers import MnistCNN  # pylint: disable=import-outside-toplevel
    model = MnistCNN()
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3))))(jax.random.key(0))
    tx = optax.adadelta(1.0, rho=0.9, eps=1e-6)  # the job's optimizer at the authors' lr
    train_step, _ = train_classifier.make_steps(model, tx)
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
             "opt": tx.init(variables["params"])}
    batch_ = {"image": jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32),
              "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32)}
    return _stepper(jax.jit(train_step, donate_argnums=0), state, batch_, jax.random.key(0))
  if row == "generate":
    from configs import mnist_double_colored, mnist_generate  # pylint: disable=import-outside-toplevel
    from cgn_jax.jobs import generate_mnist, train_cgn_mnist  # pylint: disable=import-outside-toplevel
    cgn, _ = train_cgn_mnist.create_models(mnist_double_colored.get_config("tiny" if tiny else ""))
    cgn = cgn.clone(subpixel=mnist_generate.get_config().fast_upsample)
    ys0 = jnp.zeros((2,), jnp.int32)
    variables = jax.jit(lambda k: cgn.init(k, ys0, k, train=False))(jax.random.key(0))
    fn = jax.jit(generate_mnist.make_generate_fn(cgn, 2 if tiny else NO_CFS))
    ys = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    calls = iter(range(10 ** 9))
    return lambda: jax.block_until_ready(fn(variables, ys, jax.random.key(next(calls))))
  if row == "biggan":
    from cgn_jax.models.biggan import BigGAN, BigGANConfig, init_variables  # pylint: disable=import-outside-toplevel
    cfg = BigGANConfig()
    if tiny:  # configs/imagenet.py:tiny's generator
      cfg = BigGANConfig(output_dim=32, channel_width=4, attention_layer_position=1,
                         layers=((True, 16, 8), (False, 8, 4), (True, 4, 2), (True, 2, 1)))
    variables, model = init_variables(cfg), BigGAN(cfg, dtype=jnp.dtype(dtype))
    fwd = jax.jit(lambda v, z, y: model.apply(v, z, y, jnp.float32(0.4)))
    z = jnp.asarray(rng.uniform(-0.4, 0.4, (batch, cfg.z_dim)), jnp.float32)
    y = jax.nn.one_hot(jnp.arange(batch) * 97 % 1000, 1000)
    return lambda: jax.block_until_ready(fwd(variables, z, y))
  if row == "u2net":
    from cgn_jax.models.u2net import U2Net  # pylint: disable=import-outside-toplevel
    model = U2Net(variant="u2netp" if tiny else "u2net", dtype=jnp.dtype(dtype))
    size = 32 if tiny else 256
    x = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    fwd = jax.jit(model.apply)
    return lambda: jax.block_until_ready(fwd(variables, x))
  raise ValueError(f"unknown row '{row}'")


def _stepper(step, state, batch, key) -> Callable[[], None]:
  """Calls a donating ``step(state, batch, key)`` repeatedly, threading the state through."""
  import jax  # pylint: disable=import-outside-toplevel
  holder = [state]

  def call():
    holder[0], metrics = step(holder[0], batch, key)
    jax.block_until_ready(metrics)
  return call


def _jax_cgn_step(batch: int, tiny: bool = False) -> Callable[[], None]:
  """The job's train step (cgn_jax/jobs/train_cgn_mnist.py) with configs/mnist_double_colored.py."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from configs import mnist_double_colored  # pylint: disable=import-outside-toplevel
  from cgn_jax.jobs import train_cgn_mnist as job  # pylint: disable=import-outside-toplevel
  from cgn_jax.models import vgg  # pylint: disable=import-outside-toplevel
  config = mnist_double_colored.get_config("tiny" if tiny else "")
  cgn, disc = job.create_models(config)
  tx_g, tx_d = job.create_optimizers(config)
  state = job.create_train_state(config, cgn, disc, tx_g, tx_d, jax.random.key(0))
  features_fn = vgg.features_fn(jax.jit(vgg.init_variables)(jax.random.key(1)))
  step = jax.jit(job.make_train_step(config, cgn, disc, tx_g, tx_d, features_fn), donate_argnums=0)
  rng = np.random.default_rng(0)
  batch_ = {"image": jnp.asarray(rng.uniform(-1, 1, (batch, 32, 32, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32)}
  return _stepper(step, state, batch_, jax.random.key(2))
