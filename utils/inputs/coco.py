"""COCO-format detection data: layout checks, dataset, seeded loader, demo set, and COCOeval.

Layout (COCO 2017's): DATA/annotations/instances_{train,val}2017.json, DATA/train2017/, DATA/val2017/.
Labels are COCO category ids (91 slots for COCO, as torchvision's models), so a model's class count is
max(category id) + 1. Resizing is the model's (torchvision's GeneralizedRCNNTransform: min_size /
max_size); the data side only flips. Every random choice is a pure function of (seed, epoch, index),
so a run resumed mid-epoch sees the same flips and batches as an uninterrupted one.

Bad input is one UserError, checked before any image is read: missing annotation file or image
folder, malformed JSON, images listed but missing on disk, annotations pointing at unlisted images or
categories, no categories, no images, ids that are not integers, non-finite numbers, polygons of
fewer than 3 points, RLE of another size, category ids above MAX_CATEGORY_ID. Degenerate boxes (no
area inside the image) are skipped and counted; training drops images left without a box (as
torchvision's reference and mmdetection do). Unreadable image files are counted once per file:
training takes the next readable image in their place, evaluation drops them (CocoDetection).
"""
import contextlib
import gc
import io
import itertools
import json
import math
import os
from array import array
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from .. import UserError
from .data import MAX_BAD_IN_A_ROW, ShardSampler, _Batches, pil_rgb
from ..lifecycle.processes import end_workers_at_exit, ignore_stop_signals_in_worker, worker_start_method
from .demo_data import ensure_generated
from .shared import SharedArray

SPLITS = ("train", "val")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


# ---------------------------------------------------------------- layout and annotations

MAX_CATEGORY_ID = 10_000  # the box predictor has 5 x 1024 weights per class id (10,000 ids: 200 MB)


ID_END = 2 ** 63  # ids are kept as int64


def _id(value, what):
    """A COCO id: a JSON integer (pycocotools matches results to images and categories by id, so the
    string "1" is another id than 1) of 64 bits, or a UserError naming `what`. (orjson reads an integer
    beyond 64 bits as a float, the standard parser as an int: one error line for both.)"""
    if (type(value) is int or type(value) is float) and not -ID_END <= value < ID_END:
        raise UserError(f"{what} is beyond the 64-bit integers COCO ids are kept in")
    if type(value) is not int:
        kind = {str: "a string", list: "a list", dict: "an object", float: "a fraction", bool: "a boolean"}
        raise UserError(f"{what} is missing; COCO ids are integers" if value is None else
                        f"{what} {json.dumps(value)} is {kind.get(type(value), type(value).__name__)}, "
                        f"not an integer; COCO ids are integers")
    return value


def _numbers(values, what, n=None):
    """A list of finite JSON numbers (of length n when given) as floats, or a UserError naming `what`.
    Polygons (n None) are checked through their sum, in C: COCO's train file holds ~30M coordinates."""
    shape = "[x, y, w, h]" if n == 4 else "a number" if n == 1 else "a list of numbers"
    if not isinstance(values, list) or (n is not None and len(values) != n):
        raise UserError(f"{what} is not {shape}: {json.dumps(values)[:80]}")
    try:  # strings, lists and null raise; NaN and +-inf make the sum non-finite
        total = sum(values) if n is None else sum(v if type(v) in (int, float) else "" for v in values)
    except TypeError:
        raise UserError(f"{what} is not {shape}: {json.dumps(values)[:80]}") from None
    try:  # an integer beyond a double's range overflows
        floats = values if n is None else [float(v) for v in values]
        finite = math.isfinite(total)
    except OverflowError:
        finite = False
    if not finite:
        raise UserError(f"{what} is not finite: {json.dumps(values)[:80]}")
    return floats


