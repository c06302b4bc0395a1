"""Train or evaluate Faster / Mask R-CNN + FPN on COCO with an attention backbone (SimAM's COCO table).

    python main_coco.py                                              # the built-in demo set, CPU-sized
    python main_coco.py DATA --config configs/coco/faster_rcnn_resnet50_simam.toml \\
        --pretrained-backbone checkpoints/imagenet-resnet50-simam-param0.1/model_best.pth.tar
    torchrun --nproc_per_node=8 main_coco.py DATA --config ...       # DDP; -b is the total batch
    python main_coco.py DATA --detector mask_rcnn -e --resume checkpoints/coco-mask_rcnn-resnet50/checkpoint.pth.tar

DATA is COCO 2017's layout (annotations/instances_{train,val}2017.json, train2017/, val2017/).
Without DATA the demo set (data/coco_demo/, generated on first use) is used, with small images.
The job around the loop (DDP, checkpoints, resume, metrics) is utils/trainer.py's, as for ImageNet;
the models are networks/detection.py, the data and COCOeval utils/inputs/coco.py, the loop
utils/detection_engine.py. Docs: docs/coco.md.
"""
import functools
import os
from pathlib import Path

from networks import ATTENTION_CHOICES, DETECTORS, create_detector, model_names
from utils import UserError, cli_main
from utils.args import get_args_parser as common_args_parser
from utils.args import check_number, given, parse_args, set_help
from utils.inputs.coco import CocoDetection, CocoLoader, CocoSplit, collate_detection, ensure_coco_demo, metrics_line
from utils.detection_engine import evaluate, load_pretrained_backbone, train_one_epoch
from utils.logger import RunLogger
from utils.trainer import Task, run

ARCHS = tuple(a for a in model_names("imagenet") if a.startswith(("resnet", "resnext")))
# The demo's images are 96-160 px: train them at about that size, briefly, unless told otherwise.
DEMO_DEFAULTS = {"min_size": 96, "max_size": 160, "warmup_iters": 20, "epochs": 4, "batch_size": 8}
# ... with fewer proposals and RoI samples than torchvision's defaults (sized for 800 px COCO images and
# their many objects); the demo's 1-3 shapes per image need no more. --model-kw overrides them.
DEMO_MODEL_KW = {"rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 500, "rpn_pre_nms_top_n_test": 500,
                 "rpn_post_nms_top_n_test": 300, "box_batch_size_per_image": 128}
RECIPE_DEFAULTS = {"min_size": 800, "max_size": 1333, "warmup_iters": 500, "epochs": 12, "batch_size": 16}


def get_args_parser():
    p = common_args_parser("Faster / Mask R-CNN + FPN on COCO (SimAM reproduction)", archs=ARCHS, classifier=False)
    p.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="COCO 2017 root (annotations/, train2017/, val2017/; default: the built-in demo set)")
    p.add_argument("--detector", default="faster_rcnn", choices=tuple(DETECTORS),
                   help="%(choices)s (default: %(default)s)")
    p.add_argument("--min-size", type=int, default=None, dest="min_size", metavar="PX",
                   help=f"shorter image side after resizing (default: {recipe_or_demo('min_size')})")
    p.add_argument("--max-size", type=int, default=None, dest="max_size", metavar="PX",
                   help=f"longer side at most (default: {recipe_or_demo('max_size')})")
    p.add_argument("--pretrained-backbone", default=None, metavar="CKPT", dest="pretrained_backbone",
                   help="ImageNet checkpoint (ours, --save_weights, or the reference's) for the backbone; "
                        "\"\": none (default: none; each config of configs/coco/ names its ImageNet run)")
    p.add_argument("--lr-base-batch", type=int, default=16, dest="lr_base_batch", metavar="N",
                   help="--lr is for this many images per step; the run uses lr * b / this (default: %(default)s)")
    p.add_argument("--milestones", type=int, nargs="+", default=[8, 11], metavar="E",
                   help="lr x gamma after these epochs (default: %(default)s, the 1x schedule)")
    p.add_argument("--gamma", type=float, default=0.1, metavar="G",
                   help="lr factor at each milestone (default: %(default)s)")
    p.add_argument("--warmup-iters", type=int, default=None, dest="warmup_iters", metavar="N",
                   help=f"linear warm-up iterations (default: {recipe_or_demo('warmup_iters')})")
    p.add_argument("--warmup-ratio", type=float, default=0.001, dest="warmup_ratio", metavar="R",
                   help="warm-up starts at lr x this (default: %(default)s)")
    p.add_argument("--trainable-layers", type=int, default=3, choices=range(6), dest="trainable_layers",
                   metavar="{0..5}",
                   help="backbone stages trained, from layer4 down (default: %(default)s, stem + layer1 frozen)")
    p.add_argument("--model-kw", nargs="+", default=[], metavar="KEY=VALUE", dest="model_kw",
                   help="more torchvision detector options, e.g. box_batch_size_per_image=256 "
                        "rpn_post_nms_top_n_test=500 (numbers or true/false; default: torchvision's; "
                        "demo set: fewer proposals, main_coco.DEMO_MODEL_KW)")
    # epochs 12 and -b 16 (the 1x recipe), or 4 and 8 on the demo set: resolve_defaults
    p.set_defaults(arch="resnet50", epochs=None, batch_size=None, lr=0.02, weight_decay=1e-4, momentum=0.9,
                   print_freq=20, workers=4)
    set_help(p, epochs=f"total epochs (default: {recipe_or_demo('epochs')})",
             batch_size=f"total images per step over all processes (default: {recipe_or_demo('batch_size')})",
             lr="learning rate for --lr-base-batch images per step (default: %(default)s)")
    return p


