"""scripts/prepare_imagenet.py: sorting flat validation images by every accepted label format, and the
layout check's one-line verdicts on broken datasets (tiny fake layouts: empty files named like ImageNet's)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_imagenet.py"
SYNSETS = ["n02119789", "n01440764", "n03000134"]  # devkit order is not alphabetical
N = 9


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def errors(proc):
    """The error lines of a failed run; each problem is one line, never a traceback."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), proc.stderr
    return lines


def image_name(i):
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def truth(i):
    return SYNSETS[i % 3]


@pytest.fixture
def flat_val(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    for i in range(1, N + 1):
        (val / image_name(i)).write_bytes(f"image {i}".encode())
    return val


def label_files(tmp_path):
    """The same ground truth in each accepted format: name -> (labels file, extra args)."""
    kaggle = tmp_path / "LOC_val_solution.csv"  # rows in no particular order, several boxes each
    kaggle.write_text("ImageId,PredictionString\n" + "".join(
        f"{Path(image_name(i)).stem},{truth(i)} 10 20 30 40 {SYNSETS[0]} 1 2 3 4 \n" for i in range(N, 0, -1)))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(f"{image_name(i)}\t{truth(i)}\n" for i in range(1, N + 1)))
    per_line = tmp_path / "synset_labels.txt"
    per_line.write_text("".join(f"{truth(i)}\n" for i in range(1, N + 1)))
    indices = tmp_path / "ground_truth.txt"  # 1-based devkit indices
    indices.write_text("".join(f"{SYNSETS.index(truth(i)) + 1}\n" for i in range(1, N + 1)))
    mapping = tmp_path / "devkit_synsets.txt"
    mapping.write_text("".join(f"{s} some words\n" for s in SYNSETS))
    return {"kaggle": (kaggle, []), "pairs": (pairs, []), "per_line": (per_line, []),
            "indices": (indices, ["--synsets", mapping])}


def assert_sorted(out):
    for i in range(1, N + 1):
        f = out / truth(i) / image_name(i)
        assert f.read_bytes() == f"image {i}".encode(), f
    assert sorted(p.name for p in out.iterdir()) == sorted(SYNSETS)


@pytest.mark.parametrize("fmt", ["kaggle", "pairs", "per_line", "indices"])
def test_every_label_format_sorts_the_same(flat_val, tmp_path, fmt):
    labels, extra = label_files(tmp_path)[fmt]
    proc = run(flat_val, labels, *extra, "--out", tmp_path / "sorted", "--mode", "copy")
    assert proc.returncode == 0, proc.stderr
    assert "copied 9 images into 3 class folders (3 per class)" in proc.stdout
    assert_sorted(tmp_path / "sorted")
    assert len(list(flat_val.iterdir())) == N  # copy leaves the originals


def test_move_in_place_and_hard_links_never_delete_or_overwrite(flat_val, tmp_path):
    labels, _ = label_files(tmp_path)["pairs"]
    proc = run(flat_val, labels, "--out", tmp_path / "linked", "--mode", "link")
    assert proc.returncode == 0, proc.stderr
    assert_sorted(tmp_path / "linked")
    assert (tmp_path / "linked" / truth(1) / image_name(1)).stat().st_nlink == 2  # a link, not a copy

    again = run(flat_val, labels, "--out", tmp_path / "linked", "--mode", "link")
    assert "already exists; not overwriting" in errors(again)[0]

    proc = run(flat_val, labels)  # default: move into class folders inside val/ itself
    assert proc.returncode == 0 and "moved 9 images" in proc.stdout, proc.stderr
    assert_sorted(flat_val)
    assert "already has class folders" in errors(run(flat_val, labels))[0]


def test_label_file_problems_are_named(flat_val, tmp_path):
    files = label_files(tmp_path)
    indices, _ = files["indices"]
    assert "give --synsets" in errors(run(flat_val, indices))[0]
    alphabetical = tmp_path / "LOC_synset_mapping.txt"  # the classic wrong mapping for devkit indices
    alphabetical.write_text("".join(f"n{k:08d} thing\n" for k in range(1000)))
    assert "alphabetical order" in errors(run(flat_val, indices, "--synsets", alphabetical))[0]

    pairs = tmp_path / "short_pairs.txt"
    pairs.write_text("".join(f"{image_name(i)} {truth(i)}\n" for i in range(1, N)))  # last one missing
    assert errors(run(flat_val, pairs))[0].endswith(f"no label for 1 of 9 images, e.g. {image_name(N)}")
    short = tmp_path / "short.txt"
    short.write_text("n01440764\n" * (N - 1))
    assert "has 8 labels for 9 images" in errors(run(flat_val, short))[0]
    assert len(list(flat_val.iterdir())) == N  # nothing moved after a refusal


def make_layout(root, classes=("n01", "n02", "n03"), train=4, val=2):
    for split, count in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                (root / split / c / f"{c}_{i}.JPEG").write_bytes(b"x")
    return root


EXPECT = ["--expect-classes", "3", "--expect-train", "12", "--expect-val-per-class", "2"]


def test_check_accepts_a_good_layout(tmp_path):
    data = make_layout(tmp_path / "data")
    proc = run("--check", data, *EXPECT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"OK {data}: 3 classes, 12 train images, 6 val images"


@pytest.mark.parametrize("breakage, message", [
    (lambda d: shutil.rmtree(d / "val"), "val is missing"),
    (lambda d: (d / "val" / "n03" / "n03_0.JPEG").rename(d / "val" / "flat.JPEG"), "1 images outside class folders"),
    (lambda d: (d / "train" / "n04").mkdir(), "train has 4 class folders, expected 3"),
    (lambda d: (d / "val" / "n03").rename(d / "val" / "n09"), "only in train/ (e.g. n03), 1 only in val/ (e.g. n09)"),
    (lambda d: [f.unlink() for f in (d / "train" / "n02").iterdir()], "1 class folders without images, e.g. n02"),
    (lambda d: (d / "train" / "n01" / "n01_0.JPEG").unlink(), "holds 11 images, expected 12"),
    (lambda d: (d / "val" / "n02" / "extra.JPEG").write_bytes(b"x"), "1 classes do not hold 2 images, e.g. n02 has 3"),
])
def test_check_rejects_broken_layouts_with_one_line_each(tmp_path, breakage, message):
    data = make_layout(tmp_path / "data")
    breakage(data)
    lines = errors(run("--check", data, *EXPECT))
    assert any(message in line for line in lines), lines


def test_check_defaults_to_imagenet_counts(tmp_path):
    data = make_layout(tmp_path / "data")
    lines = errors(run("--check", data))
    assert any("3 class folders, expected 1000" in line for line in lines)
    assert any("not named by WordNet id" in line for line in lines)
    assert any("expected 1,281,167" in line for line in lines)
    assert errors(run("--check", tmp_path / "nowhere")) == [f"error: dataset folder not found: {tmp_path / 'nowhere'}"]
