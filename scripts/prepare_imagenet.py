"""Sort the ILSVRC2012 validation images into class folders, and check a dataset before a long run.

    # val/ as distributed: 50,000 flat ILSVRC2012_val_*.JPEG files -> val/<synset>/<file>
    python scripts/prepare_imagenet.py DATA/val LOC_val_solution.csv
    python scripts/prepare_imagenet.py DATA/val ILSVRC2012_validation_ground_truth.txt --synsets devkit_synsets.txt
    python scripts/prepare_imagenet.py /raw/val labels.txt --out DATA/val --mode link   # keep /raw/val as is

    # layout check (fast: lists folders, decodes nothing); exit 1 with one line per problem
    python scripts/prepare_imagenet.py --check DATA

Accepted label files (the format is detected):
  * Kaggle's LOC_val_solution.csv: header `ImageId,PredictionString`; the first synset of each
    PredictionString is the image's class.
  * two columns, `FILENAME SYNSET` per line (space, tab or comma separated; extension optional).
  * one label per line, in sorted file order: a synset (e.g. imagenet_2012_validation_synset_labels.txt)
    or a class index 1..1000 (the devkit's ILSVRC2012_validation_ground_truth.txt). Indices need
    --synsets: a text file whose line i is the synset of ILSVRC2012_ID i (the devkit's meta.mat order,
    which is NOT alphabetical; docs/reproduce.md (section "1. Data") shows how to write it from meta.mat).
Files are moved (default), hard-linked or copied; nothing is ever deleted or overwritten.
"""
import argparse
import csv
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import UserError  # noqa: E402
from utils.args import check_number  # noqa: E402
from utils.inputs.imagefiles import SymlinkLoop, walk_images  # noqa: E402

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SYNSET = re.compile(r"^n\d{8}$")
IMAGENET = {"classes": 1000, "train": 1_281_167, "val_per_class": 50}


class PrepError(Exception):
    """A problem with the user's files: printed as one line, exit status 1."""


def is_image(name):
    return name.lower().endswith(IMAGE_EXTS)


# ---------------------------------------------------------------- label files

