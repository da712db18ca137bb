"""Generation jobs killed with a real SIGKILL at fixed instants, then rerun: the result must equal
an uninterrupted run's, file by file and byte by byte, with no leftovers; and what decides reuse.

The kills happen in child processes running the real CLI through this file
(``python tests/test_generation_resume.py FAULT AT -- <cgn_jax.main flags>``), which patches one
function of the job to SIGKILL itself at a chosen point, so every run is killed at the same instant.
The children share the session's persistent compilation cache. ``:tiny`` configs, random weights.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":  # a child: install the fault, then the real CLI
  sys.path.insert(0, ROOT)


def _install(fault: str, at: int) -> None:
  """Patches the one function after (or inside) which the child kills itself."""
  from cgn_jax.data import storage  # pylint: disable=import-outside-toplevel
  from cgn_jax.jobs import generate_imagenet  # pylint: disable=import-outside-toplevel
  kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
  if fault == "kill_after_shard":  # MNIST: shard `at` and the progress record naming it are written
    write_shard = storage.PartWriter._write_shard

    def after_shard(self, split, images, table):
      write_shard(self, split, images, table)
      if len(self._splits[split]["shards"]) == at + 1:
        kill()
    storage.PartWriter._write_shard = after_shard
  elif fault == "kill_in_shard":  # MNIST: shard `at`'s images written, its labels half written
    write_npy = storage._write_npy

    def in_shard(path, arr):
      if path.endswith(f"-{at:05d}.labels.npy"):
        with open(path + ".part", "wb") as f:
          f.write(b"\x93NUMPY\x01\x00")
        kill()
      write_npy(path, arr)
    storage._write_npy = in_shard
  elif fault == "kill_in_install":  # MNIST: the manifest is in the staging dir, not yet in place
    storage.install_staged = lambda path: kill()
  elif fault == "kill_after_batch":  # ImageNet: the `at`-th batch of this run has its rows
    write_batch, calls = generate_imagenet._write_batch, [0]

    def after_batch(*args, **kwargs):
      n = write_batch(*args, **kwargs)
      calls[0] += 1
      if calls[0] == at:
        kill()
      return n
    generate_imagenet._write_batch = after_batch
  elif fault == "kill_in_jpeg":  # ImageNet: while the `at`-th image of this run is being written
    save, calls, lock = generate_imagenet._save_jpeg, [0], threading.Lock()

    def in_jpeg(pixels, quality, f):
      with lock:
        calls[0] += 1
        mine = calls[0]
      if mine == at:
        f.write(b"\xff\xd8\xff")
        f.flush()
        kill()
      save(pixels, quality, f)
    generate_imagenet._save_jpeg = in_jpeg
  else:
    raise SystemExit(f"unknown fault {fault}")


if __name__ == "__main__":
  _fault, _at, _sep, *_rest = sys.argv[1:]
  assert _sep == "--", sys.argv
  _install(_fault, int(_at))
  from fault_injection import run_main  # pylint: disable=import-outside-toplevel
  run_main(_rest)
  sys.exit(0)

# pylint: disable=wrong-import-position
import jax
import numpy as np
import pytest
from PIL import Image

from cgn_jax import checkpoints
from cgn_jax.data import storage
from cgn_jax.data.mnist_variants import VARIANTS
from cgn_jax.jobs import generate_imagenet, generate_mnist
from cgn_jax.models import mnist_cgn
from configs import common, imagenet_generate, mnist_generate

MNIST = "double_colored_MNIST_counterfactual"


def _cli(args: list[str], fault: str | None = None, at: int = 0) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = ([sys.executable, os.path.abspath(__file__), fault, str(at), "--"] if fault else
         [sys.executable, "-m", "cgn_jax.main"]) + args
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _killed(args: list[str], fault: str, at: int) -> subprocess.CompletedProcess:
  proc = _cli(args, fault, at)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  return proc


def _files(folder: str) -> dict[str, bytes]:
  """Every file below ``folder`` (hidden ones too) by relative path, with its bytes."""
  out = {}
  for d, _, names in os.walk(folder):
    for n in names:
      with open(os.path.join(d, n), "rb") as f:
        out[os.path.relpath(os.path.join(d, n), folder)] = f.read()
  return out


def _assert_same_dataset(ref: str, other: str) -> None:
  """Same files, same bytes; the manifest equal but for its time stamp."""
  a, b = _files(ref), _files(other)
  assert sorted(b) == sorted(a)
  for name in a:
    if name == "manifest.json":
      ma, mb = json.loads(a[name]), json.loads(b[name])
      ma.pop("created_utc", None)
      mb.pop("created_utc", None)
      assert mb == ma
    else:
      assert b[name] == a[name], name


def _images(files: dict[str, bytes]) -> np.ndarray:
  """The images of a dataset's shards, from ``_files``."""
  names = sorted(n for n in files if n.endswith(".images.npy"))
  return np.concatenate([np.load(io.BytesIO(files[n])) for n in names])