def _check_segmentation(seg, im, name):
    """Polygons ([[x1, y1, x2, y2, x3, y3, ...], ...], each of 3 or more finite points) or RLE
    ({"size": [height, width], "counts": [...] or "compressed string"}, of the image's size)."""
    if isinstance(seg, dict):
        size = [im["height"], im["width"]]
        if seg.get("size") != size or not isinstance(seg.get("counts"), (str, list)):
            raise UserError(f"{name}: an RLE segmentation needs size {size} (the image's height, width) and "
                            f"counts, got size {json.dumps(seg.get('size'))}")
        counts = seg["counts"]
        if isinstance(counts, list) and (set(map(type, counts)) - {int} or (counts and min(counts) < 0)
                                         or sum(counts) != size[0] * size[1]):
            raise UserError(f"{name}: uncompressed RLE counts must be integers >= 0 adding up to height x width")
        return
    if not isinstance(seg, list):
        raise UserError(f"{name}: segmentation is neither polygons nor RLE: {json.dumps(seg)[:80]}")
    for i, poly in enumerate(seg):
        if not isinstance(poly, list):
            raise UserError(f"{name}: segmentation polygon {i} is not a list of coordinates")
        _numbers(poly, f"{name}: segmentation polygon {i}")
        if len(poly) < 6 or len(poly) % 2:
            # pycocotools refuses these too (or reads a 2-point polygon as a box): one rule, said here.
            raise UserError(f"{name}: segmentation polygon {i} has {len(poly)} coordinates; a polygon needs "
                            f"3 or more (x, y) points")


