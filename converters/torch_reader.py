"""Reading torch ``.pth`` files with numpy alone: no torch import, no arbitrary code.

A ``torch.save`` file is a pickle whose tensors point at raw storages kept beside it: in the zip
format (torch >= 1.6) as ``<archive>/data/<key>`` members, in the legacy format (the published
``biggan-deep-256`` ``pytorch_model.bin``) as blobs after the pickle. The unpickler here resolves
only the globals a state dict needs (``OrderedDict``, the tensor/parameter rebuild functions and
the storage types); any other global, e.g. ``os.system`` in a crafted file, is refused before
anything runs, with a one-line ``ConversionError`` naming it.

``converters.common.load_torch_state_dict`` reads every checkpoint through it, so converting needs
no torch; ``tests/test_torch_reader.py`` checks it bit for bit against ``torch.load`` on every
fixture and on legacy-format files.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Any, Callable

import numpy as np

from converters.common import ConversionError

_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
             "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
             "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _StorageType:
  """Stands in for ``torch.FloatStorage`` etc.: only its element type matters."""

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
  """``torch._utils._rebuild_tensor(_v2)``: a strided view of the storage, copied out."""
  del unused  # requires_grad, backward hooks, metadata
  if not size:
    return np.array(storage[offset])  # 0-d array, not a numpy scalar
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
  del unused
  return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGES},
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, data: bytes, path: str, storage: Callable[[tuple], np.ndarray]):
    super().__init__(io.BytesIO(data))
    self._path, self._storage = path, storage

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise ConversionError(f"{self._path}: refuses to load '{module}.{name}' (a state dict needs "
                            f"only tensors; this file may run code when unpickled)") from None

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise ConversionError(f"{self._path}: unknown persistent id {pid!r:.80}")
    return self._storage(pid)


def read(path: str) -> Any:
  """The object ``torch.save`` wrote at ``path`` with tensors as numpy arrays (their own dtype)."""
  try:
    if zipfile.is_zipfile(path):
      return _read_zip(path)
    with open(path, "rb") as f:
      return _read_legacy(f, path)
  except ConversionError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, KeyError, struct.error,
          zipfile.BadZipFile) as e:
    with open(path, "rb") as f:
      kind = "truncated or corrupt zip" if f.read(4) == b"PK\x03\x04" else "not a torch checkpoint"
    detail = str(e).splitlines()[0] if str(e) else ""
    raise ConversionError(f"{path}: {kind} ({type(e).__name__}: {detail}); copy or download the "
                          "file again") from e


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as z:
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise ConversionError(f"{path}: a zip without one data.pkl, not a torch.save file")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = (z.read(prefix + "byteorder").decode().strip()
                 if prefix + "byteorder" in z.namelist() else "little")
    cache: dict[str, np.ndarray] = {}

    def storage(pid: tuple) -> np.ndarray:
      _, kind, key, _location, _numel = pid
      if key not in cache:
        dtype = kind.dtype.newbyteorder("<" if byteorder == "little" else ">")
        cache[key] = np.frombuffer(z.read(f"{prefix}data/{key}"), dtype).astype(kind.dtype)
      return cache[key]

    return _Unpickler(z.read(pkl[0]), path, storage).load()


def _read_legacy(f, path: str) -> Any:
  """torch < 1.6: magic, protocol, sys info, the object, the storage keys, then each storage as
  an int64 element count and its little-endian bytes, in key order."""
  def no_storage(pid: tuple) -> None:
    raise ConversionError(f"{path}: a tensor outside the object pickle; not a torch.save file")

  # Even the header pickles go through the restricted unpickler: a crafted file could hide a
  # global anywhere.
  header = [_DeferredUnpickler(f, path, no_storage).load() for _ in range(3)]
  if header[0] != _LEGACY_MAGIC:
    raise ConversionError(f"{path}: neither a zip nor a legacy torch file (no torch magic number)")
  kinds: dict[str, _StorageType] = {}
  arrays: dict[str, np.ndarray] = {}

  def storage(pid: tuple) -> "_Lazy":
    _, kind, key = pid[:3]
    if len(pid) > 5 and pid[5] is not None:  # torch < 0.4 saved views of storages
      raise ConversionError(f"{path}: a storage view (torch < 0.4 file); load and re-save it with "
                            f"a newer torch")
    kinds[key] = kind
    # Filled in after the key list below; the tensors are rebuilt from it at the end.
    return _Lazy(arrays, key)

  obj = _DeferredUnpickler(f, path, storage).load()
  keys = _DeferredUnpickler(f, path, no_storage).load()
  for key in keys:
    (n,) = struct.unpack("<q", f.read(8))
    dtype = kinds[key].dtype
    arrays[key] = np.frombuffer(f.read(n * dtype.itemsize), dtype.newbyteorder("<")).astype(dtype)
  return _resolve(obj)


class _Lazy:
  """A legacy storage not read yet (its bytes follow the pickle)."""

  def __init__(self, arrays: dict, key: str):
    self.arrays, self.key = arrays, key


class _Pending:
  """A tensor of a legacy file, rebuilt once its storage is read."""

  def __init__(self, args: tuple):
    self.args = args

  def build(self) -> np.ndarray:
    storage, *rest = self.args
    return _rebuild_tensor(storage.arrays[storage.key], *rest)


class _DeferredUnpickler(_Unpickler):
  """The legacy object pickle: tensors become ``_Pending`` until their storages are read."""

  def __init__(self, f, path: str, storage: Callable[[tuple], Any]):
    pickle.Unpickler.__init__(self, f)
    self._path, self._storage = path, storage

  def find_class(self, module: str, name: str) -> Any:
    fn = super().find_class(module, name)
    if fn is _rebuild_tensor:
      return lambda *args: _Pending(args)
    return fn


def _resolve(obj: Any) -> Any:
  if isinstance(obj, _Pending):
    return obj.build()
  if isinstance(obj, dict):
    out = type(obj)((k, _resolve(v)) for k, v in obj.items())
    if hasattr(obj, "__dict__"):
      out.__dict__.update(obj.__dict__)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v) for v in obj)
  return obj
