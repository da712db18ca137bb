"""Hand-built logits whose top-k, shape bias, IN-9 accuracies and BG-gap are known exactly.

Expected values are counted by hand in each test (not recomputed through the module), on the real
mapping files of shared/data/eval.
"""

import os

import jax
import numpy as np
import pytest

from cgn_jax.evaluation import classifier_metrics as cm

# ImageNet indices picked from shared/data/eval (datasets.md §5), one per role.
DOG, KNIFE, OVEN = 152, 499, 766
TENCH = 0           # IN-9 class 8 (Fish)
CHIHUAHUA = 151     # IN-9 class 0 (Dog)
COCK = 7            # IN-9 class 1 (Bird)
AMBULANCE = 407     # IN-9 class 2 (Vehicle)
SALAMANDER = 25     # in no IN-9 class (-1)


@pytest.fixture(scope="module")
def maps(data_dir):
  return cm.load_mappings(os.path.join(data_dir, "eval"))


def one_hot_logits(tops, high=20.0, num=1000):
  """Each row: ``high`` at the listed ImageNet indices, 0 elsewhere."""
  x = np.zeros((len(tops), num), np.float32)
  for row, idx in enumerate(tops):
    x[row, np.atleast_1d(idx)] = high
  return x


def test_mappings_match_the_documented_files(maps):
  assert maps.categories == tuple(sorted(maps.categories)) and len(maps.categories) == 16
  assert maps.categories[0] == "airplane" and maps.categories[-1] == "truck"
  all_idx = [i for c in maps.categories for i in maps.category_indices[c]]
  assert len(all_idx) == len(set(all_idx)) == 207
  assert maps.category_indices["knife"] == (KNIFE,) and maps.category_indices["oven"] == (OVEN,)
  assert maps.category_indices["bear"] == (294, 295, 296, 297)
  assert len(maps.category_indices["dog"]) == 109
  assert maps.in_to_in9.shape == (1000,)
  assert np.bincount(maps.in_to_in9[maps.in_to_in9 >= 0]).tolist() == [116, 52, 42, 36, 35, 27,
                                                                       26, 20, 16]
  assert int(np.sum(maps.in_to_in9 == -1)) == 630
  assert maps.in9_classes[0] == "Dog" and maps.in9_classes[8] == "Fish"
  assert [maps.in_to_in9[i] for i in (TENCH, CHIHUAHUA, COCK, AMBULANCE, SALAMANDER)] == [
      8, 0, 1, 2, -1]


