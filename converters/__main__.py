"""``python -m converters FAMILY SRC.pth DST_DIR`` — the one CLI for every PyTorch -> Orbax port.

A bad input (an unknown family, a file that is no torch checkpoint, a foreign checkpoint, an
existing or unwritable DST, a full disk) ends in one line on stderr, ``error: <cause>; <fix>``, a
non-zero exit status, and no DST.
"""

from __future__ import annotations

import argparse
import glob
import sys

from converters.registry import FAMILIES, convert_file


class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors also end in a line starting with ``error:``."""

  def error(self, message: str):
    self.print_usage(sys.stderr)
    print(f"error: {message} (--help explains)", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
  parser = _Parser(
      prog="python -m converters",
      description="Convert an authors' PyTorch checkpoint (.pth) into an Orbax checkpoint directory.")
  parser.add_argument("family", metavar="FAMILY",
                      help="model family: " + ", ".join(sorted(FAMILIES)))
  parser.add_argument("src", help="the .pth file")
  parser.add_argument("dst", help="output directory (must not exist yet)")
  args = parser.parse_args(argv)
  from cgn_jax import errors  # pylint: disable=import-outside-toplevel
  if args.family not in FAMILIES:
    best = errors.closest(args.family, FAMILIES)
    hint = f"did you mean {best}? " if best else ""
    print(f"error: unknown family '{args.family}'; {hint}choose one of "
          f"{', '.join(sorted(FAMILIES))}", file=sys.stderr)
    return 2
  held = errors.HeldLibraryErrors()
  try:
    meta = convert_file(args.family, args.src, args.dst)
  except Exception as e:  # pylint: disable=broad-except  # a bad input in one line, a bug in full
    errors.remove_empty_trees([glob.escape(args.dst) + ".tmp-*"],
                              settle_s=0.5 if errors.write_failed(e) else 0.0)
    line = errors.one_line(e, args.dst, "DST")
    if line is None:
      held.release()
      raise
    held.drop()
    print(f"error: {line}", file=sys.stderr)
    return 1
  held.release()
  print(f"converted {args.family}: {args.src} -> {args.dst} ({meta['model_config']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
