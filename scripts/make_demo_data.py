"""Write the built-in demo dataset (ten pattern classes, JPEG ImageFolder layout) to OUT.

    .venv/bin/python scripts/make_demo_data.py data/demo

main_imagenet.py without DATA generates it in data/demo/ on first use; this script makes it
anywhere. Same arguments, same files.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import UserError  # noqa: E402
from utils.args import SEED_MAX, check_number  # noqa: E402
from utils.inputs.demo_data import make_demo_dataset  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder (gets train/ and val/)")
    p.add_argument("--train-per-class", type=int, default=None, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=None, help="validation images per class")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        check_number("--train-per-class", args.train_per_class, 1)
        check_number("--val-per-class", args.val_per_class, 1)
        check_number("--seed", args.seed, 0, SEED_MAX)
    except UserError as e:
        sys.exit(f"error: {e}")
    kw = {k: v for k, v in (("train_per_class", args.train_per_class),
                            ("val_per_class", args.val_per_class)) if v is not None}
    out = make_demo_dataset(args.out, seed=args.seed, **kw)
    n = sum(1 for f in out.rglob("*.JPEG"))
    print(f"wrote {n} images to {out}/train and {out}/val")


if __name__ == "__main__":
    main()
