"""COCO detection parts against references: torchvision's detectors (layout, outputs), pycocotools
(COCOeval called directly), our ImageNet models' keys; the loader's determinism; bad COCO input."""
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torchvision.models.detection import (FasterRCNN, MaskRCNN, fasterrcnn_resnet50_fpn,
                                          maskrcnn_resnet50_fpn)
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

import main_coco
from networks import ATTENTION_CHOICES, create_detector, create_net
from utils import UserError
from utils.inputs.coco import CocoDetection, CocoLoader, CocoSplit, coco_eval, make_coco_demo
from utils.detection_engine import evaluate, load_pretrained_backbone

SMALL = dict(min_size=64, max_size=96)
TORCHVISION = {"faster_rcnn": (FasterRCNN, fasterrcnn_resnet50_fpn), "mask_rcnn": (MaskRCNN, maskrcnn_resnet50_fpn)}


@pytest.fixture(scope="module")
def coco_tiny(tmp_path_factory):
    return make_coco_demo(tmp_path_factory.mktemp("coco") / "data", train_images=8, val_images=4)


@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn"])
def test_resnet50_layout_and_outputs_equal_torchvision(kind):
    cls, builder = TORCHVISION[kind]
    torch.manual_seed(0)
    kw = dict(SMALL, box_score_thresh=0.0, box_detections_per_img=10)  # random weights: keep some
    ours = create_detector(kind, "resnet50", num_classes=91, **kw)
    # torchvision's published COCO models: FrozenBatchNorm2d, trainable_layers=3 (what its weights load into).
    ref = cls(resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                  trainable_layers=3), num_classes=91, **kw)
    plain = builder(weights=None, weights_backbone=None, num_classes=91, **SMALL)
    a, r, p = ours.state_dict(), ref.state_dict(), plain.state_dict()
    assert list(a) == list(r) and all(a[k].shape == r[k].shape for k in a)
    assert [n for n, q in ours.named_parameters() if q.requires_grad] == \
           [n for n, q in ref.named_parameters() if q.requires_grad]
    # weights=None builds BatchNorm2d: the same keys plus its counters; frozen_bn=False matches it exactly.
    assert set(p) - set(a) == {k for k in p if k.endswith("num_batches_tracked")} and set(a) <= set(p)
    unfrozen = create_detector(kind, "resnet50", frozen_bn=False, trainable_layers=5, **SMALL).state_dict()
    assert list(unfrozen) == list(p) and all(unfrozen[k].shape == p[k].shape for k in p)

    sd = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in p.items()}
    for key in [k for k in sd if k.endswith("running_var")]:
        sd[key] = sd[key].abs() + 0.5
    ours.load_state_dict(sd, strict=True)  # FrozenBatchNorm2d drops the counters
    ref.load_state_dict({k: v for k, v in sd.items() if k in r}, strict=True)
    ours.eval(), ref.eval()
    images = [torch.rand(3, 70, 90), torch.rand(3, 80, 60)]
    with torch.no_grad():
        out_a, out_r = ours(images), ref(images)
    for o_a, o_r in zip(out_a, out_r):
        assert set(o_a) == set(o_r) == ({"boxes", "labels", "scores"} | ({"masks"} if kind == "mask_rcnn" else set()))
        assert len(o_a["boxes"]) > 0
        for k in o_a:
            assert torch.equal(o_a[k], o_r[k]), k


