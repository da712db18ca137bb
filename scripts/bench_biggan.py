"""Benchmark (not a test): BigGAN-deep-256 forward images/s, JAX jit vs PyTorch, same run.

    pip install pytorch-pretrained-biggan   # the reference; --no-deps is enough (needs torch only)
    python scripts/bench_biggan.py [--batch 1 8] [--reps 3] [--dtype bfloat16] [--single-thread]

The PyTorch reference is pytorch-pretrained-biggan's ``BigGAN`` (the model the authors' file copies)
built with random weights from ``BigGANConfig`` with the 256 layout (its ``BigGANConfig()`` default is
the 128 model) — never ``from_pretrained``. Its state dict is converted with ``converters.biggan`` so
both sides run the same network, and their outputs are compared as a sanity check. Before that the
uninitialised final-BN affine is set and every spectral norm gets a few power iterations (random u/v
can make sigma ~ 0 and the activations overflow). Throughput excludes compilation (printed apart).
``--dtype bfloat16`` sets the JAX compute dtype and, on CUDA, runs torch under bf16 autocast (for
accelerators); on CPU torch stays float32, as its CPU bf16 convolutions are a slow fallback (~100x
slower than float32 on a 2-core AVX2 machine) that would make the ratio meaningless. ``--single-thread`` pins both to one thread: on a shared, oversubscribed machine
torch's spinning OpenMP workers slow it down several-fold, which would flatter JAX.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import time_interleaved  # noqa: E402  (scripts/ is on sys.path)


def torch_reference(seed: int = 0):
  """pytorch-pretrained-biggan's BigGAN, 256 layout, random weights made numerically sane."""
  import torch  # pylint: disable=import-outside-toplevel
  try:
    from pytorch_pretrained_biggan import BigGAN, BigGANConfig  # pylint: disable=import-outside-toplevel
  except ImportError:
    sys.exit("error: the PyTorch reference needs `pip install pytorch-pretrained-biggan` "
             "(or run with --no-torch)")
  from cgn_jax.models.biggan import LAYERS_256  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  net = BigGAN(BigGANConfig(output_dim=256, layers=[list(l) for l in LAYERS_256])).eval()
  with torch.no_grad():
    net.generator.bn.weight.fill_(1.0)  # created with torch.Tensor(n): uninitialised memory
    net.generator.bn.bias.zero_()
    for mod in net.modules():
      if hasattr(mod, "weight_u"):
        w = mod.weight_orig.reshape(mod.weight_orig.shape[0], -1)
        u, v = mod.weight_u, mod.weight_v
        for _ in range(5):
          v.copy_(torch.nn.functional.normalize(w.t() @ u, dim=0))
          u.copy_(torch.nn.functional.normalize(w @ v, dim=0))
  return net


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--truncation", type=float, default=0.4)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--no-torch", action="store_true", help="time JAX only")
  p.add_argument("--single-thread", action="store_true", help="one intra-op thread for JAX and torch")
  args = p.parse_args()
  if args.single_thread:  # XLA reads its flags when the backend starts, so before importing jax
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  # pylint: disable=import-outside-toplevel
  from cgn_jax.models.biggan import (BigGAN, BigGANConfig, init_variables, one_hot_from_int,
                                     truncated_noise_sample)

  cfg = BigGANConfig()
  net = None
  if not args.no_torch:
    import torch  # pylint: disable=import-outside-toplevel
    from converters.biggan import convert_biggan  # pylint: disable=import-outside-toplevel
    if args.single_thread:
      torch.set_num_threads(1)
    net = torch_reference()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = net.to(device)
    variables, model_cfg = convert_biggan({k: v.cpu().numpy() for k, v in net.state_dict().items()})
    assert BigGANConfig.from_dict(model_cfg) == cfg
    autocast = args.dtype == "bfloat16" and device == "cuda"
    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads, "
          f"{'bf16 autocast' if autocast else 'float32'}")
  else:
    variables = init_variables(cfg)
  variables = jax.device_put(variables)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)), "
        f"{os.cpu_count()} CPUs; BigGAN-deep-256, dtype {args.dtype}, truncation {args.truncation}")

  model = BigGAN(cfg, dtype=jnp.dtype(args.dtype))
  fwd = jax.jit(lambda v, z, y, t: model.apply(v, z, y, t))
  t_arr = jnp.float32(args.truncation)
  for n in args.batch:
    z = np.array(truncated_noise_sample(n, n, cfg.z_dim, args.truncation))  # writable copies
    y = np.array(one_hot_from_int(np.arange(n) * 97 % 1000))
    zj, yj = jnp.asarray(z), jnp.asarray(y)
    t = time.perf_counter()
    out = jax.block_until_ready(fwd(variables, zj, yj, t_arr))
    compile_s = time.perf_counter() - t
    fns = {"jax": lambda: jax.block_until_ready(fwd(variables, zj, yj, t_arr))}
    if net is not None:
      zt, yt = torch.from_numpy(z).to(device), torch.from_numpy(y).to(device)
      trunc = float(np.float32(args.truncation))  # the same number the traced JAX value holds

      def torch_fwd():
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=autocast):
          r = net(zt, yt, trunc)
        if device == "cuda":
          torch.cuda.synchronize()
        return r
      ref = torch_fwd().float().cpu().numpy()  # also the warm-up
      fns["torch"] = torch_fwd
    sec = time_interleaved(fns, args.reps)
    jw, jc = sec["jax"]
    line = (f"batch {n:3d}: JAX {n / jw:6.2f} img/s ({jw:6.2f} s/batch wall, {jc:6.2f} s CPU; "
            f"first call {compile_s:.0f} s)")
    if net is not None:
      tw, tc = sec["torch"]
      err = float(np.max(np.abs(np.asarray(out, np.float32).transpose(0, 3, 1, 2) - ref)))
      line += (f" | PyTorch {n / tw:6.2f} img/s ({tw:6.2f} s wall, {tc:6.2f} s CPU)"
               f" | JAX/PyTorch speed {tw / jw:4.2f}x wall, {tc / jc:4.2f}x CPU | max|diff| {err:.1e}"
               f" (image std {ref.std():.2f})")
    print(line, flush=True)


if __name__ == "__main__":
  main()