@contextlib.contextmanager
def _gc_paused():
    """The cyclic garbage collector paused: parsing COCO's train file makes ~40M objects (no cycles: freed
    by their reference counts), and collections triggered while they live would walk them all again and
    again (seconds each)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parse_json(path):
    """The file's JSON (call with the garbage collector paused). orjson (2.5x faster on COCO's train
    file) where installed; the standard parser where orjson refuses what it accepts (NaN, Infinity,
    lone surrogates, encodings other than UTF-8), so that both read a file the same way
    (tests/test_coco_faults.py) and errors are the standard parser's. The one difference, integers
    beyond 64 bits (floats for orjson), is refused alike as an id (_id) and read alike as a number."""
    data = path.read_bytes()
    try:
        import orjson
        return orjson.loads(data)
    except (ImportError, ValueError):  # orjson.JSONDecodeError is a ValueError
        return json.loads(data)


_NUMBER = (int, float)
NO_MASK, POLYGONS, RLE_STRING, RLE_COUNTS = 0, 1, 2, 3  # kinds of segmentation in CocoSplit's arrays


class CocoSplit:
    """One split's parsed annotation file: images, their valid boxes, categories (checked).

    Held in flat numpy arrays shared with the loader workers (utils.inputs.shared), built once at load:
    per image its id, size, file name and the range of its valid annotations (grouped by image, file
    order within); per annotation its box (xyxy, clipped to the image), category, crowd flag, area and
    segmentation (polygon coordinates with offsets, RLE strings as bytes, RLE counts as integers).
    A worker receives descriptors, not a copy of the annotations. `images` and `anns` show the arrays
    as the COCO dicts ({image id: [annotation dicts with "box"]}); `raw` (the file's dict, as pycocotools
    reads it) is parsed again when asked for (evaluation's ground truth): not kept for training.
    """

    def __init__(self, root, split):
        root = Path(root)
        self.ann_file = root / "annotations" / f"instances_{split}2017.json"
        self.img_dir = root / f"{split}2017"
        if not self.ann_file.is_file():
            raise UserError(f"annotation file not found: {self.ann_file}")
        if not self.img_dir.is_dir():
            raise UserError(f"image folder not found: {self.img_dir}")
        with _gc_paused():  # the parsed file is dropped before collections resume
            self._read(self._parsed())
        self._raw = None

    def _parsed(self):
        try:
            return _parse_json(self.ann_file)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"annotation file {self.ann_file} is not valid JSON: {e}") from None

    def _read(self, raw):
        if not isinstance(raw, dict):
            raise UserError(f"annotation file {self.ann_file} is not a COCO object (a JSON dict)")
        for key in ("images", "annotations", "categories"):
            if not isinstance(raw.get(key), list):
                raise UserError(f"annotation file {self.ann_file} has no {key!r} list")
        if not raw["categories"]:
            raise UserError(f"annotation file {self.ann_file} has no categories")
        where = f"annotation file {self.ann_file}"
        try:
            self.categories = {_id(c["id"], f"{where}: category id"): str(c["name"]) for c in raw["categories"]}
            images = [(_id(im["id"], f"{where}: image id"), str(im["file_name"]), int(im["width"]), int(im["height"]))
                      for im in raw["images"]]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: a category or image entry lacks {e}") from None
        if min(self.categories) < 1:
            raise UserError(f"{where}: category ids must be >= 1 (0 is the background)")
        if max(self.categories) > MAX_CATEGORY_ID:
            raise UserError(f"{where}: category id {max(self.categories)} is above the limit {MAX_CATEGORY_ID} "
                            f"(labels are category ids, so the detector would get {max(self.categories) + 1} "
                            f"classes); number the categories from 1")
        if not images:
            raise UserError(f"{where} lists no images")
        on_disk = set(os.listdir(self.img_dir))
        # A file_name may hold subfolders (e.g. "a/b.jpg"): those are looked up one by one.
        missing = [name for _, name, _, _ in images if name not in on_disk
                   and not ("/" in name and (self.img_dir / name).is_file())]
        if missing:
            raise UserError(f"{len(missing)} images listed in {self.ann_file} are missing from {self.img_dir}, "
                            f"e.g. {missing[0]}")
        self._load(images, raw["annotations"])

    def _load(self, images, annotations):
        ids = [i for i, _, _, _ in images]
        widths, heights = [w for _, _, w, _ in images], [h for _, _, _, h in images]
        row_of = {i: r for r, i in enumerate(ids)}  # a repeated id: its last entry, as a dict by id
        names = [n.encode("utf-8", "surrogatepass") for _, n, _, _ in images]
        name_ends = np.cumsum([0] + [len(n) for n in names])
        cats = self.categories
        ints, floats = [], []
        polygons, rle_chars, rle_counts = [], bytearray(), array("q")  # polygons: the parsed lists, flattened at the end
        self.degenerate = 0
        for a in annotations:
            # The common case checked inline; anything unusual goes through _checked_annotation, whose
            # checks and error lines are the specification.
            try:
                aid, iid, cid, bbox = a["id"], a["image_id"], a["category_id"], a["bbox"]
                row = row_of[iid] if type(iid) is int else None
                seg = a.get("segmentation")
                area = a.get("area", 0.0)
                ok = (row is not None and type(aid) is int and 1 <= aid < ID_END and type(cid) is int and cid in cats
                      and type(bbox) is list and len(bbox) == 4 and type(area) in _NUMBER and math.isfinite(area))
                if ok:
                    x, y, w, h = bbox
                    ok = (type(x) in _NUMBER and type(y) in _NUMBER and type(w) in _NUMBER and type(h) in _NUMBER
                          and math.isfinite(x + y + w + h))
                if ok and type(seg) is list:
                    for poly in seg:
                        if type(poly) is not list or len(poly) < 6 or len(poly) % 2 or not math.isfinite(sum(poly)):
                            ok = False
                            break
                elif ok and "segmentation" in a:
                    ok = isinstance(seg, dict)
            except (KeyError, TypeError, OverflowError):
                ok = False
            if ok:
                x, y, w, h = float(x), float(y), float(w), float(h)
                if isinstance(seg, dict):
                    _check_segmentation(seg, {"height": heights[row], "width": widths[row]},
                                        f"annotation {aid} in {self.ann_file}")
            else:
                row, aid, cid, (x, y, w, h), seg = self._checked_annotation(a, row_of, widths, heights)
            x1, y1 = (0.0 if 0.0 > x else x), (0.0 if 0.0 > y else y)  # max(x, 0.0), as written before
            x2, y2 = x + w, y + h
            x2, y2 = (widths[row] if widths[row] < x2 else x2), (heights[row] if heights[row] < y2 else y2)
            if x2 <= x1 or y2 <= y1:
                self.degenerate += 1
                continue
            if not seg:  # no mask given: the box
                kind, lo, hi = NO_MASK, 0, 0
            elif isinstance(seg, list):
                kind, lo = POLYGONS, len(polygons)
                polygons += seg
                hi = len(polygons)
            elif isinstance(seg["counts"], str):
                kind, lo = RLE_STRING, len(rle_chars)
                rle_chars += seg["counts"].encode("utf-8", "surrogatepass")
                hi = len(rle_chars)
            else:
                kind, lo = RLE_COUNTS, len(rle_counts)
                rle_counts.extend(seg["counts"])
                hi = len(rle_counts)
            # one tuple of integers and one of floats per annotation: made arrays once, at the end
            ints.append((row, aid, cid, kind, lo, hi, bool(a.get("iscrowd", 0))))
            floats.append((float(a["area"]) if "area" in a else w * h, x1, y1, x2, y2))
        ints = np.array(ints, np.int64).reshape(-1, 7)
        floats = np.array(floats, np.float64).reshape(-1, 5)
        # Annotations grouped by image (stable: file order within an image); a repeated image id's rows share them.
        rows = ints[:, 0]
        order = np.argsort(rows, kind="stable")
        first = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=len(ids)), out=first[1:])
        owner = np.fromiter((row_of[i] for i in ids), np.int64, len(ids))
        crowd = ints[order, 6].astype(bool)
        noncrowd = np.zeros(len(crowd) + 1, np.int64)
        np.cumsum(~crowd, out=noncrowd[1:])
        lo, hi = first[owner], first[owner + 1]
        poly_ends = np.zeros(len(polygons) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, polygons), np.int64, len(polygons)), out=poly_ends[1:])
        try:  # one C loop, not one per polygon
            coords = np.array(list(itertools.chain.from_iterable(polygons)), np.float64)
        except OverflowError:  # integers adding up to a finite sum, one of them beyond a double's range
            raise UserError(f"annotation file {self.ann_file}: a segmentation polygon holds a number beyond a "
                            f"double's range") from None
        arrays = {
            "image_id": np.asarray(ids, np.int64), "width": np.asarray(widths, np.int64),
            "height": np.asarray(heights, np.int64), "name_ends": name_ends.astype(np.int64),
            "names": np.frombuffer(b"".join(names), np.uint8), "ann_lo": lo, "ann_hi": hi,
            "boxes_in_image": noncrowd[hi] - noncrowd[lo],  # non-crowd valid boxes of each image
            "ann_id": ints[order, 1], "category": ints[order, 2], "crowd": crowd, "area": floats[order, 0],
            "box": floats[order, 1:], "kind": ints[order, 3].astype(np.int8), "seg_lo": ints[order, 4],
            "seg_hi": ints[order, 5], "coords": coords.reshape(-1),
            "poly_ends": poly_ends, "rle_chars": np.frombuffer(bytes(rle_chars), np.uint8),
            "rle_counts": np.frombuffer(rle_counts, np.int64)}
        self.arrays = {k: SharedArray(v) for k, v in arrays.items()}

    def _checked_annotation(self, a, row_of, widths, heights):
        """(image row, id, category id, bbox floats, segmentation) of one annotation, or its UserError."""
        where = f"annotation file {self.ann_file}"
        if not isinstance(a, dict) or "image_id" not in a or "bbox" not in a or "category_id" not in a:
            raise UserError(f"{where}: an annotation lacks image_id, bbox or category_id")
        name = f"annotation {a.get('id')} in {self.ann_file}"
        # pycocotools indexes annotations by id and reads a match with id 0 as no match.
        if _id(a.get("id"), f"{name}: id") < 1:
            raise UserError(f"{name}: id must be an integer >= 1 (pycocotools reads 0 as 'no match')")
        row = row_of.get(_id(a["image_id"], f"{name}: image_id"))
        if row is None:
            raise UserError(f"{name} points at image id {a['image_id']}, which the file does not list")
        if _id(a["category_id"], f"{name}: category_id") not in self.categories:
            raise UserError(f"{name} has unknown category {a['category_id']}")
        bbox = _numbers(a["bbox"], f"{name}: bbox", 4)
        if "area" in a:
            _numbers([a["area"]], f"{name}: area", 1)
        if "segmentation" in a:
            _check_segmentation(a["segmentation"], {"height": heights[row], "width": widths[row]}, name)
        return row, a["id"], a["category_id"], bbox, a.get("segmentation")

    def __getstate__(self):  # what a loader worker receives: the arrays travel as descriptors
        return {k: v for k, v in self.__dict__.items() if k != "_raw"}

    # ---- the arrays as COCO dicts

    def file_name(self, row):
        ends = self.arrays["name_ends"].array
        return self.arrays["names"].array[ends[row]:ends[row + 1]].tobytes().decode("utf-8", "surrogatepass")

    def image(self, row):
        a = self.arrays
        return {"id": int(a["image_id"].array[row]), "file_name": self.file_name(row),
                "width": int(a["width"].array[row]), "height": int(a["height"].array[row])}

    @property
    def images(self):
        """The listed images as dicts (id, file_name, width, height), in the file's order."""
        return _Rows(self.image, range(len(self.arrays["image_id"])))

    def segmentation(self, j, row):
        """Annotation j's segmentation (of image row `row`) as the file gave it, None where it gave none
        (or an empty list); RLE sizes are the image's (the load checked that they agree)."""
        a = self.arrays
        kind, lo, hi = int(a["kind"].array[j]), int(a["seg_lo"].array[j]), int(a["seg_hi"].array[j])
        if kind == POLYGONS:
            ends, coords = a["poly_ends"].array, a["coords"].array
            return [coords[ends[p]:ends[p + 1]].tolist() for p in range(lo, hi)]
        if kind == NO_MASK:
            return None
        size = [int(a["height"].array[row]), int(a["width"].array[row])]
        counts = (a["rle_chars"].array[lo:hi].tobytes().decode("utf-8", "surrogatepass") if kind == RLE_STRING
                  else a["rle_counts"].array[lo:hi].tolist())
        return {"size": size, "counts": counts}

    def annotation(self, j, row):
        """Annotation j (of image row `row`) as a dict: id, image_id, category_id, iscrowd, area, box
        (xyxy, clipped) and segmentation (where given)."""
        a = self.arrays
        out = {"id": int(a["ann_id"].array[j]), "image_id": int(a["image_id"].array[row]),
               "category_id": int(a["category"].array[j]), "iscrowd": int(a["crowd"].array[j]),
               "area": float(a["area"].array[j]), "box": a["box"].array[j].tolist()}
        seg = self.segmentation(j, row)
        if seg is not None:
            out["segmentation"] = seg
        return out

    def annotations_of(self, row):
        """The valid annotations (degenerate boxes skipped) of image row `row`, as dicts, in file order."""
        lo, hi = int(self.arrays["ann_lo"].array[row]), int(self.arrays["ann_hi"].array[row])
        return [self.annotation(j, row) for j in range(lo, hi)]

    @property
    def anns(self):
        """{image id: [annotation dicts]} of the valid annotations (see annotation())."""
        ids = self.arrays["image_id"].array.tolist()
        return {i: self.annotations_of(r) for r, i in enumerate(ids)}

    @property
    def raw(self):
        """The annotation file's dict, iscrowd and area filled in where absent (COCOeval reads both)."""
        if self._raw is None:
            with _gc_paused():
                raw = self._parsed()
            for a in raw["annotations"]:
                a.setdefault("iscrowd", 0)
                if "area" not in a:
                    a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
            self._raw = raw
        return self._raw

    def class_names(self):
        """Category names indexed by id: 0 the background, unused ids "N/A" (torchvision's COCO list)."""
        names = ["N/A"] * (max(self.categories) + 1)
        names[0] = "__background__"
        for i, name in self.categories.items():
            names[i] = name
        return names

    def coco(self):
        """A pycocotools COCO object of the original annotations (the evaluation's ground truth)."""
        from pycocotools.coco import COCO
        gt = COCO()
        gt.dataset = self.raw
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt


class _Rows:
    """A read-only sequence of make(row) over some rows of a CocoSplit."""

    def __init__(self, make, rows):
        self.make, self.rows = make, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.make(int(r)) for r in self.rows[i]]
        return self.make(int(self.rows[i]))

    def __iter__(self):
        return (self.make(int(r)) for r in self.rows)