def recipe_or_demo(key):
    """A default that resolve_defaults picks: the 1x recipe's, or the demo set's without DATA."""
    return f"{RECIPE_DEFAULTS[key]}; demo set: {DEMO_DEFAULTS[key]}"


def model_kw(items):
    """KEY=VALUE strings -> {key: int | float | bool}; the detector's constructor checks the names."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--model-kw expects KEY=VALUE, got {item!r}")
        if text.lower() in ("true", "false"):
            out[key] = text.lower() == "true"
            continue
        try:
            out[key] = int(text)
        except ValueError:
            try:
                out[key] = float(text)
            except ValueError:
                raise UserError(f"--model-kw {item!r}: the value must be a number or true/false") from None
    return out


def resolve_defaults(args):
    defaults = DEMO_DEFAULTS if args.data is None else RECIPE_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.min_size < 1 or args.max_size < args.min_size:
        raise UserError(f"--min-size {args.min_size} / --max-size {args.max_size}: need 1 <= min <= max")
    check_number("--lr-base-batch", args.lr_base_batch, 1)
    check_number("--warmup-iters", args.warmup_iters, 0)
    check_number("--warmup-ratio", args.warmup_ratio, 0, 1)
    check_number("--gamma", args.gamma, 0, low_open=True)  # 0 would stop training at the first milestone
    for m in args.milestones:
        check_number("--milestones", m, 0)
    args.model_kw = model_kw(args.model_kw) if isinstance(args.model_kw, list) else dict(args.model_kw)
    if args.data is None:
        args.model_kw = {**DEMO_MODEL_KW, **args.model_kw}
    return args


def data_root(args):
    if args.data is None:
        args.data = str(ensure_coco_demo())
    return args.data


@functools.cache
def split(root, name):  # parsed once: classes() checks the files, datasets() reuses them
    return CocoSplit(root, name)


def classes(args):
    val = split(data_root(args), "val")
    if not args.evaluate:
        train = split(args.data, "train")
        if train.categories != val.categories:
            raise UserError(f"train and val annotation files list different categories in {args.data}")
    return val.class_names()


def datasets(args, train=True):
    masks = args.detector == "mask_rcnn"
    log = RunLogger(enabled=int(os.environ.get("RANK", 0)) == 0)
    val = CocoDetection(split(args.data, "val"), train=False)
    sets = [CocoDetection(split(args.data, "train"), train=True, with_masks=masks)] if train else []
    for ds in sets + [val]:
        what = f"{ds.split.ann_file.name}: {len(ds)} images"
        if ds.split.degenerate:
            what += f"; skipped {ds.split.degenerate} degenerate boxes"
        if ds.train and ds.without_boxes:
            what += f"; left out {ds.without_boxes} images without boxes"
        log.info(what)
    return (sets[0] if train else None), val


def model(args, num_classes):
    try:
        net = create_detector(args.detector, args.arch, args.attention_type, args.attention_param,
                              num_classes=num_classes, min_size=args.min_size, max_size=args.max_size,
                              trainable_layers=args.trainable_layers, **args.model_kw)
    except (TypeError, ValueError) as e:  # an unknown --model-kw name or a bad value
        raise UserError(f"--model-kw: {e}") from None
    if args.pretrained_backbone and not args.resume:
        load_pretrained_backbone(net, args.pretrained_backbone, RunLogger(enabled=int(os.environ.get("RANK", 0)) == 0))
    return net


def step_lr(epoch, it, iters_per_epoch, base_lr, milestones, gamma=0.1, warmup_iters=500, warmup_ratio=0.001):
    """mmdetection's step schedule with linear warm-up: a pure function of (epoch, iteration)."""
    lr = base_lr * gamma ** sum(epoch >= m for m in milestones)
    done = epoch * iters_per_epoch + it
    if done < warmup_iters:
        lr *= 1 - (1 - warmup_ratio) * (1 - done / warmup_iters)
    return lr


