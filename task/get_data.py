"""`python -m task.get_data NAME [--root DIR]`: make sure a data set is on this machine.

Used by `make setup`: it tries the offline sources first and torchvision's download second, and
otherwise prints ONE message saying how to get the files or where to point `dataset.root`.
"""

from __future__ import annotations

import argparse
import sys

from task.datasets import DatasetUnavailableError, load_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--root", default=None)
    args = parser.parse_args(argv)
    try:
        ds = load_dataset(args.name, root=args.root, download=False)
    except DatasetUnavailableError:
        try:
            ds = load_dataset(args.name, root=args.root, download=True)
        except Exception as exc:  # offline, or the download failed: one clear message
            print(f"thorn: {args.name} is not available: {exc}", file=sys.stderr)
            return 1
    print(f"thorn: {args.name}: {len(ds.y_train)} train / {len(ds.y_test)} test images from {ds.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
