"""``python -m converters FAMILY SRC.pth DST_DIR`` — the one CLI for every PyTorch -> Orbax port."""

from __future__ import annotations

import argparse
import sys

from converters.common import ConversionError
from converters.registry import FAMILIES, convert_file


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m converters",
      description="Convert an authors' PyTorch checkpoint (.pth) into an Orbax checkpoint directory.")
  parser.add_argument("family", choices=sorted(FAMILIES), metavar="FAMILY",
                      help="model family: " + ", ".join(sorted(FAMILIES)))
  parser.add_argument("src", help="the .pth file")
  parser.add_argument("dst", help="output directory (must not exist yet)")
  args = parser.parse_args(argv)
  try:
    meta = convert_file(args.family, args.src, args.dst)
  except (ConversionError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"converted {args.family}: {args.src} -> {args.dst} ({meta['model_config']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