def schedule(args, iters_per_epoch):
    base = args.lr * args.batch_size / args.lr_base_batch
    return functools.partial(step_lr, iters_per_epoch=iters_per_epoch, base_lr=base, milestones=args.milestones,
                             gamma=args.gamma, warmup_iters=args.warmup_iters, warmup_ratio=args.warmup_ratio)


def val_row(va):
    return {**{k: v for k, v in va.items() if k.startswith(("bbox_", "segm_"))}, "val_detections": va["detections"]}


def summary(va):
    return " ".join(f"{t} AP {va[f'{t}_AP']:.3f}" for t in ("bbox", "segm") if f"{t}_AP" in va)


def eval_line(va, checkpoint):
    return " * " + " | ".join(metrics_line(t, va) for t in ("bbox", "segm") if f"{t}_AP" in va) + \
        f" ({va['count']} images, {va['detections']} detections, {checkpoint})"


def profile(model, args):
    from utils.reporting.flops import profile_detector
    size = (args.min_size, args.max_size)
    return {**profile_detector(model, size), "where": f"({args.detector}, one {size[0]}x{size[1]} image, "
                                                      "1000 proposals; RoIAlign and NMS not counted)"}


def make_task(args):
    return Task(name=f"coco-{args.detector}", archs=ARCHS, attentions=ATTENTION_CHOICES, classes=classes,
                datasets=datasets, model=model, collate_fn=collate_detection, image_size=args.min_size,
                loader=CocoLoader, schedule=schedule, train_one_epoch=train_one_epoch, evaluate=evaluate,
                val_row=val_row, summary=summary, eval_line=eval_line, best_key="bbox_AP", best_label="bbox AP",
                profile=functools.partial(profile, args=args))


IMAGENET_CLASSES = 1000  # what a config's default backbone (one of our ImageNet runs) must classify


def check_config_backbone(args):
    """A config's default backbone (configs/coco/*.toml: our ImageNet run of the same arch and attention)
    is used only when it is what the config means: a finished run of that arch, attention and parameter,
    on ImageNet's 1000 classes. Anything else (a demo run, a run still training, another model) is one line."""
    from utils.lifecycle import runfolder
    from utils.lifecycle.checkpoint import model_state
    from utils.trainer import effective_param, num_classes_of
    path = Path(args.pretrained_backbone)
    found = []
    ck = runfolder.peek(path) if path.is_file() else None
    if not path.is_file():
        found.append("not there")
    elif ck is None:
        found.append("not a checkpoint")
    else:
        want = {"arch": args.arch, "attention_type": args.attention_type, "attention_param": effective_param(args)}
        for key, value in want.items():
            have = ck.get(key)
            if have != value and not (key == "attention_param" and have is not None and value is not None
                                      and float(have) == float(value)):
                found.append(f"{key}={have!r} (the config has {value!r})")
        try:
            n = num_classes_of(model_state(ck))
        except UserError:
            n = None
        if n != IMAGENET_CLASSES:
            found.append(f"a {n}-class model (ImageNet's has {IMAGENET_CLASSES})")
        own = runfolder.peek(path.parent / runfolder.CHECKPOINT) if (path.parent / runfolder.CHECKPOINT).is_file() else None
        epochs = (own.get("args") or {}).get("epochs") if own else None
        if own is None or epochs is None:
            found.append(f"not in a run folder with its {runfolder.CHECKPOINT}")
        elif runfolder.progress(own) < (epochs, 0):
            found.append(f"from an unfinished run (at {runfolder.describe(runfolder.progress(own), epochs)})")
    if found:
        att = "" if args.attention_type == "none" else f" + {args.attention_type}"
        raise UserError(f"the config's ImageNet backbone {path} is {'; '.join(found)}: pass --pretrained-backbone "
                        f"PATH (a finished ImageNet {args.arch}{att} checkpoint), or --pretrained-backbone '' "
                        f"to train from scratch")


def main(argv=None):
    def go():
        args = resolve_defaults(parse_args(get_args_parser(), argv))
        if args.pretrained_backbone and not args.resume:
            if "pretrained_backbone" not in given(args):  # the config's default: only when it is what it means
                check_config_backbone(args)
            elif not os.path.isfile(args.pretrained_backbone):
                raise UserError(f"--pretrained-backbone checkpoint not found: {args.pretrained_backbone}")
        return run(args, make_task(args))
    return cli_main(go)


if __name__ == "__main__":
    main()
