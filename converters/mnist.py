"""Key maps of the authors' MNIST models (mnists/models/*.py) onto cgn_jax.models.

The torch names are ``nn.Sequential`` indices; each table below pairs an index with the Flax layer
that replaces it, so an unfamiliar checkpoint fails at the first index that does not fit.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from converters.common import ConversionError, StateDictReader, infer_dim


def _put(tree: dict, path: str, value) -> None:
  *parents, leaf = [part for part in path.split("/") if part]
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _conv_bn(r: StateDictReader, variables: dict, flax_prefix: str, conv_key: str, bn_key: str,
             cin: int, cout: int, k: int, conv_bias: bool, conv_name: str, bn_name: str) -> None:
  _put(variables["params"], f"{flax_prefix}/{conv_name}", r.conv(conv_key, cin, cout, k, bias=conv_bias))
  params, stats = r.batch_norm(bn_key, cout)
  _put(variables["params"], f"{flax_prefix}/{bn_name}", params)
  _put(variables["batch_stats"], f"{flax_prefix}/{bn_name}", stats)


def convert_mnist_cgn(sd: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """mnists/models/cgn.py::CGN state dict -> MnistCGN variables (any n_classes/latent/ngf/img size)."""
  fam = "mnist_cgn"
  n_classes = infer_dim(sd, "label_emb.weight", 0, fam)
  inp_dim = infer_dim(sd, "f_shape.0.weight", 1, fam)
  ngf = infer_dim(sd, "f_shape.4.weight", 0, fam)
  fc_out = infer_dim(sd, "f_shape.0.weight", 0, fam)
  init_sz = int(round(np.sqrt(fc_out / (2 * ngf))))
  if 2 * ngf * init_sz ** 2 != fc_out:
    raise ConversionError(f"{fam}: key 'f_shape.0.weight' has {fc_out} outputs, not 2*ngf*s^2")
  cfg = {"n_classes": n_classes, "latent_sz": inp_dim - n_classes, "ngf": ngf, "img_sz": 4 * init_sz}
  r = StateDictReader(sd, fam)
  v: dict = {"params": {"label_emb": r.embedding("label_emb", n_classes, n_classes)}, "batch_stats": {}}
  v["params"]["f_shape"] = {"fc": r.linear("f_shape.0", inp_dim, fc_out)}
  _conv_bn(r, v, "f_shape", "f_shape.4", "f_shape.5", 2 * ngf, ngf, 3, False, "conv1", "bn1")
  _conv_bn(r, v, "f_shape", "f_shape.9", "f_shape.10", ngf, 1, 3, False, "conv2", "bn2")
  for t in ("f_text1", "f_text2"):
    v["params"][t] = {"fc": r.linear(f"{t}.0", inp_dim, fc_out)}
    _conv_bn(r, v, t, f"{t}.3", f"{t}.4", 2 * ngf, 2 * ngf, 3, False, "conv1", "bn1")
    _conv_bn(r, v, t, f"{t}.7", f"{t}.8", 2 * ngf, ngf, 3, False, "conv2", "bn2")
    _conv_bn(r, v, t, f"{t}.10", f"{t}.11", ngf, 3, 3, True, "conv3", "bn3")
  r.finish()
  return v, cfg


def convert_disc_lin(sd: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """mnists/models/discriminator.py::DiscLin (Linear indices 0, 2, 5, 8 of ``model``)."""
  fam = "disc_lin"
  n_classes = infer_dim(sd, "label_embedding.weight", 0, fam)
  ndf = infer_dim(sd, "model.0.weight", 0, fam)
  in_dim = infer_dim(sd, "model.0.weight", 1, fam)
  r = StateDictReader(sd, fam)
  p = {"label_embedding": r.embedding("label_embedding", n_classes, n_classes),
       "fc0": r.linear("model.0", in_dim, ndf), "fc1": r.linear("model.2", ndf, ndf),
       "fc2": r.linear("model.5", ndf, ndf), "fc3": r.linear("model.8", ndf, 1)}
  r.finish()
  return {"params": p}, {"n_classes": n_classes, "ndf": ndf}


def convert_disc_conv(sd: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """mnists/models/discriminator.py::DiscConv (conv/BN pairs at 0/1, 3/4, 6/7, 9/10; 1x1 conv at 13)."""
  fam = "disc_conv"
  n_classes = infer_dim(sd, "label_embedding.weight", 0, fam)
  ndf = infer_dim(sd, "model.0.weight", 0, fam)
  r = StateDictReader(sd, fam)
  v: dict = {"params": {"label_embedding": r.embedding("label_embedding", n_classes, 1)},
             "batch_stats": {}}
  specs = ((4, ndf, 3), (ndf, 2 * ndf, 3), (2 * ndf, 4 * ndf, 4), (4 * ndf, 4 * ndf, 4))
  for i, (cin, cout, k) in enumerate(specs):
    _conv_bn(r, v, "", f"model.{3 * i}", f"model.{3 * i + 1}", cin, cout, k, False, f"conv{i}", f"bn{i}")
  v["params"]["conv_out"] = r.conv("model.13", 4 * ndf, 1, 1, bias=False)
  r.finish()
  return v, {"n_classes": n_classes, "ndf": ndf}


def convert_mnist_classifier(sd: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """mnists/models/classifier.py::CNN (BN at model.0, convs at 1, 4, 6, 8; linear at cls.0)."""
  fam = "mnist_classifier"
  num_classes = infer_dim(sd, "cls.0.weight", 0, fam)
  r = StateDictReader(sd, fam)
  bn_p, bn_s = r.batch_norm("model.0", 3)
  p = {"bn_in": bn_p, "conv0": r.conv("model.1", 3, 32, 5), "conv1": r.conv("model.4", 32, 32, 3),
       "conv2": r.conv("model.6", 32, 64, 3), "conv3": r.conv("model.8", 64, 64, 3),
       "fc": r.linear("cls.0", 64, num_classes)}
  r.finish()
  return {"params": p, "batch_stats": {"bn_in": bn_s}}, {"num_classes": num_classes}