# ---------------------------------------------------------------- dataset

def _decode_masks(anns, h, w):
    from pycocotools import mask as mask_utils
    out = np.zeros((len(anns), h, w), dtype=np.uint8)
    for i, a in enumerate(anns):
        seg = a.get("segmentation")
        if not seg:  # no mask given: the box
            x1, y1, x2, y2 = (int(round(v)) for v in a["box"])
            out[i, y1:y2, x1:x2] = 1
            continue
        if isinstance(seg, dict) and isinstance(seg["counts"], str):  # compressed RLE: decode reads it as is
            out[i] = mask_utils.decode(seg)
            continue
        rles = mask_utils.frPyObjects(seg, h, w)
        out[i] = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
    return torch.from_numpy(out)


class CocoDetection(Dataset):
    """Items are (image uint8->float [0,1] CxHxW, target, skipped_paths); keys are (index, flip).

    train=True: targets hold boxes (xyxy), labels (category ids), masks (with_masks) of non-crowd
    objects, and images without any are left out. train=False: every listed image, target
    {"image_id"} only (evaluation reads the annotation file itself). Item i is row rows[i] of the
    split's arrays; masks are decoded in the worker, per image.
    """

    def __init__(self, split: CocoSplit, train=True, with_masks=False):
        self.split, self.train, self.with_masks = split, train, with_masks
        every = np.arange(len(split.arrays["image_id"]))
        self.rows = every[split.arrays["boxes_in_image"].array > 0] if train else every
        self.without_boxes = len(every) - len(self.rows)

    @property
    def images(self):
        return _Rows(self.split.image, self.rows)

    def __len__(self):
        return len(self.rows)

    def aspect_groups(self):
        """Each item's aspect group (1: landscape, 0: not), as an array."""
        a = self.split.arrays
        return (a["width"].array[self.rows] > a["height"].array[self.rows]).astype(np.int64)

    def aspect_group(self, index):
        row = self.rows[index]
        return int(self.split.arrays["width"].array[row] > self.split.arrays["height"].array[row])  # mmdetection's two groups: landscape / not

    def __getitem__(self, key):
        """key: index, (index, flip) or (index, flip, report). An unreadable file is reported (in
        skipped_paths) by its own key only, and not where report is False (the loader's padding
        repeats): counts are files. Training takes the next readable image in its place; evaluation
        returns image None (the loop drops it: every readable image is evaluated exactly once)."""
        index, flip, report = (*key, True)[:3] if isinstance(key, tuple) else (key, False, True)
        skipped = []
        for k in range(MAX_BAD_IN_A_ROW + 1):
            row = int(self.rows[(index + k) % len(self.rows)])
            path = self.split.img_dir / self.split.file_name(row)
            try:
                with Image.open(path) as f:
                    image = pil_to_tensor(pil_rgb(f))
            except Exception:  # PIL raises several types for truncated/garbage files
                skipped.append(str(path))
                if self.train:
                    continue
                return None, {"image_id": int(self.split.arrays["image_id"].array[row])}, (str(path),) if report else ()
            return (*self._item(row, image, flip), tuple(skipped[:1]) if report else ())
        raise UserError(f"{len(skipped)} unreadable images in a row, e.g. {skipped[0]}")

    def _item(self, row, image, flip):
        h, w = image.shape[-2:]
        a = self.split.arrays
        target = {"image_id": int(a["image_id"].array[row])}
        if self.train:
            lo, hi = int(a["ann_lo"].array[row]), int(a["ann_hi"].array[row])
            sel = lo + np.flatnonzero(~a["crowd"].array[lo:hi])
            boxes = torch.from_numpy(a["box"].array[sel]).to(torch.float32).reshape(-1, 4)
            target["boxes"] = boxes
            target["labels"] = torch.from_numpy(a["category"].array[sel].copy())
            if self.with_masks:
                anns = [{"box": a["box"].array[j].tolist(), "segmentation": self.split.segmentation(j, row)} for j in sel]
                target["masks"] = _decode_masks(anns, h, w)
            if flip:
                target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
                if self.with_masks:
                    target["masks"] = target["masks"].flip(-1)
        if flip:
            image = image.flip(-1)
        return image.float().div_(255), target


