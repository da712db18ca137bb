"""Shared machinery of every PyTorch -> Orbax conversion.

A family module (``converters/mnist.py``, ``converters/biggan.py``, ...) only says *which* torch key
goes *where*; everything about reading ``.pth`` files, tensor layouts and loud failures lives here so
that every family fails the same way: one line naming the offending key.
"""

from __future__ import annotations

import os
import struct
import zipfile
from typing import Any, Iterable, Mapping

import numpy as np


class ConversionError(Exception):
  """A checkpoint that cannot be converted; the message is one line naming the cause."""


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torch ``.pth`` (zip or legacy format) into float32/int numpy arrays, without torch.

  Accepts a bare state dict or a dict wrapping one under ``state_dict``/``model``/``generator``.
  Float tensors of any precision are cast to float32: some published files (and two fixtures)
  store float16. The file is unpickled by ``converters.torch_reader``, which refuses every global a
  state dict does not need, so a crafted file cannot run code.
  """
  from converters import torch_reader  # pylint: disable=import-outside-toplevel
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "cgn_meta.json")):
      raise ConversionError(f"{path} is a converted checkpoint already; use it as it is")
    raise ConversionError(f"{path} is a folder; give the .pth/.bin file (torch.save output) in it")
  if not os.path.isfile(path):
    raise ConversionError(f"no such file: {path}")
  kind = not_torch(path)
  if kind:
    raise ConversionError(f"{path} is {kind}, not a torch checkpoint; give the authors' .pth/.bin "
                          f"(a file written by torch.save)")
  obj = torch_reader.read(path)
  if isinstance(obj, Mapping) and not _is_state_dict(obj):
    for key in ("state_dict", "model", "generator"):
      if key in obj and _is_state_dict(obj[key]):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping) or not _is_state_dict(obj):
    raise ConversionError(f"{path}: not a state dict of tensors (found {type(obj).__name__})")
  return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
          for k, v in obj.items()}


def not_torch(path: str) -> str | None:
  """What the file at ``path`` is when its first bytes show it cannot be a ``torch.save`` file
  (``"a numpy .npz archive (arrays x, y)"``), else None. A truncated torch file is left to the
  reader, whose message says so."""
  size = os.path.getsize(path)
  if size == 0:
    return "an empty file (0 bytes)"
  with open(path, "rb") as f:
    head = f.read(4096)
  if zipfile.is_zipfile(path):
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except (zipfile.BadZipFile, OSError):
      return None
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
      return None
    if names and all(n.endswith(".npy") for n in names):
      arrays = ", ".join(n[:-4] for n in names[:4]) + (", ..." if len(names) > 4 else "")
      return f"a numpy .npz archive (arrays {arrays})"
    return f"a zip archive without torch's data.pkl ({len(names)} members{_eg(names)})"
  if head.startswith((b"PK\x03\x04", b"\x80")):  # a zip cut short, or a (legacy torch) pickle
    return None
  if head.startswith(b"\x93NUMPY"):
    return "a numpy .npy array"
  if head.startswith(b"\x1f\x8b"):
    return "a gzip file (decompress it first if it holds the .pth)"
  if head.startswith(b"\x89HDF"):
    return "an HDF5 file (Keras/h5py)"
  if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
    return "a safetensors file"
  if any(b < 32 and b not in (9, 10, 13) for b in head):
    return f"unrecognised binary data ({size} bytes, starting {head[:8].hex()})"
  if head.startswith(b"version https://git-lfs"):
    return "a git-lfs pointer, not the file it stands for (run `git lfs pull`)"
  first = head.decode("utf-8", "replace").strip().split("\n")[0][:40]
  return f"a text file (starts {first!r})"


def _eg(names: list[str]) -> str:
  return f", e.g. {names[0]}" if names else ""


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and len(obj) > 0 and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


# ---------------------------------------------------------------------------------------------
# Tensor layouts: torch is NCHW/OIHW and Linear stores (out, in); Flax is NHWC/HWIO and (in, out).

def conv_kernel(w: np.ndarray) -> np.ndarray:
  """OIHW -> HWIO."""
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """(out, in) -> (in, out)."""
  return np.ascontiguousarray(w.T)


class StateDictReader:
  """Hands out torch tensors by key and remembers which ones were used.

  Every ``take`` checks presence and shape; ``finish`` rejects keys nobody took. This is what makes
  a mis-mapped or foreign checkpoint fail with the key's name instead of a shape error deep in Flax.
  """

  def __init__(self, state_dict: Mapping[str, np.ndarray], family: str, prefix: str = ""):
    self.sd = dict(state_dict)
    self.family = family
    self.prefix = prefix
    self.used: set[str] = set()

  def has(self, key: str) -> bool:
    return self.prefix + key in self.sd

  def take(self, key: str, shape: Iterable[int] | None = None) -> np.ndarray:
    full = self.prefix + key
    if full not in self.sd:
      raise ConversionError(f"{self.family}: missing key '{full}' (is this a {self.family} checkpoint?)")
    a = self.sd[full]
    if shape is not None and tuple(a.shape) != tuple(shape):
      raise ConversionError(
          f"{self.family}: key '{full}' has shape {tuple(a.shape)}, expected {tuple(shape)}")
    self.used.add(full)
    return a

  def skip(self, key: str) -> None:
    """Marks a key as known but unused (e.g. torch's num_batches_tracked where we do not need it)."""
    if self.prefix + key in self.sd:
      self.used.add(self.prefix + key)

  def linear(self, key: str, in_dim: int, out_dim: int, bias: bool = True) -> dict[str, np.ndarray]:
    p = {"kernel": linear_kernel(self.take(f"{key}.weight", (out_dim, in_dim)))}
    if bias:
      p["bias"] = self.take(f"{key}.bias", (out_dim,))
    return p

  def conv(self, key: str, cin: int, cout: int, kh: int, kw: int | None = None,
           bias: bool = True) -> dict[str, np.ndarray]:
    kw = kh if kw is None else kw
    p = {"kernel": conv_kernel(self.take(f"{key}.weight", (cout, cin, kh, kw)))}
    if bias:
      p["bias"] = self.take(f"{key}.bias", (cout,))
    return p

  def embedding(self, key: str, num: int, dim: int) -> dict[str, np.ndarray]:
    return {"embedding": self.take(f"{key}.weight", (num, dim))}

  def batch_norm(self, key: str, c: int) -> tuple[dict, dict]:
    """torch BatchNorm{1,2}d -> (params, batch_stats) of ``cgn_jax.models.layers.TorchBatchNorm``."""
    params = {"scale": self.take(f"{key}.weight", (c,)), "bias": self.take(f"{key}.bias", (c,))}
    stats = {"mean": self.take(f"{key}.running_mean", (c,)),
             "var": self.take(f"{key}.running_var", (c,))}
    if self.has(f"{key}.num_batches_tracked"):
      stats["num_batches_tracked"] = np.asarray(
          self.take(f"{key}.num_batches_tracked"), np.int32).reshape(())
    return params, stats

  def finish(self) -> None:
    unknown = [k for k in self.sd if k not in self.used]
    if unknown:
      more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
      raise ConversionError(f"{self.family}: unknown key '{unknown[0]}'{more}")


def infer_dim(sd: Mapping[str, np.ndarray], key: str, axis: int, family: str) -> int:
  """Reads a width from a tensor shape, so families of any size convert without flags."""
  if key not in sd:
    raise ConversionError(f"{family}: missing key '{key}' (is this a {family} checkpoint?)")
  return int(sd[key].shape[axis])