def test_missing_mapping_dir_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="shared/data/eval"):
    cm.load_mappings(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# top-k

def test_topk_counts_with_ties_rank_lower_index_first():
  logits = np.array([
      [5., 1., 1., 0., 0., 0.],   # label 0: rank 0
      [1., 1., 0., 0., 0., 0.],   # label 1 ties with 0, ranked after it: rank 1
      [0., 3., 2., 2., 2., 0.],   # label 4: below 1, after tied 2 and 3: rank 3 (top-5 only)
      [0., 3., 2., 2., 2., 0.],   # label 2: below 1, first of the tie: rank 1
      [1., 1., 1., 1., 1., 1.],   # label 5 in an all-equal row: rank 5 (outside top-5)
      [1., 1., 1., 1., 1., 1.],   # label 0 in an all-equal row: rank 0
  ])
  labels = np.array([0, 1, 4, 2, 5, 0])
  got = cm.topk_correct(logits, labels, ks=(1, 2, 3, 5))
  # top-1: rows 0, 5; top-2 and top-3: + rows 1, 3; top-5: + row 2.
  assert got == {"top1": 2, "top2": 4, "top3": 4, "top5": 5, "count": 6}
  # Same tie rule as jax.lax.top_k on a tie-heavy random case.
  rng = np.random.default_rng(0)
  x = rng.integers(0, 3, size=(64, 10)).astype(np.float32)
  y = rng.integers(0, 10, size=64)
  _, top = jax.lax.top_k(x, 3)
  top = np.asarray(top)
  expect = {"top1": int(np.sum(top[:, 0] == y)), "top3": int(np.sum((top == y[:, None]).any(1))),
            "count": 64}
  assert cm.topk_correct(x, y, ks=(1, 3)) == expect


def test_partial_last_batch_accumulates_to_the_one_pass_accuracy():
  # 10 images, 7 right at top-1 (rows 3, 6, 9 predict label + 1); batches of 4, 4, 2.
  labels = np.arange(10) % 5
  logits = np.zeros((10, 5))
  logits[np.arange(10), labels] = 1.0
  for r in (3, 6, 9):
    logits[r, (labels[r] + 1) % 5] = 2.0
  batches = [slice(0, 4), slice(4, 8), slice(8, 10)]
  total = cm.sum_counts(cm.topk_correct(logits[b], labels[b], ks=(1,)) for b in batches)
  assert total == cm.topk_correct(logits, labels, ks=(1,)) == {"top1": 7, "count": 10}
  assert cm.accuracies(total) == {"top1": 70.0}
  # The authors' batch_size * num_batches denominator: 7 / 12.
  assert cm.authors_in9_accuracy(7, batch_size=4, num_batches=3) == pytest.approx(700 / 12)


def test_sum_counts_rejects_mismatched_keys_and_percent_rejects_empty():
  with pytest.raises(ValueError, match="keys differ"):
    cm.sum_counts([{"top1": 1, "count": 2}, {"correct": 1, "count": 2}])
  with pytest.raises(ValueError, match="no images"):
    cm.percent(0, 0)


def test_nan_logits_are_refused():
  with pytest.raises(ValueError, match="NaN"):
    cm.topk_correct(np.array([[np.nan, 0.0]]), [0])


# ----------------------------------------------------------------------------------------------
# shape bias

def test_shape_bias_counts_drops_same_cue_and_ignores_neither(maps):
  # (shape, texture, decided category) per image; the expected outcome by hand on the right.
  images = [
      ("cat", "dog", "cat"),                 # shape
      ("cat", "dog", "dog"),                 # texture
      ("car", "clock", "car"),               # shape
      ("knife", "oven", "truck"),            # neither
      ("bear", "bear", "bear"),              # dropped, although the decision matches both
      ("oven", "bird", "bird"),              # texture
      ("airplane", "elephant", "airplane"),  # shape
  ]
  shape, texture, decided = zip(*images)
  # Every member of the decided category high, so the mean over its members is unambiguous.
  logits = one_hot_logits([maps.category_indices[c] for c in decided])
  res = cm.shape_bias(logits, shape, texture, maps)
  names = [maps.categories[d] for d in res.decisions]
  assert names == ["cat", "dog", "car", "truck", "bear", "bird", "airplane"]
  assert res.counts == {"shape": 3, "texture": 2, "neither": 1, "dropped": 1, "count": 7}
  assert res.shape_bias == pytest.approx(3 / 5)
  assert res.metrics["shape_fraction"] == pytest.approx(3 / 6)
  assert res.metrics["texture_fraction"] == pytest.approx(2 / 6)
  assert res.metrics["shape_fraction_all"] == pytest.approx(3 / 7)
  # Integer labels give the same counts; uneven batches (3 + 4) sum to the one-pass counts.
  def ids(names):
    return [maps.categories.index(n) for n in names]
  parts = [cm.shape_bias_counts(logits[s], ids(shape[s]), ids(texture[s]), maps)[1]
           for s in (slice(0, 3), slice(3, 7))]
  assert cm.sum_counts(parts) == res.counts


def test_single_high_logit_decides_by_mean_not_sum(maps):
  # Probabilities set directly: knife's one class 0.2; each of dog's 109 classes 0.005 (sum 0.545).
  probs = np.zeros((1, 1000))
  probs[0, KNIFE] = 0.2
  probs[0, list(maps.category_indices["dog"])] = 0.005
  probs[0, SALAMANDER] = 1.0 - probs.sum()
  assert maps.categories[cm.decide_16(probs, maps)[0]] == "knife"           # 0.2 > 0.005
  assert maps.categories[cm.decide_16(probs, maps, "sum")[0]] == "dog"      # 0.545 > 0.2
  # A single high dog logit: mean over 109 members ~ 1/109 still beats every other category.
  res = cm.shape_bias(one_hot_logits([DOG]), ["dog"], ["cat"], maps)
  assert maps.categories[res.decisions[0]] == "dog" and res.counts["shape"] == 1


def test_ties_go_to_the_first_category_and_no_hits_give_zero(maps):
  # knife and oven have one member each, so their means tie bit-exactly; knife comes first.
  # (A uniform output is no such tie: a mean over 49 equal values rounds away from the value.)
  logits = one_hot_logits([[KNIFE, OVEN], [KNIFE, OVEN]], high=10.0)
  res = cm.shape_bias(logits, ["cat", "oven"], ["dog", "cat"], maps)
  assert [maps.categories[d] for d in res.decisions] == ["knife", "knife"]
  assert res.counts == {"shape": 0, "texture": 0, "neither": 2, "dropped": 0, "count": 2}
  assert res.shape_bias == 0.0


def test_unknown_category_name_is_an_error(maps):
  with pytest.raises(ValueError, match="unknown categories"):
    cm.shape_bias(np.zeros((1, 1000)), ["zebra"], ["cat"], maps)


# ----------------------------------------------------------------------------------------------
# IN-9 and BG-gap

def test_in9_accuracies_and_bg_gap(maps):
  m = maps.in_to_in9
  # original: 4 images, 3 right (the ambulance image is labelled Fish).
  original = (one_hot_logits([TENCH, CHIHUAHUA, COCK, AMBULANCE]), [8, 0, 1, 8])
  # mixed_same: 4 images, 3 right; the salamander top-1 maps to -1 and is wrong (label Reptile 3).
  mixed_same = (one_hot_logits([TENCH, CHIHUAHUA, AMBULANCE, SALAMANDER]), [8, 0, 2, 3])
  # mixed_rand: 5 images in batches of 3 + 2, 2 right.
  mixed_rand = (one_hot_logits([TENCH, TENCH, COCK, AMBULANCE, SALAMANDER]), [8, 0, 0, 2, 3])
  counts = {
      "original": cm.in9_correct(*original, m),
      "mixed_same": cm.in9_correct(*mixed_same, m),
      "mixed_rand": cm.sum_counts([cm.in9_correct(mixed_rand[0][:3], mixed_rand[1][:3], m),
                                   cm.in9_correct(mixed_rand[0][3:], mixed_rand[1][3:], m)]),
  }
  assert counts["mixed_rand"] == {"correct": 2, "count": 5}
  got = cm.backgrounds_metrics(counts)
  assert got == pytest.approx({"original": 75.0, "mixed_same": 75.0, "mixed_rand": 40.0,
                               "bg_gap": 35.0})
  assert cm.in9_predictions(mixed_same[0], m).tolist() == [8, 0, 2, -1]


def test_restricting_to_in9_members_rescues_an_outside_top1(maps):
  logits = one_hot_logits([SALAMANDER])
  logits[0, 33] = 10.0                  # loggerhead: Reptile (3), second after the salamander
  assert cm.in9_correct(logits, [3], maps.in_to_in9) == {"correct": 0, "count": 1}
  assert cm.in9_correct(logits, [3], maps.in_to_in9, restrict_to_in9=True) == {
      "correct": 1, "count": 1}


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="unknown IN-9 variants"):
    cm.backgrounds_metrics({"mixed_next": {"correct": 1, "count": 1}})