def collate_detection(batch):
    """Lists of images and targets (sizes differ; the model batches them), plus the skipped paths."""
    return [b[0] for b in batch], [b[1] for b in batch], [p for b in batch for p in b[2]]


# ---------------------------------------------------------------- loader

def epoch_generator(seed, epoch):
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 10_007 + 17) % 2**63)


def grouped_order(dataset, batch_size, seed, epoch, world_size):
    """grouped_batches as arrays: (indices, flips), each of shape (batches, batch_size)."""
    g = epoch_generator(seed, epoch)
    flips = (torch.rand(len(dataset), generator=g) < 0.5).numpy()
    step = batch_size * world_size
    groups, chunks = dataset.aspect_groups(), []
    for group in (0, 1):
        idx = torch.from_numpy(np.flatnonzero(groups == group))
        if len(idx) == 0:
            continue
        idx = idx[torch.randperm(len(idx), generator=g)]
        chunks.append(idx[torch.arange(math.ceil(len(idx) / step) * step) % len(idx)].numpy().reshape(-1, batch_size))
    batches = np.concatenate(chunks) if chunks else np.zeros((0, batch_size), np.int64)
    order = torch.randperm(len(batches) // world_size, generator=g).numpy()
    # Consecutive world_size batches form one global step; keep them together so a step's batches
    # come from one group on every rank.
    batches = batches[(order[:, None] * world_size + np.arange(world_size)).reshape(-1)]
    return batches, flips[batches]


def grouped_batches(dataset, batch_size, seed, epoch, world_size):
    """All ranks' batches of one epoch, a pure function of (seed, epoch): images grouped by aspect
    (landscape / portrait) so padding wastes little; each group shuffled and padded by repeating
    its own images to a multiple of batch_size * world_size (every rank gets the same number of
    batches, as mmdetection's DistributedGroupSampler); batch order shuffled. Items are
    (index, flip) with flip drawn per index from the same generator (probability 0.5)."""
    index, flips = grouped_order(dataset, batch_size, seed, epoch, world_size)
    return [list(zip(i, f)) for i, f in zip(index.tolist(), flips.tolist())]


class CocoLoader:
    """Called as utils.inputs.data.EpochLoader (the trainer's Task.loader); `loader(epoch, start_batch=k)`
    yields that epoch's batches from k on, the first k skipped without being loaded.

    Training: grouped_batches, this rank's share. Evaluation: one image per batch (torchvision's and
    mmdetection's test setting; detections then do not depend on how images were batched or on
    the number of processes), contiguous shards (each image evaluated once, no padding). Workers are
    started once a run and persist across epochs (only the batch list changes): nothing random
    happens in them, flips come with the keys.
    """

    def __init__(self, dataset, batch_size, workers, seed, rank=0, world_size=1, train=True,
                 pin_memory=False, collate_fn=collate_detection):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.seed, self.rank, self.world_size, self.train = seed, rank, world_size, train
        self.generator = torch.Generator()
        self._batches = _Batches()
        if workers:
            end_workers_at_exit()
        self.loader = DataLoader(
            dataset, batch_sampler=self._batches, num_workers=workers, collate_fn=collate_fn or collate_detection,
            pin_memory=pin_memory, generator=self.generator, persistent_workers=workers > 0,
            # scancel / a time limit signal the whole job: workers live on while the main process saves
            worker_init_fn=ignore_stop_signals_in_worker, multiprocessing_context=worker_start_method(workers))

    def batches(self, epoch):
        if not self.train:
            return [[(i, False)] for i in ShardSampler(len(self.dataset), self.rank, self.world_size)]
        return grouped_batches(self.dataset, self.batch_size, self.seed, epoch, self.world_size)[self.rank::self.world_size]

    def keys(self, epoch):
        """batches(epoch) with a third element, report: False where an image comes again in the epoch
        (training's padding, on any rank), so an unreadable file is counted once an epoch."""
        if not self.train:
            return [[(i, f, True) for i, f in b] for b in self.batches(epoch)]
        index, flips = grouped_order(self.dataset, self.batch_size, self.seed, epoch, self.world_size)
        report = np.zeros(index.size, bool)
        report[np.unique(index.reshape(-1), return_index=True)[1]] = True  # first time in the epoch
        report = report.reshape(index.shape)
        mine = slice(self.rank, None, self.world_size)
        return [list(zip(*b)) for b in zip(index[mine].tolist(), flips[mine].tolist(), report[mine].tolist())]

    def __call__(self, epoch=0, start_batch=0):
        self._batches.batches = self.keys(epoch)[start_batch:]
        # Its own generator: creating the iterator then draws nothing from the global RNG, whose state a
        # mid-epoch checkpoint restores.
        self.generator.manual_seed(epoch_generator(self.seed, epoch).initial_seed())
        return self.loader

    def __len__(self):
        if not self.train:
            return len(ShardSampler(len(self.dataset), self.rank, self.world_size))
        sizes = np.bincount(self.dataset.aspect_groups(), minlength=2)
        return sum(math.ceil(int(n) / (self.batch_size * self.world_size)) for n in sizes)


# ---------------------------------------------------------------- evaluation

def detections_to_coco(image_id, output, with_masks):
    """One image's model output -> COCO result dicts (bbox xywh; segm as compressed RLE)."""
    boxes = output["boxes"].float().cpu()
    scores, labels = output["scores"].float().cpu().tolist(), output["labels"].cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    bbox = [{"image_id": image_id, "category_id": c, "bbox": b, "score": s} for b, c, s in zip(xywh, labels, scores)]
    segm = []
    if with_masks:
        from pycocotools import mask as mask_utils
        masks = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for m, c, s in zip(masks, labels, scores):
            rle = mask_utils.encode(np.asfortranarray(m))
            segm.append({"image_id": image_id, "category_id": c, "score": s,
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return bbox, segm


def coco_eval(coco_gt, results, iou_type, img_ids=None):
    """COCOeval on `results` (a list of COCO result dicts); returns (metrics in %, summary text).

    Metrics are {type_AP, type_AP50, type_AP75, type_APs, type_APm, type_APl}; pycocotools' -1 (no
    ground truth in that size range) stays -1. No detections at all scores 0 where there is ground truth.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if results:
            dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes writes into the dicts
        else:  # loadRes refuses an empty list
            dt = COCO()
            dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                          "annotations": []}
            dt.createIndex()
        ev = COCOeval(coco_gt, dt, iou_type)
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ev.summarize()
    metrics = {f"{iou_type}_{k}": (100 * float(v) if v >= 0 else -1.0) for k, v in zip(METRICS, ev.stats[:6])}
    return metrics, text.getvalue()


def metrics_line(iou_type, metrics):
    """`bbox: AP 39.200 AP50 ... AP75 ... APs ... APm ... APl ...` (percent, 3 decimals)."""
    return f"{iou_type}: " + " ".join(f"{k} {metrics[f'{iou_type}_{k}']:.3f}" for k in METRICS)


# ---------------------------------------------------------------- demo data

DEMO_DIR = Path(__file__).resolve().parents[2] / "data" / "coco_demo"
DEMO_CATEGORIES = ({"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}, {"id": 3, "name": "triangle"})
DEMO_STAMP, DEMO_VERSION = ".demo_version", "1: 3 shapes, 96 train + 24 val images, 96-160 px, seed 0"


def _shape_polygon(kind, x, y, w, h, rng):
    if kind == 1:
        return [x, y, x + w, y, x + w, y + h, x, y + h]
    if kind == 2:
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        return [v for a in t for v in (x + w / 2 * (1 + np.cos(a)), y + h / 2 * (1 + np.sin(a)))]
    apex = x + rng.uniform(0.2, 0.8) * w
    return [apex, y, x + w, y + h, x, y + h]


def _polygon_area(p):
    xs, ys = np.array(p[0::2]), np.array(p[1::2])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def make_coco_demo(out, train_images=96, val_images=24, sizes=(96, 160), seed=0):
    """COCO-format shapes: 1-3 non-overlapping rectangles / ellipses / triangles per image, each with
    its box and polygon mask, on a noisy background. Same arguments, same files."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_images), ("val", val_images)):
        folder = out / f"{split}2017"
        folder.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split == "val", i])
            w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
            bg = rng.uniform(0, 255, 3)
            img = Image.fromarray(np.clip(bg + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(img)
            placed = []
            for _ in range(int(rng.integers(1, 4))):
                for _try in range(20):
                    bw, bh = rng.uniform(0.25, 0.5) * w, rng.uniform(0.25, 0.5) * h
                    x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                    if all(x + bw < a or a + c < x or y + bh < b or b + d < y for a, b, c, d in placed):
                        break
                else:
                    continue
                placed.append((x, y, bw, bh))
                cat = int(rng.integers(1, 4))
                poly = [round(float(v), 2) for v in _shape_polygon(cat, x, y, bw, bh, rng)]
                colour = tuple(int(v) for v in (bg + 128 + rng.uniform(-60, 60, 3)) % 256)
                draw.polygon(poly, fill=colour)
                xs, ys = poly[0::2], poly[1::2]
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "iscrowd": 0,
                             "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                             "area": _polygon_area(poly), "segmentation": [poly]})
            name = f"{i + 1:012d}.jpg"
            img.save(folder / name, quality=92)
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        data = {"images": images, "annotations": anns, "categories": list(DEMO_CATEGORIES)}
        (out / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return out


def ensure_coco_demo(root=DEMO_DIR):
    """The cached demo set, generated on first use (utils.inputs.demo_data.ensure_generated)."""
    return ensure_generated(root, make_coco_demo, DEMO_VERSION, stamp=DEMO_STAMP)
