"""Benchmark (not a test): U2-Net forward images/s, JAX jit vs the authors' PyTorch class, same run.

    python scripts/bench_u2net.py --authors-repo /tmp/cgn_authors [--batch 1 8] [--dtype bfloat16]
        [--single-thread]

``--authors-repo`` is a checkout of autonomousvision/counterfactual_generative_networks; the
reference class is imported from its imagenet/models/u2net.py (never copied here). Its weights are
converted with ``converters.u2net`` so both sides run the same network, and the outputs are compared
as a sanity check. Without it only JAX is timed. The PyTorch side always runs float32 (the authors'
setting); ``--dtype`` sets the JAX compute dtype. Throughput excludes compilation (printed apart).
``--single-thread`` pins both to one thread: on a shared, oversubscribed machine torch's spinning
OpenMP workers slow it down several-fold, which would flatter JAX.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import pin_xla_single_thread, time_interleaved  # noqa: E402  (scripts/ is on sys.path)


def load_authors_module(repo: str) -> types.ModuleType:
  """Imports <repo>/imagenet/models/u2net.py directly (its package __init__ pulls in BigGAN etc.)."""
  path = os.path.join(repo, "imagenet", "models", "u2net.py")
  if not os.path.isfile(path):
    sys.exit(f"error: {path} not found; --authors-repo must be a checkout of the authors' code")
  if importlib.util.find_spec("torchvision") is None and "torchvision" not in sys.modules:
    # The file imports torchvision.models but never uses it; a stub keeps torchvision optional.
    stub = types.ModuleType("torchvision")
    stub.models = types.ModuleType("torchvision.models")
    sys.modules["torchvision"] = stub
  spec = importlib.util.spec_from_file_location("authors_u2net", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--authors-repo", default=None, help="checkout of the authors' code (PyTorch reference)")
  p.add_argument("--variant", default="u2net", choices=["u2net", "u2netp"])
  p.add_argument("--size", type=int, default=256, help="square input side")
  p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="JAX compute dtype")
  p.add_argument("--single-thread", action="store_true", help="one intra-op thread for JAX and torch")
  args = p.parse_args()
  if args.single_thread:
    pin_xla_single_thread()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from cgn_jax.models.u2net import U2Net  # pylint: disable=import-outside-toplevel

  model = U2Net(variant=args.variant, dtype=jnp.dtype(args.dtype))
  rng = np.random.default_rng(0)
  torch_net = None
  if args.authors_repo:
    import torch  # pylint: disable=import-outside-toplevel
    from converters.u2net import convert_u2net  # pylint: disable=import-outside-toplevel
    mod = load_authors_module(args.authors_repo)
    torch.manual_seed(0)
    if args.single_thread:
      torch.set_num_threads(1)
    torch_net = getattr(mod, args.variant.upper())(3, 1).eval()
    sd = {k: v.numpy() for k, v in torch_net.state_dict().items()}
    variables, _ = convert_u2net(sd)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  else:
    variables = model.init(jax.random.key(0), jnp.zeros((1, args.size, args.size, 3)))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)), "
        f"{os.cpu_count()} CPUs; {args.variant} {args.size}x{args.size}, JAX dtype {args.dtype}")

  fwd = jax.jit(model.apply)
  for n in args.batch:
    x = rng.uniform(-1, 1, (n, 3, args.size, args.size)).astype(np.float32)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    t = time.perf_counter()
    out = jax.block_until_ready(fwd(variables, xj))
    compile_s = time.perf_counter() - t
    fns = {"jax": lambda: jax.block_until_ready(fwd(variables, xj))}
    if torch_net is not None:
      xt = torch.from_numpy(x)
      with torch.inference_mode():
        ref = torch_net(xt).numpy()  # also the warm-up
      def torch_fwd():
        with torch.inference_mode():
          torch_net(xt)
      fns["torch"] = torch_fwd
    sec = time_interleaved(fns, args.reps)
    (jw, jc) = sec["jax"]
    line = (f"batch {n:3d}: JAX {n / jw:6.2f} img/s ({jw:6.2f} s/batch wall, {jc:6.2f} s CPU; "
            f"first call {compile_s:.0f} s)")
    if torch_net is not None:
      (tw, tc) = sec["torch"]
      err = float(np.max(np.abs(np.asarray(out, np.float32).transpose(0, 3, 1, 2) - ref)))
      line += (f" | PyTorch {n / tw:6.2f} img/s ({tw:6.2f} s wall, {tc:6.2f} s CPU)"
               f" | JAX/PyTorch speed {tw / jw:4.2f}x wall, {tc / jc:4.2f}x CPU | max|diff| {err:.1e}")
    print(line, flush=True)


if __name__ == "__main__":
  main()