@pytest.mark.parametrize("attention", ATTENTION_CHOICES)
def test_backbone_keys_are_our_imagenet_models(attention):
    det = create_detector("faster_rcnn", "resnet18", attention, num_classes=4, **SMALL)
    net = create_net("resnet18", attention).state_dict()
    want = {f"backbone.body.{k}" for k in net if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert {k for k in det.state_dict() if k.startswith("backbone.body.")} == want
    body = det.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    for name, q in body.named_parameters():  # stem and layer1 frozen (mmdetection's frozen_stages=1)
        assert q.requires_grad == name.startswith(("layer2", "layer3", "layer4")), name
    with pytest.raises(ValueError, match="ResNet-style"):
        create_detector("faster_rcnn", "mobilenet_v2")
    # Frozen BatchNorm (SRM's BatchNorm1d included) computes what the ImageNet net computes in eval mode.
    from torchvision.models._utils import IntermediateLayerGetter
    torch.manual_seed(0)
    imagenet = create_net("resnet18", attention).eval()
    for m in imagenet.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    body.load_state_dict({k.removeprefix("backbone.body."): v for k, v in imagenet.state_dict().items()
                          if f"backbone.body.{k}" in want}, strict=True)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got, ref = body(x), IntermediateLayerGetter(imagenet, {"layer4": "3"})(x)
    torch.testing.assert_close(got["3"], ref["3"], rtol=1e-4, atol=1e-5)


def test_pretrained_backbone_ours_and_reference_format(tmp_path):
    torch.manual_seed(0)
    sd = create_net("resnet18", "se", 8).state_dict()
    for k in sd:  # distinguishable running statistics too
        if sd[k].is_floating_point():
            sd[k] = torch.rand_like(sd[k]) + 0.1
    ours, ref = tmp_path / "ours.pth.tar", tmp_path / "ref.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet18", "attention_type": "se", "state_dict": sd}, ours)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_acc": torch.tensor(70.0)}, ref)
    for path in (ours, ref):
        det = create_detector("faster_rcnn", "resnet18", "se", 8, num_classes=4, **SMALL)
        assert load_pretrained_backbone(det, path) == ["fc.bias", "fc.weight"]
        body = det.backbone.body.state_dict()
        assert body and all(torch.equal(v, sd[k]) for k, v in body.items())
    plain = create_detector("faster_rcnn", "resnet18", "none", num_classes=4, **SMALL)
    with pytest.raises(UserError, match=r"does not fit this backbone.*missing keys.*unexpected keys \(e.g. layer1.0.bn2"):
        load_pretrained_backbone(plain, ours)


def _gt_results(split, with_segm):
    bbox, segm = [], []
    for a in split.raw["annotations"]:
        im = next(i for i in split.images if i["id"] == a["image_id"])
        bbox.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0})
        if with_segm:
            rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], im["height"], im["width"]))
            segm.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    return bbox, segm


class _Replay(nn.Module):
    """A 'detector' answering each image with the next prepared output (the loader's order)."""

    def __init__(self, outputs, masks):
        super().__init__()
        self.outputs, self.masks = list(outputs), masks
        self.roi_heads = type("Heads", (), {"has_mask": lambda _: masks})()

    def forward(self, images):
        return [self.outputs.pop(0) for _ in images]


