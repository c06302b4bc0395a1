"""COCO bad input and image faults, each built here: annotation files that break the loader or the
evaluation (one `error:` line at load, before anything is built or trained), unreadable images
(dropped from evaluation and counted once per file), 16-bit PNGs (decoded as value >> 8, for COCO and
the ImageNet loaders), compressed RLE masks, file names with subfolders."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

import main_coco
from conftest import run_dir, seed
from utils import UserError
from utils.inputs.coco import CocoDetection, CocoLoader, CocoSplit, coco_eval, make_coco_demo
from utils.inputs.data import pil_loader, pil_rgb, tensor_loader
from utils.detection_engine import evaluate

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def coco_small(tmp_path_factory):
    return make_coco_demo(tmp_path_factory.mktemp("coco_faults") / "data", train_images=8, val_images=5)


def copy_with(src, dst, split=None, edit=None):
    """A copy of the demo set whose {split} annotation file went through edit(dict)."""
    shutil.copytree(src, dst)
    if edit is not None:
        path = dst / "annotations" / f"instances_{split}2017.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes (and reads) them
    return dst


def ann_file(root, split):
    return root / "annotations" / f"instances_{split}2017.json"


def first_ann(**changes):
    def edit(d):
        d["annotations"][0].update(changes)
    return edit


def first_image(**changes):
    def edit(d):
        d["images"][0].update(changes)
    return edit


def add_category(d):
    d["categories"].append({"id": 10_000_000, "name": "huge"})


def no_images(d):
    d["images"], d["annotations"] = [], []


# (split, edit, the error line after "error: " ({file}: that split's annotation file))
BAD_ANNOTATIONS = {
    "list image_id": ("train", first_ann(image_id=[1]),
                      "annotation 1 in {file}: image_id [1] is a list, not an integer; COCO ids are integers"),
    "list category_id": ("val", first_ann(category_id=[2]),
                         "annotation 1 in {file}: category_id [2] is a list, not an integer; COCO ids are integers"),
    "string image_id": ("val", first_ann(image_id="1"),
                        'annotation 1 in {file}: image_id "1" is a string, not an integer; COCO ids are integers'),
    "string category_id": ("train", first_ann(category_id="2"),
                           'annotation 1 in {file}: category_id "2" is a string, not an integer; COCO ids are integers'),
    "string image id": ("val", first_image(id="1"),
                        'annotation file {file}: image id "1" is a string, not an integer; COCO ids are integers'),
    "annotation id 0": ("train", first_ann(id=0),
                        "annotation 0 in {file}: id must be an integer >= 1 (pycocotools reads 0 as 'no match')"),
    "nan bbox (train)": ("train", first_ann(bbox=[10.0, float("nan"), 20.0, 20.0]),
                         "annotation 1 in {file}: bbox is not finite: [10.0, NaN, 20.0, 20.0]"),
    "inf bbox (val)": ("val", first_ann(bbox=[10.0, 10.0, float("inf"), 20.0]),
                       "annotation 1 in {file}: bbox is not finite: [10.0, 10.0, Infinity, 20.0]"),
    "nan polygon (val)": ("val", first_ann(segmentation=[[10.0, 10.0, float("nan"), 10.0, 30.0, 30.0]]),
                          "annotation 1 in {file}: segmentation polygon 0 is not finite"),
    "inf area (train)": ("train", first_ann(area=float("-inf")), "annotation 1 in {file}: area is not finite"),
    "string bbox": ("train", first_ann(bbox="1234"), 'annotation 1 in {file}: bbox is not [x, y, w, h]: "1234"'),
    "empty polygon": ("train", first_ann(segmentation=[[]]),
                      "annotation 1 in {file}: segmentation polygon 0 has 0 coordinates; a polygon needs 3 or more "
                      "(x, y) points"),
    "one-point polygon": ("val", first_ann(segmentation=[[10, 12]]),
                          "annotation 1 in {file}: segmentation polygon 0 has 2 coordinates; a polygon needs 3 or "
                          "more (x, y) points"),
    "RLE of another size": ("train", first_ann(segmentation={"size": [4, 4], "counts": "04"}),
                            "annotation 1 in {file}: an RLE segmentation needs size ["),
    "category id 10,000,000": ("val", add_category,
                               "annotation file {file}: category id 10000000 is above the limit 10000 (labels are "
                               "category ids, so the detector would get 10000001 classes); number the categories from 1"),
    "no val images": ("val", no_images, "annotation file {file} lists no images"),
    # beyond a double's range (and orjson's 64 bits: the standard parser reads these)
    "huge integer bbox": ("train", first_ann(bbox=[10 ** 400, 1, 2, 3]),
                          "annotation 1 in {file}: bbox is not finite: [1000000"),
    "huge integer polygon": ("val", first_ann(segmentation=[[10 ** 400, 1, 5, 1, 5, 5]]),
                             "annotation 1 in {file}: segmentation polygon 0 is not finite"),
    "image id beyond 64 bits": ("val", first_image(id=2 ** 64),  # a float for orjson, an int for json: one line
                                "annotation file {file}: image id is beyond the 64-bit integers COCO ids are kept in"),
    "annotation id 2**63": ("train", first_ann(id=2 ** 63),
                            "annotation 9223372036854775808 in {file}: id is beyond the 64-bit integers COCO ids"),
}


@pytest.mark.parametrize("case", list(BAD_ANNOTATIONS))
def test_bad_annotation_is_one_error_line_before_training(case, coco_small, tmp_path, capsys):
    split, edit, message = BAD_ANNOTATIONS[case]
    root = copy_with(coco_small, tmp_path / "data", split, edit)
    ckpt = tmp_path / "ck"
    with pytest.raises(SystemExit) as e:
        main_coco.main([str(root), "-a", "resnet18", "--ckpt", str(ckpt), "-j", "0"])
    out, err = capsys.readouterr()
    err = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error: " + message.format(file=ann_file(root, split))), err
    assert not ckpt.exists() and "Epoch" not in out  # refused at load: no run folder, no step


def test_val_checks_hold_under_evaluate_only(coco_small, tmp_path, capsys):
    """-e reads only the val file: its checks (here a NaN box) still come before the model is built."""
    root = copy_with(coco_small, tmp_path / "data", "val", first_ann(bbox=[float("nan"), 1, 2, 3]))
    (tmp_path / "weights.pth").write_bytes(b"")  # never read: the data is checked first
    with pytest.raises(SystemExit):
        main_coco.main([str(root), "-a", "resnet18", "-e", "--resume", str(tmp_path / "weights.pth"), "-j", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: annotation 1 in {ann_file(root, 'val')}: bbox is not finite: [NaN, 1, 2, 3]"]


def test_both_json_parsers_read_a_file_alike(tmp_path, monkeypatch):
    """orjson (the fast path) and the standard parser give the same objects: every float to the bit
    (random doubles, subnormals, the extremes, -0.0), integers at 64 bits, escapes, repeated keys; and
    what orjson refuses (NaN, Infinity, integers beyond 64 bits, a lone surrogate) is read by the
    standard parser, as before."""
    import orjson  # noqa: F401 (requirements.txt: the fast path is the one tested)

    from utils.inputs import coco
    g = np.random.default_rng(seed(0))
    doubles = g.integers(0, 2 ** 64, 3000, dtype=np.uint64).view(np.float64)  # every bit pattern: both signs
    doubles = [float(d) for d in doubles[np.isfinite(doubles)]]
    doubles += [5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -0.0, 0.1, 1 / 3, 123456789.12345678]
    ints = [0, -1, 2 ** 63 - 1, -2 ** 63, *map(int, g.integers(-2 ** 62, 2 ** 62, 100))]
    files = {"plain": '{"a": %s, "b": %s, "s": "caf\\u00e9 \\ud83d\\ude00 \u00e9", "a": "again", "nested": [[{}], []]}'
             % (json.dumps(doubles), json.dumps(ints)),
             "nan": '{"x": [NaN, Infinity, -Infinity, 1.5]}', "lone surrogate": '{"x": "\\ud800"}',
             "big": '{"x": [%d, %d, 1]}' % (2 ** 64, -2 ** 63 - 1)}
    for name, text in files.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text, encoding="utf-8")
        fast = coco._parse_json(path)
        with monkeypatch.context() as m:
            m.setitem(__import__("sys").modules, "orjson", None)  # not installed: the standard parser
            slow = coco._parse_json(path)
        want = json.loads(text)
        if name == "big":  # beyond 64 bits orjson gives the float of the integer (_id refuses both alike)
            assert slow == want and fast == {"x": [float(2 ** 64), float(-2 ** 63 - 1), 1]}
            continue
        # json.dumps writes each float's shortest round-trip form (so -0.0 and 0.0 differ) and keeps int apart from float
        assert json.dumps(fast) == json.dumps(slow) == json.dumps(want), name


# ---------------------------------------------------------------- masks and file names

def test_rle_masks_equal_the_polygons_they_encode(coco_small, tmp_path):
    """Non-crowd objects may carry compressed or uncompressed RLE (pycocotools' formats): Mask R-CNN's
    targets equal those of the polygons they were made from."""
    ref = CocoDetection(CocoSplit(coco_small, "train"), train=True, with_masks=True)
    sizes = {im["id"]: (im["height"], im["width"]) for im in ref.images}

    def to_rle(d):
        for k, a in enumerate(d["annotations"]):
            h, w = sizes.get(a["image_id"], (None, None))
            if h is None:
                continue
            rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))
            if k % 2:  # compressed (a string), as COCO's crowd annotations
                a["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode()}
            else:  # uncompressed: run lengths in column-major order
                flat = mask_utils.decode(rle).flatten(order="F")
                edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
                a["segmentation"] = {"size": [h, w], "counts": np.diff(np.concatenate([[0], edges])).tolist()}
    root = copy_with(coco_small, tmp_path / "data", "train", to_rle)
    ds = CocoDetection(CocoSplit(root, "train"), train=True, with_masks=True)
    assert len(ds) == len(ref) > 0
    kinds = set()
    for a in ds.split.raw["annotations"]:
        kinds.add(type(a["segmentation"]["counts"]).__name__)
    assert kinds == {"str", "list"}
    for i in range(len(ds)):
        got, want = ds[i][1]["masks"], ref[i][1]["masks"]
        assert got.shape == want.shape and torch.equal(got, want) and got.sum() > 0, i


def test_file_names_with_subfolders(coco_small, tmp_path):
    def move(d):
        d["images"][0]["file_name"] = "sub/dir/" + d["images"][0]["file_name"]
    root = copy_with(coco_small, tmp_path / "data", "val", move)
    name = json.loads(ann_file(coco_small, "val").read_text())["images"][0]["file_name"]
    (root / "val2017" / "sub" / "dir").mkdir(parents=True)
    (root / "val2017" / name).rename(root / "val2017" / "sub" / "dir" / name)
    ds = CocoDetection(CocoSplit(root, "val"), train=False)
    ref = CocoDetection(CocoSplit(coco_small, "val"), train=False)
    image, target, skipped = ds[0]
    assert skipped == () and target == ref[0][1] and torch.equal(image, ref[0][0])
    (root / "val2017" / "sub" / "dir" / name).unlink()  # still checked: a missing one is named
    with pytest.raises(UserError, match=f"1 images listed in .* are missing from .*val2017, e.g. sub/dir/{name}"):
        CocoSplit(root, "val")


# ---------------------------------------------------------------- unreadable images

def break_files(root, split, names):
    for name in names:
        (root / f"{split}2017" / name).write_bytes(b"not an image")
    return [str(root / f"{split}2017" / n) for n in names]


class _ByContent(nn.Module):
    """A 'detector' answering each image with the detections prepared for it (found by its pixels),
    recording which images it saw."""

    def __init__(self, table):
        super().__init__()
        self.table, self.seen = table, []
        self.roi_heads = type("Heads", (), {"has_mask": lambda _: False})()

    def forward(self, images):
        out = []
        for im in images:
            image_id, output = self.table[(tuple(im.shape), float(im.sum()))]
            self.seen.append(image_id)
            out.append(output)
        return out


def test_unreadable_val_image_is_dropped_and_counted(coco_small, tmp_path):
    """AP with an unreadable val image equals AP on the same set without that image (ground truth
    included), every readable image is evaluated exactly once, and the bad file is counted once."""
    split = CocoSplit(coco_small, "val")
    rng = np.random.default_rng(0)
    table, results = {}, {}
    ds = CocoDetection(split, train=False)
    for image, target, _ in (ds[i] for i in range(len(ds))):
        anns = split.anns[target["image_id"]]  # noisy ground truth: AP strictly between 0 and 100
        boxes = torch.tensor([[v + float(rng.normal(0, 3)) for v in a["box"]] for a in anns])
        output = {"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns]),
                  "scores": torch.tensor(rng.uniform(0.1, 1, len(anns)), dtype=torch.float32)}
        table[(tuple(image.shape), float(image.sum()))] = (target["image_id"], output)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        results[target["image_id"]] = [{"image_id": target["image_id"], "category_id": int(c), "bbox": b,
                                        "score": float(s)} for b, c, s in zip(xywh, output["labels"], output["scores"])]
    assert len(table) == len(split.images)  # every image told apart by its pixels

    bad = split.images[1]
    root = copy_with(coco_small, tmp_path / "data")
    paths = break_files(root, "val", [bad["file_name"]])
    model = _ByContent(table)
    va = evaluate(model, CocoLoader(CocoDetection(CocoSplit(root, "val"), train=False), 1, 0, 0, train=False)(0), CPU)
    readable = [im["id"] for im in split.images if im["id"] != bad["id"]]
    assert sorted(model.seen) == readable  # each once
    assert va["count"] == len(readable) and va["skipped"] == 1 and paths

    def without_bad(d):
        d["images"] = [im for im in d["images"] if im["id"] != bad["id"]]
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] != bad["id"]]
    removed = copy_with(coco_small, tmp_path / "removed", "val", without_bad)
    want, _ = coco_eval(CocoSplit(removed, "val").coco(), [r for i in readable for r in results[i]], "bbox")
    assert {k: va[k] for k in want} == want and 0 < want["bbox_AP"] < 100


def test_unreadable_files_are_counted_once_an_epoch(coco_small, tmp_path):
    """Two neighbours (one replaces the other) and a file the padding repeats: each counted once per
    epoch, on one rank or two; validation counts its bad file once too."""
    ds0 = CocoDetection(CocoSplit(coco_small, "train"), train=True)
    for batch_size in (3, 5):
        batches = CocoLoader(ds0, batch_size, 0, seed=0).batches(0)
        keys = [i for b in batches for i, _ in b]
        repeated = sorted({i for i in keys if keys.count(i) > 1})
        if repeated:
            break
    assert repeated, "no padding repeat to test"
    bad_idx = sorted({repeated[0], 0, 1} if repeated[0] not in (0, 1) else {repeated[0], 2, 3})
    assert len(bad_idx) == 3
    root = copy_with(coco_small, tmp_path / "data")
    bad = break_files(root, "train", [ds0.images[i]["file_name"] for i in bad_idx])
    bad_val = break_files(root, "val", [CocoSplit(coco_small, "val").images[0]["file_name"]])
    ds = CocoDetection(CocoSplit(root, "train"), train=True)
    for world_size in (1, 2):
        for epoch in (0, 1):
            seen = [p for rank in range(world_size)
                    for _, _, skipped in CocoLoader(ds, batch_size, 0, 0, rank, world_size)(epoch) for p in skipped]
            assert sorted(seen) == sorted(bad), (world_size, epoch)
    val = CocoDetection(CocoSplit(root, "val"), train=False)
    seen = [p for rank in range(2) for _, _, skipped in CocoLoader(val, 1, 0, 0, rank, 2, train=False)(0) for p in skipped]
    assert seen == bad_val


# ---------------------------------------------------------------- 16-bit images

def gray16(path, seed=0):
    """A 16-bit grayscale PNG (PIL mode I;16) of random values; returns the values."""
    values = np.random.default_rng(seed).integers(0, 65536, (23, 31)).astype(np.uint16)
    Image.fromarray(values).save(path, format="PNG")
    with Image.open(path) as f:
        assert f.mode == "I;16"
    return values


def test_16bit_png_keeps_its_top_8_bits(tmp_path):
    values = gray16(tmp_path / "a.png")
    want = torch.from_numpy((values >> 8).astype(np.uint8)).expand(3, -1, -1)
    assert torch.equal(tensor_loader(tmp_path / "a.png"), want)  # the torch backend (PIL fallback)
    got = torch.from_numpy(np.array(pil_loader(tmp_path / "a.png"))).permute(2, 0, 1)
    assert torch.equal(got, want)  # the pil backend
    wide = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))  # 32-bit: no scale fits, refused
    with pytest.raises(ValueError, match="32-bit integer image with values 0..70000"):
        pil_rgb(wide)
    narrow = Image.fromarray(np.array([[0, 200]], dtype=np.int32))
    assert np.asarray(pil_rgb(narrow))[0, :, 0].tolist() == [0, 200]


def test_16bit_png_in_coco(coco_small, tmp_path):
    root = copy_with(coco_small, tmp_path / "data")
    split = CocoSplit(root, "val")
    im = split.images[0]
    values = np.random.default_rng(1).integers(0, 65536, (im["height"], im["width"])).astype(np.uint16)
    Image.fromarray(values).save(root / "val2017" / im["file_name"], format="PNG")  # a PNG named .jpg
    image, _, skipped = CocoDetection(split, train=False)[0]
    assert skipped == ()
    assert torch.equal(image, torch.from_numpy((values >> 8).astype(np.float32) / 255).expand(3, -1, -1))


def test_training_run_counts_each_bad_file_once(tmp_path):
    """main_coco.py end to end: 2 unreadable train files (neighbours) and 1 unreadable val file give
    skipped_images 3 in the epoch's row, and validation evaluates the 3 readable val images."""
    from test_coco_train import MODEL_KW, TINY, metrics, run_coco
    data = make_coco_demo(tmp_path / "data", train_images=6, val_images=4)
    train = CocoDetection(CocoSplit(data, "train"), train=True)
    bad = break_files(data, "train", [train.images[i]["file_name"] for i in (1, 2)])
    bad += break_files(data, "val", [CocoSplit(data, "val").images[0]["file_name"]])
    out = run_coco(data, ["--epochs", "1", "--ckpt", tmp_path / "ck", "--seed", seed(0)] + TINY + MODEL_KW)
    row = metrics(run_dir([data, "--epochs", "1", "--ckpt", tmp_path / "ck", "--seed", seed(0)] + TINY + MODEL_KW,
                          script="main_coco.py"))[0]
    assert row["skipped_images"] == 3 and "skipped 3 unreadable images" in out
    assert sorted(set(p for p in bad if f"skipped unreadable image: {p}" in out)) == sorted(bad)


def test_flat_annotation_arrays_give_the_targets_of_the_annotation_dicts(coco_small, tmp_path):
    """CocoSplit's flat arrays give every training item exactly (boxes, labels, masks, flipped or not)
    what the annotation dicts gave, built here from the JSON as CocoDetection built them before:
    polygons, compressed and uncompressed RLE, no segmentation, crowd, clipped and degenerate boxes.
    CocoLoader's workers persist across epochs and give -j 0's batches."""
    from torchvision.transforms.functional import pil_to_tensor

    from utils.inputs.coco import _decode_masks

    def edit(d):
        a = d["annotations"]
        a[0]["bbox"][0] -= 5  # clipped at the left edge
        del a[1]["segmentation"]  # the box as mask
        rle = mask_utils.frPyObjects(a[2]["segmentation"], d["images"][0]["height"], d["images"][0]["width"])
        a[2]["segmentation"] = {"size": rle[0]["size"], "counts": rle[0]["counts"].decode()}
        a[3]["iscrowd"] = 1
        a[4]["bbox"] = [1.0, 1.0, 0.0, 3.0]  # degenerate: skipped
        im = next(i for i in d["images"] if i["id"] == a[5]["image_id"])
        flat = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a[5]["segmentation"], im["height"],
                                                                          im["width"]))).flatten(order="F")
        edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        a[5]["segmentation"] = {"size": [im["height"], im["width"]], "counts": np.diff(np.concatenate([[0], edges])).tolist()}
        a[6]["segmentation"].append([1, 1, 9.5, 1, 5, 7.25])
    root = copy_with(coco_small, tmp_path / "data", "train", edit)
    data = json.loads(ann_file(root, "train").read_text())
    by_id, anns = {im["id"]: im for im in data["images"]}, {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        im, (x, y, w, h) = by_id[a["image_id"]], map(float, a["bbox"])
        box = [max(x, 0.0), max(y, 0.0), min(x + w, im["width"]), min(y + h, im["height"])]
        if box[2] > box[0] and box[3] > box[1]:
            anns[im["id"]].append({**a, "box": box})
    images = [im for im in data["images"] if any(not a.get("iscrowd", 0) for a in anns[im["id"]])]
    ds = CocoDetection(CocoSplit(root, "train"), train=True, with_masks=True)
    assert ds.split.degenerate == 1 and len(ds) == len(images) and ds.without_boxes == len(data["images"]) - len(images)
    for i, im in enumerate(images):
        objects = [a for a in anns[im["id"]] if not a.get("iscrowd", 0)]
        image = pil_to_tensor(pil_rgb(Image.open(root / "train2017" / im["file_name"])))
        h, w = image.shape[-2:]
        boxes = torch.tensor([a["box"] for a in objects], dtype=torch.float32)
        masks = _decode_masks(objects, h, w)
        for flip in (False, True):
            got_image, got, _ = ds[(i, flip)]
            want_boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1) if flip else boxes
            assert torch.equal(got_image, (image.flip(-1) if flip else image).float() / 255)
            assert got["image_id"] == im["id"] and torch.equal(got["boxes"], want_boxes)
            assert torch.equal(got["labels"], torch.tensor([a["category_id"] for a in objects]))
            assert torch.equal(got["masks"], masks.flip(-1) if flip else masks)
    assert ds.split.anns == {k: [{key: a[key] for key in ("id", "image_id", "category_id", "box")} | {
        "iscrowd": a.get("iscrowd", 0), "area": a["area"], **({"segmentation": a["segmentation"]} if a.get("segmentation") else {})}
        for a in v] for k, v in anns.items()}

    loader, plain = CocoLoader(ds, 2, 2, seed=seed(3)), CocoLoader(ds, 2, 0, seed=seed(3))
    pids = []
    for epoch in (0, 1):
        it = iter(loader(epoch))
        for (xs, ts, _), (ys, us, _) in zip(it, plain(epoch)):
            assert all(torch.equal(x, y) for x, y in zip(xs, ys))
            assert all(torch.equal(t[k], u[k]) for t, u in zip(ts, us) for k in ("boxes", "labels", "masks"))
        pids.append([w.pid for w in it._workers])
    assert pids[0] == pids[1]  # started once
