"""Image-folder hazards: a file name that is not UTF-8, images nested below a class folder, an image
above the decompression-bomb limit (docs/reliability.md, docs/input-pipeline.md)."""
import io
import json
import os
import shutil

import pytest
from PIL import Image

import main_imagenet
from conftest import TINY, make_tiny_data, seed
from utils import UserError
from utils.inputs.data import SafeImageFolder, ValTransform, check_image_folder, pil_loader, tensor_loader


def test_an_unreadable_image_named_in_bytes_that_are_not_utf8_keeps_the_epoch(tmp_path, one_thread, capsys):
    data = make_tiny_data(tmp_path / "data", train_per_class=2, val_per_class=1)
    bad = os.fsencode(data / "train" / "disc") + b"/bad\xff.JPEG"  # 6 readable + 1: -b 7 is one batch of all
    with open(bad, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(SystemExit) as exc:
        main_imagenet.main([str(a) for a in [data, *TINY, "-b", "7", "-j", "0", "--epochs", "1", "--seed", seed(),
                                             "--ckpt", tmp_path / "ck"]])
        raise SystemExit(0)
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err[-2000:]
    run = tmp_path / "ck" / f"imagenet-resnet18-seed{seed()}"
    shown = f"skipped unreadable image: {data / 'train' / 'disc'}/bad\\xff.JPEG"  # the byte, escaped
    log = (run / "log.txt").read_bytes().decode("utf-8")  # valid UTF-8 throughout
    assert shown in log.splitlines() and shown in out.out.splitlines()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["skipped_images"]) for r in rows] == [(1, 1)]
    assert (run / "checkpoint.pth.tar").is_file()


def test_images_nested_below_a_class_folder_are_accepted_and_read(tmp_path):
    """One rule for the check and the loader: a class's images may sit at any depth below its folder."""
    data = make_tiny_data(tmp_path / "data", train_per_class=1, val_per_class=2)
    disc = data / "val" / "disc"
    (disc / "sub" / "deeper").mkdir(parents=True)
    files = sorted(p.name for p in disc.glob("*.JPEG"))
    for name in files:
        shutil.move(disc / name, disc / "sub" / "deeper" / name)
    assert check_image_folder(data / "val") == ["disc", "h_stripes", "v_stripes"]
    ds = SafeImageFolder(str(data / "val"))
    assert [(p, t) for p, t in ds.samples if t == ds.class_to_idx["disc"]] == [
        (str(disc / "sub" / "deeper" / name), ds.class_to_idx["disc"]) for name in files]
    for name in files:  # only empty subfolders left: no images at any depth
        os.remove(disc / "sub" / "deeper" / name)
    with pytest.raises(UserError, match="class folder has no images: .*disc"):
        check_image_folder(data / "val")


def jpeg_declaring(width, height):
    """A small JPEG whose header (SOF0) declares width x height: PIL's size check reads only the header,
    so a 256-Mpixel image is tested without 768 MB of pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_backends_agree_on_an_image_above_the_decompression_bomb_limit(tmp_path):
    """A 256-Mpixel JPEG (16384 x 16384) is over PIL's limit (2 * Image.MAX_IMAGE_PIXELS): the torch backend
    skips it as the pil backend does, and both evaluate every other image."""
    assert 16384 * 16384 > 2 * Image.MAX_IMAGE_PIXELS
    data = make_tiny_data(tmp_path / "data", train_per_class=1, val_per_class=2)
    big = data / "val" / "disc" / "big.JPEG"
    big.write_bytes(jpeg_declaring(16384, 16384))
    for loader in (tensor_loader, pil_loader):
        with pytest.raises(Image.DecompressionBombError):
            loader(big)
    seen = {}
    for backend in ("torch", "pil"):
        ds = SafeImageFolder(str(data / "val"), ValTransform(36, 32), backend=backend, evaluate_once=True)
        items = [ds[i] for i in range(len(ds))]
        seen[backend] = [p for _, _, skipped in items for p in skipped], sum(t >= 0 for _, t, _ in items)
    assert seen["torch"] == seen["pil"] == ([str(big)], 6)
