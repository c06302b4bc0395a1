"""The built-in demo dataset: ten procedurally drawn pattern classes, saved as JPEG ImageFolders.

Deterministic (numpy RNG seeded per split), small (a few hundred 64-96 px files) and learnable in a
few CPU minutes. Every class keeps its identity under RandomResizedCrop and horizontal flips, since
classes differ in the kind of pattern (stripes vs. rings vs. blobs...), not in scale or handedness.
"""
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = (
    "h_stripes", "v_stripes", "checker", "rings", "dots",
    "disc", "square", "cross", "gradient", "speckle",
)
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"
STAMP, VERSION = ".demo_version", "2: 10 classes x (60 train + 12 val), 64-96 px, seed 0"


def _draw(kind, size, rng):
    """One H x W x 3 uint8 image of pattern `kind` with random colours, phase and scale."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(c1 - c2).sum() < 150:  # keep the two colours apart so the pattern is visible
        c2 = rng.uniform(0, 255, 3)
    period = rng.uniform(0.12, 0.22)
    phase = rng.uniform(0, 1)
    cx, cy = rng.uniform(0.35, 0.65, 2)
    r = np.hypot(x - cx, y - cy)
    if kind == "h_stripes":
        mask = ((y / period + phase) % 1) < 0.5
    elif kind == "v_stripes":
        mask = ((x / period + phase) % 1) < 0.5
    elif kind == "checker":
        mask = (((x / period + phase) % 1) < 0.5) ^ (((y / period + phase) % 1) < 0.5)
    elif kind == "rings":
        mask = ((r / period + phase) % 1) < 0.5
    elif kind == "dots":
        gx, gy = (x / period + phase) % 1 - 0.5, (y / period + phase) % 1 - 0.5
        mask = np.hypot(gx, gy) < 0.25
    elif kind == "disc":
        mask = r < rng.uniform(0.25, 0.4)
    elif kind == "square":
        half = rng.uniform(0.22, 0.35)
        mask = (np.abs(x - cx) < half) & (np.abs(y - cy) < half)
    elif kind == "cross":
        w = rng.uniform(0.08, 0.14)
        mask = (np.abs(x - cx) < w) | (np.abs(y - cy) < w)
    elif kind == "gradient":
        t = np.clip((x * np.cos(phase * 6.28) + y * np.sin(phase * 6.28) + 1) / 2, 0, 1)[..., None]
        img = c1 * t + c2 * (1 - t)
        return _finish(img, rng)
    elif kind == "speckle":
        mask = rng.uniform(size=(size, size)) < 0.5
    else:
        raise ValueError(kind)
    img = np.where(mask[..., None], c1, c2)
    return _finish(img, rng)


def _finish(img, rng):
    img = img + rng.normal(0, 12, img.shape)  # mild sensor noise so nothing is trivially flat
    return np.clip(img, 0, 255).astype(np.uint8)


def make_demo_dataset(out, classes=CLASSES, train_per_class=60, val_per_class=12,
                      sizes=(64, 96), seed=0):
    """Write out/train/<class>/*.JPEG and out/val/<class>/*.JPEG; returns `out` as a Path.

    Same arguments, same bytes: each (split, class, index) image has its own seeded RNG.
    """
    out = Path(out)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for ci, kind in enumerate(classes):
            folder = out / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split == "val", ci, i])
                size = int(rng.integers(sizes[0], sizes[1] + 1))
                Image.fromarray(_draw(kind, size, rng)).save(folder / f"{kind}_{i:04d}.JPEG", quality=90)
    return out


def ensure_demo_dataset(root=DEFAULT_DIR):
    """The cached demo dataset, generated on first use (into a temporary folder, then renamed).

    A stamp file records the generator's version; a cache from another version is rebuilt.
    """
    root = Path(root)
    if (root / STAMP).is_file() and (root / STAMP).read_text() == VERSION:
        return root
    tmp = root.with_name(root.name + ".tmp")
    for old in (tmp, root):
        if old.exists():
            shutil.rmtree(old)
    make_demo_dataset(tmp)
    (tmp / STAMP).write_text(VERSION)
    tmp.rename(root)
    return root