def read_labels(path, files, synsets_path=None):
    """{file name: class name} for every image in `files` (sorted names), from any accepted format."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"label file not found: {path}")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise PrepError(f"label file is empty: {path}")
    if lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        pairs = [(r["ImageId"], (r["PredictionString"] or "").split()[:1])
                 for r in csv.DictReader(lines, skipinitialspace=True)]
        bad = next((img for img, s in pairs if not s), None)
        if bad:
            raise PrepError(f"{path}: no synset in the PredictionString of {bad}")
        return _by_name({img: s[0] for img, s in pairs}, files, path)
    fields = [re.split(r"[\s,]+", ln) for ln in lines]
    if all(len(f) >= 2 for f in fields):
        return _by_name({f[0]: f[1] for f in fields}, files, path)
    if any(len(f) != 1 for f in fields):
        raise PrepError(f"{path}: mixes one- and two-column lines; expected one format throughout")
    if len(lines) != len(files):
        raise PrepError(f"{path} has {len(lines)} labels for {len(files)} images: a one-label-per-line "
                        f"file must list every image, in sorted file-name order")
    if all(ln.isdigit() for ln in lines):
        lines = _indices_to_synsets(lines, synsets_path, path)
    return dict(zip(files, lines))


def _by_name(mapping, files, path):
    """Match labels to files by name, with or without the extension."""
    stem = {Path(k).stem if is_image(k) else k: v for k, v in mapping.items()}
    missing = [f for f in files if Path(f).stem not in stem]
    if missing:
        raise PrepError(f"{path} has no label for {len(missing)} of {len(files)} images, e.g. {missing[0]}")
    return {f: stem[Path(f).stem] for f in files}


def _indices_to_synsets(lines, synsets_path, path):
    if synsets_path is None:
        raise PrepError(f"{path} holds class indices: give --synsets FILE (line i = the synset of class i, "
                        f"in the devkit's meta.mat order)")
    names = [ln.split()[0] for ln in Path(synsets_path).read_text().splitlines() if ln.strip()] \
        if Path(synsets_path).is_file() else None
    if names is None:
        raise PrepError(f"synset list not found: {synsets_path}")
    if len(names) == 1000 and names == sorted(names):
        # LOC_synset_mapping.txt / torchvision's class order: the indices would silently mislabel.
        raise PrepError(f"{synsets_path} is in alphabetical order; the devkit's class indices follow "
                        f"meta.mat's ILSVRC2012_ID order (1 = n02119789): see docs/reproduce.md, section '1. Data'")
    top = max(int(x) for x in lines)
    if min(int(x) for x in lines) < 1 or top > len(names):
        raise PrepError(f"{path}: class index {top} outside 1..{len(names)} of {synsets_path}")
    return [names[int(x) - 1] for x in lines]


# ---------------------------------------------------------------- sorting val/

def prepare_val(val_dir, labels_path, out=None, mode="move", synsets=None, dry_run=False):
    """Put every flat image of val_dir into out/<class>/ (out defaults to val_dir). Returns Counter."""
    val_dir = Path(val_dir)
    out = Path(out) if out else val_dir
    if not val_dir.is_dir():
        raise PrepError(f"validation folder not found: {val_dir}")
    files = sorted(e.name for e in os.scandir(val_dir) if e.is_file() and is_image(e.name))
    if not files:
        subdirs = [e for e in os.scandir(val_dir) if e.is_dir()]
        hint = " (it already has class folders: check it with --check)" if subdirs else ""
        raise PrepError(f"no images directly in {val_dir}{hint}")
    labels = read_labels(labels_path, files, synsets)
    counts = Counter(labels.values())
    bad = sorted(c for c in counts if "/" in c or c in (".", ".."))
    if bad:
        raise PrepError(f"{labels_path}: {bad[0]!r} is not usable as a folder name")
    if dry_run:
        return counts
    place = {"move": os.replace, "link": os.link, "copy": shutil.copy2}[mode]
    for name in files:
        dest = out / labels[name] / name
        if dest.exists():
            raise PrepError(f"{dest} already exists; not overwriting it")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            place(val_dir / name, dest)
        except OSError as e:
            hint = " (hard links need the same file system: use --mode copy)" if mode == "link" else ""
            raise PrepError(f"cannot {mode} {val_dir / name} to {dest}: {e.strerror}{hint}") from None
    return counts


# ---------------------------------------------------------------- checking a dataset

def count_split(split):
    """{class: number of images} of an ImageFolder split (as the trainer lists them), the number of
    flat images beside them, and the directory symlink loops found (the trainer refuses those)."""
    counts, flat, loops = {}, 0, []
    for e in os.scandir(split):
        if e.is_dir():
            try:
                counts[e.name] = len(walk_images(e.path, is_image))
            except SymlinkLoop as err:
                counts[e.name] = 0
                loops.append(str(err))
        elif is_image(e.name):
            flat += 1
    return counts, flat, loops


def check_dataset(data, classes=1000, train_total=None, val_per_class=None):
    """Every problem found, one line each ([] means the layout is right), and a summary line.

    train_total / val_per_class default to ImageNet's when classes is 1000, else are not checked.
    """
    data = Path(data)
    if classes == IMAGENET["classes"]:
        train_total = IMAGENET["train"] if train_total is None else train_total
        val_per_class = IMAGENET["val_per_class"] if val_per_class is None else val_per_class
    if not data.is_dir():
        return [f"dataset folder not found: {data}"], ""
    problems, found = [], {}
    for split in ("train", "val"):
        if not (data / split).is_dir():
            problems.append(f"{data / split} is missing (expected {data}/{split}/<class>/<image>)")
            continue
        counts, flat, loops = count_split(data / split)
        found[split] = counts
        problems += loops
        if flat:
            fix = " (sort them with: prepare_imagenet.py DATA/val LABELS)" if split == "val" else ""
            problems.append(f"{data / split} holds {flat} images outside class folders{fix}")
        if len(counts) != classes:
            problems.append(f"{data / split} has {len(counts)} class folders, expected {classes}")
        if classes == IMAGENET["classes"]:
            odd = sorted(c for c in counts if not SYNSET.match(c))
            if odd:
                problems.append(f"{data / split} has {len(odd)} class folders not named by WordNet id "
                                f"(nXXXXXXXX), e.g. {odd[0]}")
        empty = sorted(c for c, n in counts.items() if n == 0)
        if empty:
            problems.append(f"{data / split} has {len(empty)} class folders without images, e.g. {empty[0]}")
    if len(found) == 2 and set(found["train"]) != set(found["val"]):
        only_train = sorted(set(found["train"]) - set(found["val"]))
        only_val = sorted(set(found["val"]) - set(found["train"]))
        parts = [f"{len(only_train)} only in train/ (e.g. {only_train[0]})"] if only_train else []
        parts += [f"{len(only_val)} only in val/ (e.g. {only_val[0]})"] if only_val else []
        problems.append("train/ and val/ class folders differ: " + ", ".join(parts))
    n_train = sum(found.get("train", {}).values())
    n_val = sum(found.get("val", {}).values())
    if "train" in found and train_total is not None and n_train != train_total:
        problems.append(f"{data / 'train'} holds {n_train:,} images, expected {train_total:,} "
                        f"(incomplete extraction? pass --expect-train {n_train} to accept)")
    if "val" in found and val_per_class is not None:
        off = sorted((c, n) for c, n in found["val"].items() if n != val_per_class)
        if off:
            problems.append(f"{data / 'val'}: {len(off)} classes do not hold {val_per_class} images, "
                            f"e.g. {off[0][0]} has {off[0][1]}")
    summary = (f"{data}: {len(found.get('train', {}))} classes, {n_train:,} train images, "
               f"{n_val:,} val images")
    return problems, summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Label formats and examples: see the top of this file and docs/reproduce.md, section '1. Data'.")
    p.add_argument("val_dir", nargs="?", help="folder of flat validation images (e.g. DATA/val)")
    p.add_argument("labels", nargs="?", help="ground-truth file (LOC_val_solution.csv, 'file synset' pairs, "
                                             "or one synset/class index per line)")
    p.add_argument("--synsets", help="with class-index labels: line i = synset of class i (devkit order)")
    p.add_argument("--out", help="where the class folders go (default: VAL_DIR itself)")
    p.add_argument("--mode", choices=("move", "link", "copy"), default="move",
                   help="move (default), hard-link or copy the images; never deletes")
    p.add_argument("--dry-run", action="store_true", help="read the labels and report, change nothing")
    p.add_argument("--check", metavar="DATA", help="check DATA/train and DATA/val instead, then exit")
    p.add_argument("--expect-classes", type=int, default=1000, metavar="N")
    p.add_argument("--expect-train", type=int, default=None, metavar="N",
                   help="training images in all (default: 1,281,167 for 1000 classes, else unchecked)")
    p.add_argument("--expect-val-per-class", type=int, default=None, metavar="N",
                   help="validation images per class (default: 50 for 1000 classes, else unchecked)")
    args = p.parse_args(argv)

    try:
        check_number("--expect-classes", args.expect_classes, 1)
        check_number("--expect-train", args.expect_train, 1)
        check_number("--expect-val-per-class", args.expect_val_per_class, 1)
    except UserError as e:
        sys.exit(f"error: {e}")
    if args.check:
        problems, summary = check_dataset(args.check, args.expect_classes, args.expect_train,
                                          args.expect_val_per_class)
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        if problems:
            sys.exit(1)
        print(f"OK {summary}")
        return
    if not (args.val_dir and args.labels):
        p.error("give VAL_DIR LABELS to sort the validation images, or --check DATA")
    try:
        counts = prepare_val(args.val_dir, args.labels, args.out, args.mode, args.synsets, args.dry_run)
    except PrepError as e:
        sys.exit(f"error: {e}")
    verb = "would sort" if args.dry_run else {"move": "moved", "link": "linked", "copy": "copied"}[args.mode]
    sizes = sorted(set(counts.values()))
    per = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    print(f"{verb} {sum(counts.values())} images into {len(counts)} class folders ({per} per class) "
          f"under {args.out or args.val_dir}")


if __name__ == "__main__":
    main()