def _mnist_config(**overrides):
  return common.apply_overrides(mnist_generate.get_config("tiny"), **overrides)


def _mnist_args(workdir: str, **overrides) -> list[str]:
  return (["--config", "configs/mnist_generate.py:tiny", "--workdir", workdir]
          + [f"--config.{k}={v}" for k, v in overrides.items()])


def _recipe(config) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The authors' loop written out plainly, one batch at a time: batch i's shape labels are the i-th
  draw of ``default_rng(seed)``, its key ``fold_in(key(seed), i)``; every round of a batch, then the
  next batch; the first ``dataset_size`` images."""
  cgn, variables = mnist_cgn.load_or_init(config.checkpoint, None)
  fn = jax.jit(generate_mnist.make_generate_fn(cgn.clone(subpixel=config.fast_upsample),
                                               config.no_cfs))
  rng, key = np.random.default_rng(config.seed), jax.random.key(config.seed)
  xs, cols = [], {"label": [], "texture": [], "bg": []}
  i = 0
  while sum(map(len, xs)) < config.dataset_size:
    ys = rng.integers(0, 10, config.batch_size).astype(np.int32)
    x, y_fg, y_bg = fn(variables, ys, jax.random.fold_in(key, i))
    xs.append(storage.encode_uint8(np.asarray(x)))
    cols["label"].append(np.tile(ys, config.no_cfs))
    cols["texture"].append(np.asarray(y_fg))
    cols["bg"].append(np.asarray(y_bg))
    i += 1
  n = config.dataset_size
  return np.concatenate(xs)[:n], {k: np.concatenate(v)[:n] for k, v in cols.items()}


@pytest.fixture(scope="module")
def mnist_reference(tmp_path_factory) -> str:
  """The :tiny config uninterrupted: 400 images in batches of 40 (20 masks x 2), 64-image shards."""
  workdir = str(tmp_path_factory.mktemp("mnist_reference"))
  generate_mnist.generate(_mnist_config(), workdir)
  return workdir


# ---------------------------------------------------------------------------------------------
# MNIST

def test_mnist_output_is_the_recipe_and_dataset_size_is_exact(mnist_reference, tmp_path):
  """400 images = 10 whole batches; 390 = the 10th batch cut to its first 30 images."""
  out = os.path.join(mnist_reference, MNIST)
  for path, config in ((out, _mnist_config()),
                       (generate_mnist.generate(_mnist_config(dataset_size=390), str(tmp_path)),
                        _mnist_config(dataset_size=390))):
    images, labels = storage.read_split(path, "train", decode=False)
    want_images, want_labels = _recipe(config)
    count = storage.read_manifest(path)["splits"]["train"]["count"]
    assert len(images) == config.dataset_size == count
    np.testing.assert_array_equal(images, want_images)
    for k, v in want_labels.items():
      np.testing.assert_array_equal(labels[k], v, err_msg=k)
    shards = storage.read_manifest(path)["splits"]["train"]["shards"]
    n = config.dataset_size
    assert [s["count"] for s in shards] == [64] * (n // 64) + [n % 64]
  with Image.open(os.path.join(mnist_reference, MNIST + "_preview.png")) as im:  # 8 x 8, scale 2
    assert im.size == (8 * 66 + 2, 8 * 66 + 2)
    grid = np.asarray(im)
  first = storage.read_split(out, "train", decode=False)[0][:9]
  for i in (0, 8):  # row 0 and row 1, undoubled
    r, c = divmod(i, 8)
    np.testing.assert_array_equal(grid[2 + 66 * r:][:64:2, 2 + 66 * c:][:, :64:2], first[i])


def test_mnist_killed_three_times_then_rerun_equals_uninterrupted(mnist_reference, tmp_path,
                                                                  capsys):
  workdir = str(tmp_path)
  out, staging = os.path.join(workdir, MNIST), os.path.join(workdir, f".{MNIST}.incomplete")
  # leftovers of older runs: DatasetWriter's random temp dir, a killed conversion
  os.makedirs(os.path.join(workdir, f".{MNIST}.incomplete-x1y2z3"))
  open(os.path.join(workdir, f".{MNIST}.incomplete-x1y2z3", "train-00000.images.npy"), "wb").close()
  os.makedirs(os.path.join(workdir, "converted", "mnist_cgn_cgn.tmp-8k2j"))

  _killed(_mnist_args(workdir), "kill_after_shard", 2)  # shards 0-2 = 192 images kept
  assert not os.path.exists(out)
  record = json.load(open(os.path.join(staging, "progress.json")))
  assert [s["stem"] for s in record["info"]["shards"]] == [f"train-{k:05d}" for k in range(3)]

  second = _killed(_mnist_args(workdir), "kill_in_shard", 4)
  assert "resuming" in second.stdout and "at batch 4 of 10" in second.stdout, second.stdout
  assert os.path.exists(os.path.join(staging, "train-00004.labels.npy.part"))

  third = _killed(_mnist_args(workdir), "kill_in_install", 0)
  assert "at batch 6 of 10" in third.stdout, third.stdout  # shard 4 redone: 256 images kept
  assert os.path.isfile(os.path.join(staging, "manifest.json")) and not os.path.exists(out)

  capsys.readouterr()
  generate_mnist.generate(_mnist_config(), workdir)
  assert "wrote" not in capsys.readouterr().out  # only moved into place: nothing regenerated
  _assert_same_dataset(os.path.join(mnist_reference, MNIST), out)
  assert sorted(os.listdir(workdir)) == sorted(["converted", MNIST, MNIST + "_preview.png"])
  assert os.listdir(os.path.join(workdir, "converted")) == []
  with open(os.path.join(workdir, MNIST + "_preview.png"), "rb") as f, \
       open(os.path.join(mnist_reference, MNIST + "_preview.png"), "rb") as g:
    assert f.read() == g.read()


def _export(path: str, variables) -> None:
  shutil.rmtree(path, ignore_errors=True)
  cfg = {k: getattr(mnist_cgn.MnistCGN(), k)
         for k in ("n_classes", "latent_sz", "ngf", "img_sz", "init_type", "init_gain")}
  checkpoints.save_variables(path, jax.tree_util.tree_map(np.asarray, variables),
                             {"family": "mnist_cgn", "model_config": cfg})


def test_mnist_changed_checkpoint_bytes_regenerate_and_replace_only_when_complete(tmp_path, capsys):
  """A generator retrained into the same folder: the old counterfactuals are not served again."""
  ckpt, workdir = str(tmp_path / "generator"), str(tmp_path / "gen")
  out = os.path.join(workdir, MNIST)
  _, v = mnist_cgn.load_or_init("", None)
  _export(ckpt, v)
  config = _mnist_config(checkpoint=ckpt, dataset_size=120)
  generate_mnist.generate(config, workdir)
  old = _files(out)
  capsys.readouterr()
  generate_mnist.generate(config, workdir)
  assert "reusing" in capsys.readouterr().out

  v = jax.tree_util.tree_map(np.asarray, v)
  v["params"]["f_text1"]["bn3"]["bias"] = v["params"]["f_text1"]["bn3"]["bias"] + 0.5
  _export(ckpt, v)  # same path, new bytes
  _killed(_mnist_args(workdir, checkpoint=ckpt, dataset_size=120), "kill_after_shard", 0)
  assert _files(out) == old  # the old dataset stays whole until the new one is complete
  generate_mnist.generate(config, workdir)
  assert "wrote 120" in capsys.readouterr().out
  fresh = generate_mnist.generate(config, str(tmp_path / "fresh"))  # the new bytes, from scratch
  new = storage.read_split(out, "train", decode=False)[0]
  np.testing.assert_array_equal(new, storage.read_split(fresh, "train", decode=False)[0])
  assert (new != _images(old)).any()
  assert sorted(os.listdir(workdir)) == sorted([MNIST, MNIST + "_preview.png"])


def test_mnist_new_bytes_under_an_old_pth_name_are_converted_anew(data_dir, tmp_path):
  """The authors' files: colored, then wildlife copied over the same ``cgn.pth``."""
  pretrained = os.path.join(data_dir, "pretrained", "mnist_cgn")
  pth, workdir = str(tmp_path / "cgn.pth"), str(tmp_path / "gen")
  config = _mnist_config(checkpoint=pth, dataset_size=20, no_cfs=1)
  shutil.copy(os.path.join(pretrained, "colored_MNIST.pth"), pth)
  first = storage.read_split(generate_mnist.generate(config, workdir), "train", decode=False)[0]
  shutil.copy(os.path.join(pretrained, "wildlife_MNIST.pth"), pth)
  second = storage.read_split(generate_mnist.generate(config, workdir), "train", decode=False)[0]
  direct = generate_mnist.generate(
      _mnist_config(checkpoint=os.path.join(pretrained, "wildlife_MNIST.pth"), dataset_size=20,
                    no_cfs=1), str(tmp_path / "direct"))
  np.testing.assert_array_equal(second, storage.read_split(direct, "train", decode=False)[0])
  assert (second != first).mean() > 0.5
  assert len(os.listdir(os.path.join(workdir, "converted"))) == 1  # the old conversion is gone