def test_ground_truth_as_detections_scores_100(coco_tiny):
    split = CocoSplit(coco_tiny, "val")
    outputs = []
    for im in split.images:  # ground truth as model outputs: boxes xyxy, masks N x 1 x H x W
        anns = [a for a in split.raw["annotations"] if a["image_id"] == im["id"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns])
        masks = np.stack([mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], im["height"],
                                                                                      im["width"]))) for a in anns])
        outputs.append({"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns]),
                        "scores": torch.ones(len(anns)), "masks": torch.from_numpy(masks)[:, None].float()})
    loader = CocoLoader(CocoDetection(split, train=False), 1, 0, 0, train=False)
    va = evaluate(_Replay(outputs, True), loader(0), torch.device("cpu"))
    assert va["count"] == len(split.images) and va["detections"] == len(split.raw["annotations"])
    for t in ("bbox", "segm"):
        values = [va[f"{t}_{k}"] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        assert values[0] == 100.0 and all(v in (100.0, -1.0) for v in values), (t, values)


def test_evaluator_equals_pycocotools(coco_tiny):
    split = CocoSplit(coco_tiny, "val")
    bbox, segm = _gt_results(split, True)
    rng = np.random.default_rng(0)
    noisy = [{**r, "bbox": [v + float(rng.normal(0, 4)) for v in r["bbox"]], "score": float(rng.uniform()),
              "category_id": r["category_id"] if rng.uniform() < 0.8 else 1 + r["category_id"] % 3} for r in bbox]
    direct_gt = COCO(str(split.ann_file))
    for iou_type, results in (("bbox", noisy), ("segm", segm[1:])):
        ours, text = coco_eval(split.coco(), results, iou_type)
        ev = COCOeval(direct_gt, direct_gt.loadRes(json.loads(json.dumps(results))), iou_type)
        ev.evaluate(), ev.accumulate(), ev.summarize()
        want = [100 * s if s >= 0 else -1.0 for s in ev.stats[:6]]
        assert list(ours.values()) == want and "Average Precision" in text
        assert 0 < want[0] < 100  # a real comparison, not two perfect scores


def test_loader_is_a_pure_function_of_seed_and_epoch(coco_tiny):
    ds = CocoDetection(CocoSplit(coco_tiny, "train"), train=True, with_masks=True)
    one = CocoLoader(ds, 2, 0, seed=3)
    assert one.batches(1) == CocoLoader(ds, 2, 0, seed=3).batches(1) and one.batches(1) != one.batches(2)
    assert len(one) == len(one.batches(0))
    for batch in one.batches(0):  # aspect-ratio groups: one orientation per batch
        assert len({ds.aspect_group(i) for i, _ in batch}) == 1
    full, tail = list(one(0)), list(one(0, start_batch=2))
    assert len(tail) == len(full) - 2
    for (ia, ta, _), (ib, tb, _) in zip(full[2:], tail):
        assert all(torch.equal(x, y) for x, y in zip(ia, ib))
        assert all(torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["masks"], y["masks"]) for x, y in zip(ta, tb))
    flips = {i: f for b in one.batches(0) for i, f in b}
    assert set(flips) == set(range(len(ds))) and len(set(flips.values())) == 2
    i = next(k for k, f in flips.items() if f)
    (im_f, t_f, _), (im, t, _) = ds[(i, True)], ds[(i, False)]
    w = im.shape[-1]
    assert torch.equal(im_f, im.flip(-1)) and torch.equal(t_f["masks"], t["masks"].flip(-1))
    assert torch.allclose(t_f["boxes"][:, [2, 0]], w - t["boxes"][:, [0, 2]])
    ranks = [CocoLoader(ds, 2, 0, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(ranks[0].batches(0))
    assert {i for r in ranks for b in r.batches(0) for i, _ in b} == set(range(len(ds)))
    val = CocoDetection(CocoSplit(coco_tiny, "val"), train=False)
    shards = [CocoLoader(val, 2, 0, 0, rank=r, world_size=3, train=False).batches(0) for r in range(3)]
    assert [i for s in shards for b in s for i, _ in b] == list(range(len(val)))


def _bad_copy(src, dst, edit):
    import shutil
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _json_edit(split, fn):
    def edit(root):
        path = root / "annotations" / f"instances_{split}2017.json"
        path.write_text(json.dumps(fn(json.loads(path.read_text()))))
    return edit


BAD_INPUTS = {
    "missing annotations": (lambda r: (r / "annotations" / "instances_train2017.json").unlink(),
                            "annotation file not found: {root}/annotations/instances_train2017.json"),
    "missing image folder": (lambda r: __import__("shutil").rmtree(r / "val2017"),
                             "image folder not found: {root}/val2017"),
    "malformed json": (lambda r: (r / "annotations" / "instances_val2017.json").write_text('{"images": ['),
                       "annotation file {root}/annotations/instances_val2017.json is not valid JSON"),
    "missing image file": (lambda r: (r / "val2017" / "000000000002.jpg").unlink(),
                           "1 images listed in {root}/annotations/instances_val2017.json are missing from "
                           "{root}/val2017, e.g. 000000000002.jpg"),
    "unlisted image": (_json_edit("train", lambda d: {**d, "annotations": d["annotations"] + [
                           {"id": 999, "image_id": 4242, "category_id": 1, "bbox": [0, 0, 5, 5]}]}),
                       "annotation 999 in {root}/annotations/instances_train2017.json points at image id 4242"),
    "no categories": (_json_edit("val", lambda d: {**d, "categories": []}),
                      "annotation file {root}/annotations/instances_val2017.json has no categories"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_coco_input_is_one_error_line(case, coco_tiny, tmp_path, capsys):
    edit, message = BAD_INPUTS[case]
    root = _bad_copy(coco_tiny, tmp_path / "data", edit)
    with pytest.raises(SystemExit) as e:
        main_coco.main([str(root), "-a", "resnet18", "--ckpt", str(tmp_path / "ck"), "-j", "0"])
    assert e.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: " + message.format(root=root)), err


def test_degenerate_boxes_are_skipped_and_counted(coco_tiny, tmp_path):
    def zero_some(d):
        for a in d["annotations"][:3]:
            a["bbox"] = [a["bbox"][0], a["bbox"][1], 0, a["bbox"][3]]
        d["annotations"][3]["bbox"] = [-50, -50, 10, 10]  # entirely outside the image
        return d
    root = _bad_copy(coco_tiny, tmp_path / "data", _json_edit("train", zero_some))
    split = CocoSplit(root, "train")
    assert split.degenerate == 4
    assert sum(len(v) for v in split.anns.values()) == len(split.raw["annotations"]) - 4
    ds = CocoDetection(split, train=True)
    for i in range(len(ds)):
        boxes = ds[i][1]["boxes"]
        assert len(boxes) and bool(((boxes[:, 2:] - boxes[:, :2]) > 0).all())


def test_configs_and_the_1x_schedule():
    from pathlib import Path
    configs = sorted(Path(main_coco.__file__).parent.glob("configs/coco/*.toml"))
    assert {c.stem for c in configs} == {f"{k}_{a}_{t}" for k in ("faster_rcnn", "mask_rcnn")
                                         for a in ("resnet50", "resnet101") for t in ("simam", "none")}
    for c in configs:
        args = main_coco.parse_args(main_coco.get_args_parser(), ["--config", str(c)])
        assert (args.epochs, args.milestones, args.momentum, args.weight_decay) == (12, [8, 11], 0.9, 1e-4)
        assert (args.min_size, args.max_size, args.warmup_iters, args.trainable_layers) == (800, 1333, 500, 3)
        assert args.attention_param == (0.1 if args.attention_type == "simam" else None)
        assert args.pretrained_backbone.endswith("model_best.pth.tar")
    args = main_coco.parse_args(main_coco.get_args_parser(), ["--config", str(configs[0]), "-b", "8"])
    lr = main_coco.schedule(args, iters_per_epoch=1000)
    base = 0.02 * 8 / 16  # lr 0.02 per 16 images, scaled linearly
    assert lr(0, 0) == pytest.approx(base * 0.001) and lr(0, 250) == pytest.approx(base * (1 - 0.999 * 0.5))
    assert lr(0, 500) == lr(7, 999) == pytest.approx(base)
    assert lr(8, 0) == pytest.approx(base * 0.1) and lr(11, 0) == pytest.approx(base * 0.01)


def test_coco_table_and_launcher_plan(tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    root = Path(main_coco.__file__).parent
    spec = importlib.util.spec_from_file_location("launch_plan", root / "scripts" / "launch_plan.py")
    launch_plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_plan)
    plan, script_for = launch_plan.plan, launch_plan.script_for
    run = tmp_path / "coco-mask_rcnn-resnet50-simam-param0.1"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"detector": "mask_rcnn", "arch": "resnet50", "attention_type": "simam",
                                               "attention_param": 0.1, "epochs": 12, "classes": 91}))
    rows = [{"epoch": e, **{f"{t}_{k}": v + e for t in ("bbox", "segm")
                            for k, v in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), (30, 50, 32, 15, 33, 40))}}
            for e in (11, 12)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = importlib.util.spec_from_file_location("make_table", root / "scripts" / "make_table.py")
    make_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_table)
    make_table.main([str(tmp_path)])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| Mask R-CNN"))
    # the last epoch (42.0 box, 42.0 mask) beside the paper's 39.8 / 36.0
    assert line.startswith("| Mask R-CNN ResNet-50 | SimAM (λ=0.1) | 2/12 | 42.0 | 62.0 | 44.0 | 27.0 | 45.0 | 52.0 | 42.0 |")
    assert "| 39.8 | +2.2 | 36.0 | +6.0 |" in line

    cfg = str(root / "configs" / "coco" / "faster_rcnn_resnet101_simam.toml")
    assert script_for(["--config", cfg]) == "main_coco.py"
    assert plan(["DATA", "--config", cfg, "--ckpt", str(tmp_path)]) == \
        ("new", tmp_path / "coco-faster_rcnn-resnet101-simam-param0.1")
    assert script_for(["--config", str(root / "configs" / "imagenet" / "resnet50_simam.toml")]) == "main_imagenet.py"