# ----------------------------------------------------------------------------------------------
# Tables

def test_tables_show_ours_beside_the_papers_numbers():
  ours = {"IN+CGN shape head": {"shape_bias": 51.23, "top1": 70.5},
          "IN+CGN ensemble": {"top1": 73.94, "top5": 91.2}}
  table = cm.shape_bias_table(ours)
  lines = table.splitlines()
  assert lines[0].startswith("| Model / head | Shape bias (ours) | Shape bias (published) |")
  for number in ("54.8", "16.7", "22.9", "74.0", "51.2", "73.9", "91.2"):
    assert number in table
  row = next(l for l in lines if l.startswith("| IN+CGN shape head"))
  assert row.split(" | ")[1:3] == ["51.2", "54.8"]
  assert sum(l.startswith("| IN+CGN") for l in lines) == 4   # our 2 rows + 2 paper-only heads

  bg = cm.backgrounds_table({"IN+CGN": {"original": 93.0, "mixed_same": 82.0, "mixed_rand": 79.5,
                                        "bg_gap": 2.5}})
  for number in ("94.2", "83.4", "80.1", "3.3", "95.6", "86.2", "78.9", "7.3", "93.0", "2.5"):
    assert number in bg
  assert "| Model | IN-9 (ours) | IN-9 (published) | Mixed-Same (ours)" in bg
  cgn_row = next(l for l in bg.splitlines() if l.startswith("| IN+CGN"))
  assert cgn_row.split(" | ")[1:3] == ["93.0", "94.2"]
  resnet_row = next(l for l in bg.splitlines() if l.startswith("| ResNet-50"))
  assert resnet_row.split(" | ")[1:3] == ["–", "95.6"]