def test_mnist_unknown_dataset_is_refused_in_one_line(tmp_path):
  proc = _cli(_mnist_args(str(tmp_path), dataset="wildlife"))
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "'wildlife'" in errors[0], proc.stderr[-2000:]
  assert all(v in errors[0] for v in VARIANTS), errors[0]
  assert os.listdir(tmp_path) == []


_PARSE = """
import sys
from absl import flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config")
flags.FLAGS(["x", "--config", "configs/mnist_generate.py"] + sys.argv[1:])
print(flags.FLAGS.config.checkpoint)
"""


def test_mnist_default_checkpoint_follows_the_dataset():
  """Through the real flag parser, as the command line sets it."""
  def parsed(*flags_):
    proc = subprocess.run([sys.executable, "-c", _PARSE, *flags_], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()

  pretrained = os.path.join(common.DATA_DIR, "pretrained", "mnist_cgn")
  assert parsed() == os.path.join(pretrained, "double_colored_MNIST.pth")
  for variant in VARIANTS:
    assert parsed(f"--config.dataset={variant}") == os.path.join(pretrained, f"{variant}.pth")
  for order in (["--config.checkpoint=/w/gen", "--config.dataset=wildlife_MNIST"],
                ["--config.dataset=wildlife_MNIST", "--config.checkpoint=/w/gen"]):
    assert parsed(*order) == "/w/gen"  # an explicit checkpoint wins


def test_parts_of_several_processes_merge_in_part_order(tmp_path):
  """What each process of a multi-process run does, here in one: its own part, resumable."""
  path, fp = str(tmp_path / "ds"), {"run": 1}
  x = np.arange(20 * 2 * 2 * 3, dtype=np.uint8).reshape(20, 2, 2, 3)
  y = np.arange(20) % 7
  w0 = storage.PartWriter(path, fp, part="p000", shard_size=3)
  w0.add(x[:5], {"label": y[:5]})  # one shard written, two rows pending: "killed" here
  w0 = storage.PartWriter(path, fp, part="p000", shard_size=3)
  assert w0.rows == 3
  w0.add(x[3:10], {"label": y[3:10]})
  w0.close()
  w1 = storage.PartWriter(path, fp, part="p001", shard_size=3)
  w1.add(x[10:], {"label": y[10:]})
  w1.close()
  stale = storage.PartWriter(path, {"run": 0}, part="p002", shard_size=3)  # another run's part
  stale.add(x[:4], {"label": y[:4]})
  storage.install_parts(path, {"name": "t"}, ["p000", "p001"])
  images, labels = storage.read_split(path, "train", decode=False)
  np.testing.assert_array_equal(images, x)
  np.testing.assert_array_equal(labels["label"], y)
  m = storage.read_manifest(path)
  assert [s["stem"] for s in m["splits"]["train"]["shards"]] == (
      [f"train-p000-{k:05d}" for k in range(4)] + [f"train-p001-{k:05d}" for k in range(4)])
  assert m["splits"]["train"]["label_histogram"]["label"] == np.bincount(y).tolist()
  assert m["fingerprint"] == fp and storage.dataset_state(path, fp) == "complete"
  assert sorted(os.listdir(path)) == sorted(
      ["manifest.json"] + [f"{s['stem']}.{k}.npy" for s in m["splits"]["train"]["shards"]
                           for k in ("images", "labels")])
  assert os.listdir(tmp_path) == ["ds"]


def test_each_process_takes_the_rows_its_devices_hold():
  """The rows of a [no_cfs, B] array sharded over B, from the addressable shards: here (one
  process, 4 devices) every row, as np.asarray gives them."""
  mesh = generate_mnist.parallel.create_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
  x = jax.device_put(np.arange(3 * 8 * 2).reshape(3, 8, 2), sharding)
  assert len(x.addressable_shards) == 4
  np.testing.assert_array_equal(generate_mnist._held_rows(sharding, (3, 8)), np.arange(8))
  np.testing.assert_array_equal(generate_mnist._local_rows(x), np.asarray(x))


# ---------------------------------------------------------------------------------------------
# ImageNet

def _imagenet_args(workdir: str) -> list[str]:
  return ["--config", "configs/imagenet_generate.py:tiny", "--workdir", workdir]


@pytest.fixture(scope="module")
def imagenet_reference(tmp_path_factory) -> str:
  """The :tiny config uninterrupted: 10 images in batches of 4 (the last one padded)."""
  workdir = str(tmp_path_factory.mktemp("imagenet_reference"))
  generate_imagenet.run(imagenet_generate.get_config("tiny"), workdir)
  return workdir


def test_imagenet_killed_twice_then_rerun_equals_uninterrupted(imagenet_reference, tmp_path):
  workdir = str(tmp_path)
  run_dir = os.path.join(workdir, "tiny")
  os.makedirs(os.path.join(workdir, "converted", "imagenet_cgn_cgn.tmp-k3j2"))
  _killed(_imagenet_args(workdir), "kill_in_jpeg", 6)  # batch 4-7 half written
  with open(os.path.join(run_dir, "labels.csv")) as f:
    assert [l.split(",")[0] for l in f.read().splitlines()[1:]] == ["0", "1", "2", "3"]
  assert any(n.endswith(".tmp") for n in os.listdir(os.path.join(run_dir, "ims")))
  open(os.path.join(run_dir, ".manifest.json.w8x9.tmp"), "wb").close()  # a killed manifest write

  _killed(_imagenet_args(workdir), "kill_after_batch", 1)  # then 4-7 complete
  with open(os.path.join(run_dir, "labels.csv")) as f:
    assert len(f.read().splitlines()) == 1 + 8

  res = generate_imagenet.run(imagenet_generate.get_config("tiny"), workdir)
  assert (res["written"], res["skipped"]) == (2, 8)
  _assert_same_dataset(os.path.join(imagenet_reference, "tiny"), run_dir)
  with open(os.path.join(workdir, "tiny_preview.png"), "rb") as f, \
       open(os.path.join(imagenet_reference, "tiny_preview.png"), "rb") as g:
    assert f.read() == g.read()
  assert sorted(os.listdir(workdir)) == ["converted", "tiny", "tiny_preview.png"]
  assert os.listdir(os.path.join(workdir, "converted")) == []


def test_imagenet_preview_shows_the_first_images(imagenet_reference):
  with Image.open(os.path.join(imagenet_reference, "tiny_preview.png")) as im:
    assert im.size == (8 * 34 + 2, 2 * 34 + 2)  # 10 images, 8 per row, 2-px borders
    grid = np.asarray(im)
  for i in (0, 9):
    r, c = divmod(i, 8)
    jpeg = os.path.join(imagenet_reference, "tiny", "ims", f"tiny_{i:07d}_x_gen.jpg")
    with Image.open(jpeg) as im:
      np.testing.assert_array_equal(grid[2 + 34 * r:][:32, 2 + 34 * c:][:, :32], np.asarray(im))


def test_imagenet_changed_checkpoint_bytes_are_refused(tmp_path):
  """A run directory never mixes two generators: new bytes at the same path are refused."""
  config = common.apply_overrides(imagenet_generate.get_config("tiny"), n_data=4)
  cfg, _, load = generate_imagenet._resolve_model(config, str(tmp_path))
  variables = jax.tree_util.tree_map(np.asarray, load())
  ckpt = str(tmp_path / "cgn")
  meta = {"family": "imagenet_cgn", "model_config": cfg.to_dict()}
  checkpoints.save_variables(ckpt, variables, meta)
  config = common.apply_overrides(config, checkpoint=ckpt, allow_random_init=False)
  res = generate_imagenet.run(config, str(tmp_path))
  assert res["written"] == 4
  before = _files(res["run_dir"])
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  shutil.rmtree(ckpt)
  changed = jax.tree_util.tree_unflatten(treedef, [leaves[0] + 1] + leaves[1:])
  checkpoints.save_variables(ckpt, changed, meta)
  with pytest.raises(FileExistsError, match="checkpoint_sha256"):
    generate_imagenet.run(common.apply_overrides(config, n_data=6), str(tmp_path))
  assert _files(res["run_dir"]) == before