def test_detector_params_and_flops_summary():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("model_summary", Path(main_coco.__file__).parent / "scripts" / "model_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    stats = summary.detector_stats("faster_rcnn", "resnet50")
    # torchvision's documented size of its COCO fasterrcnn_resnet50_fpn (FrozenBatchNorm2d: BN terms are buffers)
    assert stats["params"] == 41_755_286
    parts = stats["flops_parts"]
    assert set(parts) == {"backbone+fpn", "rpn_head", "box_head"} and stats["flops"] == sum(parts.values())
    # box head: two linear layers (12544 -> 1024 -> 1024) and the predictor (1024 -> 91 + 364) per proposal
    assert parts["box_head"] == 1000 * (12544 * 1024 + 1024 * 1024 + 1024 * 91 + 1024 * 364)


def test_train_one_epoch_stops_and_continues_mid_epoch_exactly(coco_tiny):
    """The trainer's mid-epoch resume contract (utils.engine's): stop at a boundary after k steps, then
    loader(epoch, start_batch=k) with start_iter=k and the returned sums gives the uninterrupted
    epoch's weights, lr steps and averages."""
    from conftest import seed
    from utils.detection_engine import train_one_epoch
    ds = CocoDetection(CocoSplit(coco_tiny, "train"), train=True)
    loader = CocoLoader(ds, 2, 0, seed=seed(5))
    lrs = []

    def lr_fn(epoch, it):
        lrs.append(it)
        return 0.002 * (1 + it)

    def fresh():
        torch.manual_seed(seed(0))
        m = create_detector("faster_rcnn", "resnet18", num_classes=4, trainable_layers=0, min_size=48, max_size=64,
                            box_batch_size_per_image=16, rpn_post_nms_top_n_train=50)
        return m, torch.optim.SGD([q for q in m.parameters() if q.requires_grad], 0.01, momentum=0.9)

    cpu = torch.device("cpu")
    model, opt = fresh()
    torch.manual_seed(seed(1))
    whole = train_one_epoch(model, loader(0), None, opt, lr_fn, 0, cpu, print_freq=100)
    assert not whole["interrupted"] and whole["iteration"] == len(loader) == whole["images"] // 2
    want = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt = fresh()
    torch.manual_seed(seed(1))
    lrs.clear()
    first = train_one_epoch(model, loader(0), None, opt, lr_fn, 0, cpu, print_freq=100,
                            boundary=lambda done, get_sums: done == 2)
    assert first["interrupted"] and first["iteration"] == 2 and first["sums"]["images"] == 4
    rest = train_one_epoch(model, loader(0, start_batch=2), None, opt, lr_fn, 0, cpu, print_freq=100,
                           start_iter=2, sums=first["sums"])
    assert not rest["interrupted"] and rest["iteration"] == len(loader) and lrs[-1] == len(loader) - 1
    assert rest["images"] == whole["images"] and rest["loss"] == pytest.approx(whole["loss"], rel=1e-12)
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


@pytest.mark.parametrize("flags, message", [
    (["--pretrained-backbone", "nowhere.pth"], "error: --pretrained-backbone checkpoint not found: nowhere.pth"),
    (["--model-kw", "box_batch_size_per_imag=64"], "error: --model-kw: unknown faster_rcnn option 'box_batch_size_per_imag'"),
    (["--model-kw", "box_score_thresh"], "error: --model-kw expects KEY=VALUE, got 'box_score_thresh'"),
    (["--min-size", "900", "--max-size", "800"], "error: --min-size 900 / --max-size 800: need 1 <= min <= max"),
])
def test_bad_coco_flags_are_one_error_line(flags, message, coco_tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main_coco.main([str(coco_tiny), "-a", "resnet18", "--ckpt", str(tmp_path), "-j", "0", *flags])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith(message), err
