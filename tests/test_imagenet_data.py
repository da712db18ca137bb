"""The ImageNet classifier data (cgn_jax/data/imagenet.py) on tiny folders built here with PIL.

Expected values are hand computations: pixel slices of images whose resize is a no-op (PIL returns
a copy), the torchvision rounding rules written out, constant images whose normalised value is known,
and the label files of ../shared/data/eval. Every random draw is seeded.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cgn_jax.data import imagenet as inet
from cgn_jax.data import imagenet_cfs
from cgn_jax.data.storage import DataError

SIZES = [(40, 30), (30, 40), (64, 48), (50, 50), (33, 71)]  # (width, height)


def save(path, size=(40, 30), seed=0, value=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  w, h = size
  arr = (np.full((h, w, 3), value, np.uint8) if value is not None else
         np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
  Image.fromarray(arr).save(path)
  return arr


def make_folder(root, classes, per_class=2, ext=".JPEG"):
  n = 0
  for c in classes:
    for i in range(per_class):
      save(os.path.join(root, c, f"img{i}{ext}"), SIZES[n % len(SIZES)], seed=n)
      n += 1
  return root


def expected_norm(pixels, mean=inet.IMAGENET_MEAN, std=inet.IMAGENET_STD):
  x = np.asarray(pixels).astype(np.float32) / np.float32(255)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def one_line(err):
  assert "\n" not in str(err.value) and str(err.value)


# -- rows ---------------------------------------------------------------------------------------------


def test_wnid_folders_use_the_imagenet_index_and_plain_folders_sorted_order(tmp_path, data_dir):
  index = os.path.join(data_dir, "eval", "imagenet_class_index.json")
  root = make_folder(str(tmp_path / "wnid"), ["n15075141", "n01443537", "n01440764"])
  rows = inet.image_folder(root, index)
  assert len(rows) == 6 and rows.labels["label"].dtype == np.int32
  got = {os.path.basename(os.path.dirname(p)): int(l) for p, l in zip(rows.paths, rows.labels["label"])}
  assert got == {"n01440764": 0, "n01443537": 1, "n15075141": 999}
  plain = make_folder(str(tmp_path / "plain"), ["zebra", "apple", "n01440764"], per_class=1)
  rows = inet.image_folder(plain, index)  # not all WNIDs: torchvision's sorted order
  assert rows.classes == ("apple", "n01440764", "zebra")
  assert list(rows.labels["label"]) == [0, 1, 2]
  assert [os.path.basename(p) for p in rows.paths] == ["img0.JPEG"] * 3


def test_imagenet_split_layouts_and_kaggle_flat_val(tmp_path, data_dir):
  index = os.path.join(data_dir, "eval", "imagenet_class_index.json")
  make_folder(str(tmp_path / "a" / "train"), ["n01443537"])
  assert list(inet.imagenet_split(str(tmp_path / "a"), "train", index).labels["label"]) == [1, 1]
  make_folder(str(tmp_path / "tfds" / "ILSVRC2012_img_train"), ["n01440764"], ext=".png")
  assert len(inet.imagenet_split(str(tmp_path / "tfds"), "train", index)) == 2
  val = tmp_path / "k" / "ILSVRC" / "Data" / "CLS-LOC" / "val"
  for i in (1, 2):
    save(str(val / f"ILSVRC2012_val_{i:08d}.JPEG"))
  (tmp_path / "k" / "LOC_val_solution.csv").write_text(
      "ImageId,PredictionString\nILSVRC2012_val_00000002,n15075141 1 2 3 4\n"
      "ILSVRC2012_val_00000001,n01443537 5 6 7 8 n01443537 1 1 2 2\n")
  rows = inet.imagenet_split(str(tmp_path / "k"), "validation", index)
  assert list(rows.labels["label"]) == [1, 999]


def test_missing_or_empty_folders_fail_with_one_line(tmp_path):
  for call in (lambda: inet.image_folder(str(tmp_path / "nope")),
               lambda: inet.imagenet_split(str(tmp_path), "train"),
               lambda: inet.counterfactual_rows(str(tmp_path / "nope")),
               lambda: inet.cue_conflict_rows(str(tmp_path / "nope")),
               lambda: inet.in9_rows(str(tmp_path), "mixed_rand")):
    with pytest.raises(DataError) as err:
      call()
    one_line(err)
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  with pytest.raises(DataError, match="holds no") as err:
    inet.image_folder(str(tmp_path / "empty"))
  one_line(err)
  (tmp_path / "flat").mkdir()
  save(str(tmp_path / "flat" / "x.jpg"))
  with pytest.raises(DataError, match="LOC_val_solution"):
    inet.image_folder(str(tmp_path / "flat"))


def test_eval_file_is_under_the_shared_data_dir():
  from configs.common import DATA_DIR
  assert inet.eval_file("in9_classes.txt") == os.path.join(DATA_DIR, "eval", "in9_classes.txt")


# -- transforms -----------------------------------------------------------------------------------------


def test_normalize_is_torchvision_float32_order():
  v = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)
  want = ((v.astype(np.float32) / np.float32(255)) - np.float32([0.485, 0.456, 0.406])) \
      / np.float32([0.229, 0.224, 0.225])
  got = inet.normalize(v, inet.IMAGENET_MEAN, inet.IMAGENET_STD)
  assert got.dtype == np.float32 and np.array_equal(got, want)


@pytest.mark.parametrize("w,h,top,left", [(256, 320, 48, 16), (256, 257, 16, 16), (259, 256, 16, 18)])
def test_eval_crop_is_the_centre_slice_with_torchvision_rounding(tmp_path, w, h, top, left):
  # Shorter side already 256: Resize is the identity, so the output is a pixel slice. Offsets are
  # int(round(margin / 2)) with half-to-even: 33/2 -> 16, 35/2 -> 18.
  arr = save(str(tmp_path / "x.png"), (w, h), seed=3)
  out = inet.EvalTransform()(inet.load_image(str(tmp_path / "x.png")))
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  assert np.array_equal(out, expected_norm(arr[top:top + 224, left:left + 224]))


def test_eval_resize_shorter_side_and_constant_image(tmp_path):
  img = Image.new("RGB", (500, 375), (200, 100, 7))
  assert inet.resize_shorter(img, 256).size == (341, 256)  # int(256 * 500 / 375) = 341
  assert inet.resize_shorter(img.transpose(Image.TRANSPOSE), 256).size == (256, 341)
  out = inet.EvalTransform()(img)
  assert np.array_equal(out, np.broadcast_to(expected_norm([[[200, 100, 7]]]), out.shape))
  in9 = inet.EvalTransform(mean=inet.IN9_MEAN, std=inet.IN9_STD)(img)
  assert np.allclose(in9[0, 0], (np.array([200, 100, 7]) / 255 - np.array([0.4717, 0.4499, 0.3837]))
                     / np.array([0.26, 0.2516, 0.2575]), atol=1e-5)


def test_random_resized_crop_params_follow_torchvision():
  rng = np.random.default_rng(0)
  for _ in range(300):
    top, left, h, w = inet.random_resized_crop_params(120, 90, rng)
    assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 120
    assert 0.08 * 0.9 <= h * w / (120 * 90) <= 1.0
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
  # No try fits a 1000x10 strip: the fallback is the centred crop of ratio 4/3, h = 10,
  # w = round(10 * 4/3) = 13, left = (1000 - 13) // 2.
  assert inet.random_resized_crop_params(1000, 10, rng, scale=(0.9, 1.0)) == (0, 493, 10, 13)
  assert inet.random_resized_crop_params(10, 1000, rng, scale=(0.9, 1.0)) == (493, 0, 13, 10)
  assert inet.random_resized_crop_params(30, 30, rng, scale=(5.0, 6.0)) == (0, 0, 30, 30)


def test_train_transform_seeded_shape_and_flip(tmp_path):
  img = Image.fromarray(save(str(tmp_path / "x.png"), (90, 70), seed=1))
  t = inet.TrainTransform()
  a = t(img, np.random.default_rng(5))
  assert a.shape == (224, 224, 3) and a.dtype == np.float32
  assert np.array_equal(a, t(img, np.random.default_rng(5)))
  assert not np.array_equal(a, t(img, np.random.default_rng(6)))
  # Whole-image crop of a 224 image (resize is the identity), always flipped: the mirrored pixels.
  square = save(str(tmp_path / "s.png"), (224, 224), seed=2)
  whole = inet.TrainTransform(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0)
  got = whole(Image.fromarray(square), np.random.default_rng(0))
  assert np.array_equal(got, expected_norm(square[:, ::-1]))
  with pytest.raises(ValueError):
    t(img, None)


# -- batch sources ----------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
  return inet.image_folder(make_folder(str(tmp_path / "f"), ["a", "b", "c", "d", "e"]))


def test_batches_are_a_function_of_seed_and_step(folder):
  mk = lambda seed=0: inet.ImageBatches(folder, 4, inet.TrainTransform(), seed, process_index=0,
                                        process_count=1)
  a, b = mk(), mk()
  assert a.steps_per_epoch == 2  # 10 images // 4, the partial batch dropped
  seq = [a.batch(s) for s in range(5)]  # sequential, prefetched
  direct = b.batch(4)  # a fresh source jumping straight to step 4 (a resume)
  assert set(direct) == {"image", "label"}
  assert direct["image"].shape == (4, 224, 224, 3) and direct["label"].dtype == np.int32
  for k in direct:
    assert np.array_equal(seq[4][k], direct[k])
  assert np.array_equal(b.batch(1)["image"], seq[1]["image"])  # and back again
  assert not np.array_equal(mk(1).batch(0)["image"], seq[0]["image"])
  assert len(set(a.order(0).tolist())) == 8  # no image twice within an epoch
  assert a.position(5) == {"epoch": 2, "batch_in_epoch": 1, "seed": 0, "stream": 0}
  labels = folder.labels["label"][a.order(2)[0:4]]  # step 4 = epoch 2, batch 0
  assert np.array_equal(seq[4]["label"], labels)
  a.close()
  b.close()


def test_process_rows_concatenate_to_the_single_process_batch(folder):
  mk = lambda i, n: inet.ImageBatches(folder, 4, inet.TrainTransform(), 7, process_index=i,
                                      process_count=n)
  whole, p0, p1 = mk(0, 1).batch(3), mk(0, 2).batch(3), mk(1, 2).batch(3)
  assert p0["image"].shape == (2, 224, 224, 3)
  for k in whole:
    assert np.array_equal(np.concatenate([p0[k], p1[k]]), whole[k])
  with pytest.raises(ValueError, match="multiple of 3"):
    mk(0, 3)


def test_eval_batches_pad_the_last_batch_and_mask_it(folder):
  for n in (1, 2):
    parts = [list(inet.EvalBatches(folder, 4, inet.EvalTransform(), process_index=i,
                                   process_count=n)) for i in range(n)]
    assert all(len(p) == 3 for p in parts)
    last = {k: np.concatenate([p[2][k] for p in parts]) for k in parts[0][2]}
    assert set(last) == {"image", "label", "mask", "index"}
    assert list(last["mask"]) == [True, True, False, False]
    assert list(last["index"]) == [8, 9, -1, -1] and last["index"].dtype == np.int32
    assert not last["image"][2:].any() and list(last["label"][2:]) == [0, 0]
    assert sum(int(b["mask"].sum()) for p in parts for b in p) == 10
  want = inet.EvalTransform()(inet.load_image(folder.paths[9]))
  assert np.array_equal(last["image"][1], want) and last["label"][1] == folder.labels["label"][9]
  src = inet.EvalBatches(folder, 4, inet.EvalTransform(), process_index=0, process_count=1)
  assert src.num_examples == 10
  with pytest.raises(IndexError):
    src.batch(3)


def test_a_corrupt_image_fails_naming_it(tmp_path):
  root = make_folder(str(tmp_path / "f"), ["a"], per_class=2)
  bad = os.path.join(root, "a", "img1.JPEG")
  open(bad, "wb").write(b"not a jpeg")
  src = inet.EvalBatches(inet.image_folder(root), 2, inet.EvalTransform(), process_index=0,
                         process_count=1)
  with pytest.raises(DataError, match="img1.JPEG") as err:
    src.batch(0)
  one_line(err)


# -- counterfactuals -----------------------------------------------------------------------------------


def write_cf_run(run, run_name, labels, authors=False, suffix="x_gen"):
  rows = {}
  for i, (s, t, b) in enumerate(labels):
    name = imagenet_cfs.image_name(run_name, i)
    save(os.path.join(run, "ims", f"{name}_{suffix}.jpg"), (48, 40), seed=i)
    rows[i] = (f",{name},{s},{t},{b}" if authors else f"{i},{name},{s},{t},{b}")
  if authors:  # the authors' pandas header-per-row appends, with a blank first column
    text = ",im_name,shape_cls,texture_cls,bg_cls\n" + "".join(r + "\n" for r in rows.values())
    open(os.path.join(run, "labels.csv"), "w").write(text)
  else:
    imagenet_cfs.write_rows(os.path.join(run, "labels.csv"), rows)
  return run


def test_counterfactual_rows_from_our_run_and_the_authors_layout(tmp_path):
  run = write_cf_run(str(tmp_path / "run"), "demo", [(1, 2, 3), (4, 5, 6), (999, 0, 7)])
  json.dump({"kind": "dataset", "complete": True}, open(os.path.join(run, "manifest.json"), "w"))
  rows = inet.counterfactual_rows(run)
  assert [os.path.basename(p) for p in rows.paths] == [
      "demo_0000000_x_gen.jpg", "demo_0000001_x_gen.jpg", "demo_0000002_x_gen.jpg"]
  assert set(rows.labels) == set(inet.CF_LABELS)
  assert list(rows.labels["shape_label"]) == [1, 4, 999]
  assert list(rows.labels["texture_label"]) == [2, 5, 0]
  assert list(rows.labels["bg_label"]) == [3, 6, 7]
  parent = tmp_path / "cf_data"
  write_cf_run(str(parent / "train_b"), "b", [(8, 8, 8)], authors=True)
  write_cf_run(str(parent / "train_a"), "a", [(9, 9, 9), (1, 1, 1)], authors=True)
  write_cf_run(str(parent / "val_a"), "v", [(2, 2, 2)], authors=True)
  assert list(inet.counterfactual_rows(str(parent)).labels["shape_label"]) == [9, 1, 8]
  assert list(inet.counterfactual_rows(str(parent), "val").labels["bg_label"]) == [2]


def test_counterfactual_rows_refuse_incomplete_runs(tmp_path):
  run = write_cf_run(str(tmp_path / "run"), "demo", [(1, 2, 3), (4, 5, 6)])
  with pytest.raises(DataError, match="suffix") as err:
    inet.counterfactual_rows(run, suffix="silhouette")
  one_line(err)
  os.remove(os.path.join(run, "ims", "demo_0000001_x_gen.jpg"))
  with pytest.raises(DataError, match="1 of the 2 images"):
    inet.counterfactual_rows(run)
  json.dump({"kind": "dataset", "complete": False}, open(os.path.join(run, "manifest.json"), "w"))
  with pytest.raises(DataError, match="finish the generation"):
    inet.counterfactual_rows(run)
  shards = tmp_path / "shards"
  shards.mkdir()
  (shards / "labels_000.csv").write_text(imagenet_cfs.HEADER + "\n")
  with pytest.raises(DataError, match="did not finish"):
    inet.counterfactual_rows(str(shards))


def test_ensemble_batches_draw_cf_ratio_counterfactuals_per_step(tmp_path, folder):
  cf = inet.counterfactual_rows(write_cf_run(str(tmp_path / "run"), "r", [(1, 2, 3), (4, 5, 6),
                                                                           (7, 8, 9)]))
  assert inet.cf_batch_size(0.5, 256) == 128 and inet.cf_batch_size(1.0, 32) == 32
  src = inet.ensemble_batches(folder, cf, 4, 0.5, seed=0, process_index=0, process_count=1)
  assert src.cf.batch_size == 2 and src.cf.steps_per_epoch == src.steps_per_epoch == 2
  # 2 steps x 2 rows = 4 > 3 counterfactuals: drawn from the set repeated twice.
  ids = src.cf.order(0)
  assert len(ids) == 4 and np.bincount(ids, minlength=3).max() <= 2
  out = src.batch(1)
  assert out["real"]["image"].shape == (4, 224, 224, 3)
  assert set(out["cf"]) == {"image", *inet.CF_LABELS}
  assert out["cf"]["image"].shape == (2, 224, 224, 3)
  rows = ids[2:4]
  assert list(out["cf"]["shape_label"]) == list(cf.labels["shape_label"][rows])
  assert list(out["cf"]["bg_label"]) == list(cf.labels["bg_label"][rows])
  again = inet.ensemble_batches(folder, cf, 4, 0.5, seed=0, process_index=0, process_count=1)
  assert np.array_equal(again.batch(1)["cf"]["image"], out["cf"]["image"])
  assert (src.real.position(0)["stream"], src.cf.position(0)["stream"]) == (0, 1)
  assert src.position(3) == {"real": src.real.position(3), "cf": src.cf.position(3)}
  with pytest.raises(ValueError, match="cf_ratio"):
    inet.ensemble_batches(folder, cf, 4, 0.1, seed=0, process_index=0, process_count=1)
  baseline = inet.ensemble_batches(folder, cf, 4, 0.0, seed=0, process_index=0, process_count=1)
  assert set(baseline.batch(1)) == {"real"}  # the same ImageNet stream as with counterfactuals
  assert np.array_equal(baseline.batch(1)["real"]["image"], out["real"]["image"])
  longer = inet.ensemble_batches(folder, cf, 4, 1.0, seed=0, steps_per_epoch=3, process_index=0,
                                 process_count=1)
  assert longer.real.steps_per_epoch == longer.cf.steps_per_epoch == 3
  baseline.close()
  longer.close()
  src.close()
  again.close()


# -- evaluation sets -----------------------------------------------------------------------------------


def test_cue_conflict_names_give_shape_texture_and_conflict(tmp_path, data_dir):
  cats = os.path.join(data_dir, "eval", "geirhos16_categories.json")
  root = tmp_path / "cue"
  for rel in ["airplane/airplane1-bear2.png", "airplane/airplane3-airplane1.png",
              "bear/bear10-truck12.png", "knife/0003_cl_knife2-oven3.png"]:
    save(str(root / rel), (64, 64))
  (root / "bear" / "notes.txt").write_text("ignored")
  rows = inet.cue_conflict_rows(str(root), cats)
  names = [os.path.basename(p) for p in rows.paths]
  assert names == ["airplane1-bear2.png", "airplane3-airplane1.png", "bear10-truck12.png",
                   "0003_cl_knife2-oven3.png"]
  # alphabetical 16: airplane 0, bear 1, knife 13, oven 14, truck 15
  assert list(rows.labels["shape_label"]) == [0, 0, 1, 13]
  assert list(rows.labels["texture_label"]) == [1, 0, 15, 14]
  assert list(rows.labels["conflict"]) == [True, False, True, True]
  assert len(rows.select(rows.labels["conflict"])) == 3
  save(str(root / "bear" / "cat1-dog2.png"), (8, 8))
  with pytest.raises(DataError, match="folder of 'bear'") as err:
    inet.cue_conflict_rows(str(root), cats)
  one_line(err)
  os.remove(root / "bear" / "cat1-dog2.png")
  save(str(root / "bear" / "bear1-zebra2.png"), (8, 8))
  with pytest.raises(DataError, match="16 categories"):
    inet.cue_conflict_rows(str(root), cats)


def test_in9_variants_labels_and_transform(tmp_path, data_dir):
  classes = os.path.join(data_dir, "eval", "in9_classes.txt")
  root = tmp_path / "in9"
  for v in inet.IN9_VARIANTS:
    for c in ["00_dog", "02_wheeled vehicle", "08_fish"]:
      save(str(root / v / "val" / c / f"{v}.JPEG"), (224, 224), value=128)
  for v in inet.IN9_VARIANTS:
    rows = inet.in9_rows(str(root), v, classes)
    assert list(rows.labels["label"]) == [0, 2, 8] and rows.classes[8] == "Fish"
  src = inet.EvalBatches(rows, 2, inet.AsIsTransform(), process_index=0, process_count=1)
  first = src.batch(0)["image"]
  assert np.allclose(first, expected_norm([[[128] * 3]], inet.IN9_MEAN, inet.IN9_STD), atol=1e-6)
  save(str(root / "only_fg" / "val" / "00_dog" / "big.JPEG"), (300, 250))
  src = inet.EvalBatches(inet.in9_rows(str(root), "only_fg", classes), 4, inet.AsIsTransform(),
                         process_index=0, process_count=1)
  with pytest.raises(DataError, match="EvalTransform"):
    src.batch(0)
  os.rename(root / "original" / "val" / "08_fish", root / "original" / "val" / "08_dog")
  with pytest.raises(DataError, match="IN-9 class folder") as err:
    inet.in9_rows(str(root), "original", classes)
  one_line(err)
