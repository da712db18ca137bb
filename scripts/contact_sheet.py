"""Contact sheet of an MNIST variant: one PNG, rows = digits 0..9, train columns | test columns.

  python scripts/contact_sheet.py --variant double_colored_MNIST --data_dir ../shared/data \
      --out sheet.png

Without ``--dataset_dir`` the first 2000 images of each split are built in memory (about a second);
with it, the full variant is built there (or reused) and the sheet shows its stored images.
"""

from __future__ import annotations

import argparse
import time

from cgn_jax.data import build
from cgn_jax.data import mnist_variants as mv
from cgn_jax.data import sheets
from cgn_jax.data import storage


def main(argv: list[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", required=True, choices=mv.VARIANTS)
  p.add_argument("--data_dir", required=True,
                 help="folder with MNIST (mnist/*.gz), textures/, colors/")
  p.add_argument("--out", required=True, help="PNG to write")
  p.add_argument("--dataset_dir", default=None, help="build (or reuse) the full variant here")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--per_class", type=int, default=8)
  p.add_argument("--scale", type=int, default=2, help="integer pixel upscaling of the sheet")
  args = p.parse_args(argv)
  t0 = time.time()
  if args.dataset_dir:
    build.build_variant(args.variant, args.data_dir, args.dataset_dir, seed=args.seed, verbose=True)
    splits = {s: storage.read_xy(args.dataset_dir, s) for s in ("train", "test")}
  else:
    arrays, _ = build.build_arrays(args.variant, args.data_dir, seed=args.seed, limit=2000)
    splits = {}
    for s, (images, labels) in arrays.items():
      x = storage.decode_images(images, "uint8_unit" if images.dtype == "uint8" else "float_signed")
      splits[s] = (x, labels["label"])
  sheets.contact_sheet(args.out, splits, per_class=args.per_class, scale=args.scale)
  print(f"wrote {args.out} ({args.variant}: rows = digits 0..9, left {args.per_class} train, "
        f"right {args.per_class} test; {time.time() - t0:.1f} s)")
  return args.out


if __name__ == "__main__":
  main()
