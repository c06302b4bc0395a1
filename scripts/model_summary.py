"""Parameters and FLOPs of every network x attention module, counted the way the paper did.

    python scripts/model_summary.py                          # every ImageNet arch x attention
    python scripts/model_summary.py -a resnet50 --attention_type simam
    python scripts/model_summary.py --dataset cifar --json   # CIFAR nets, 10 and 100 classes, 32x32
    python scripts/model_summary.py --detector mask_rcnn -a resnet50 --attention_type simam   # COCO, 800x1333

Detectors (--detector): params of the whole model (91 classes, as torchvision's COCO models) and
FLOPs at 800x1333 in the same convention, counted part by part on shapes only: backbone + FPN, RPN
head on every pyramid level, box head for 1000 proposals, mask head for 100 detections (Mask R-CNN),
i.e. what mmdetection's get_flops counts; RoIAlign, anchors and NMS are not counted (thop has no rule
for them). The paper gives no detector FLOPs to compare with.

FLOPs are multiply-adds for one image (224x224 ImageNet, 32x32 CIFAR) counted with thop under the
convention of thop 0.0.31, the release the paper used (utils/reporting/flops.py). The last column is the
attention modules' own element-wise work, which that convention leaves out (docs/networks-and-modules.md).
"""
import json
import sys

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from networks import ATTENTION_CHOICES, create_net, model_names  # noqa: E402
from networks.attentions import resolve_param  # noqa: E402
from utils.args import Parser  # noqa: E402
from utils.reporting.flops import profile_model  # noqa: E402

DATASETS = {"imagenet": dict(image_size=224, num_classes=(1000,)),
            "cifar": dict(image_size=32, num_classes=(10, 100))}


def summary_rows(dataset="imagenet", archs=None, attentions=None, attention_param=None):
    spec = DATASETS[dataset]
    rows = []
    for arch in archs or model_names(dataset):
        for attn in attentions or ATTENTION_CHOICES:
            for classes in spec["num_classes"]:
                model = create_net(arch, attn, attention_param, num_classes=classes)
                stats = profile_model(model, spec["image_size"])
                row = dict(arch=arch, attention_type=attn, attention_param=resolve_param(attn, attention_param))
                if dataset != "imagenet":
                    row["num_classes"] = classes
                rows.append({**row, **stats})
    return rows


def detector_stats(kind, arch, attention_type="none", attention_param=None, num_classes=91, size=(800, 1333)):
    """dict(params, flops, flops_parts) of a detector (utils.reporting.flops.profile_detector)."""
    from networks import create_detector
    from utils.reporting.flops import profile_detector
    return profile_detector(create_detector(kind, arch, attention_type, attention_param, num_classes=num_classes),
                            size)


def detector_markdown(rows):
    head = ["detector", "arch", "attention", "params (M)", "FLOPs (G) at 800x1333"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['detector']} | {r['arch']} | {r['attention_type']} | {r['params'] / 1e6:.2f} | "
                     f"{r['flops'] / 1e9:.2f} |")
    return "\n".join(lines) + "\n"


def markdown(rows):
    cifar = "num_classes" in rows[0]
    head = ["arch", "attention"] + (["classes"] if cifar else []) + ["params (M)", "FLOPs (G)", "attn elementwise (M)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["arch"], r["attention_type"]] + ([str(r["num_classes"])] if cifar else [])
        digits = 4 if cifar else 2
        cells += [f"{r['params'] / 1e6:.{3 if cifar else 2}f}", f"{r['flops'] / 1e9:.{digits}f}",
                  f"{r['attention_elementwise'] / 1e6:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), default="imagenet")
    p.add_argument("-a", "--arch", default=None, help="only this arch")
    p.add_argument("--attention_type", default=None, help="only this attention: " + ", ".join(ATTENTION_CHOICES))
    p.add_argument("--attention_param", type=float, default=None,
                   help="SE/CBAM/GC/CoordAtt reduction, SimAM lambda or ECA kernel size (default: each module's own)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    p.add_argument("--detector", choices=("faster_rcnn", "mask_rcnn"), default=None,
                   help="count this COCO detector over the arch (default arch: resnet50, attention: none, simam)")
    args = p.parse_args(argv)
    if args.detector:
        if args.arch is not None and not args.arch.startswith(("resnet", "resnext")):
            p.error(f"--detector needs a ResNet/ResNeXt arch, not {args.arch!r}")
        if args.attention_type is not None and args.attention_type not in ATTENTION_CHOICES:
            p.error(f"unknown attention type {args.attention_type!r}; choose one of: {', '.join(ATTENTION_CHOICES)}")
        try:  # a parameter the module cannot take, before any detector is built
            for attn in [args.attention_type] if args.attention_type else ["none", "simam"]:
                resolve_param(attn, args.attention_param)
        except ValueError as e:
            p.error(f"--attention_param: {e}")
        rows = [dict(detector=args.detector, arch=arch, attention_type=attn,
                     attention_param=resolve_param(attn, args.attention_param),
                     **detector_stats(args.detector, arch, attn, args.attention_param))
                for arch in [args.arch or "resnet50"] for attn in ([args.attention_type] if args.attention_type
                                                                    else ["none", "simam"])]
        print(json.dumps(rows, indent=1) if args.json else detector_markdown(rows), end="\n" if args.json else "")
        return

    archs = model_names(args.dataset)
    if args.arch is not None and args.arch not in archs:
        p.error(f"unknown {args.dataset} arch {args.arch!r}; choose one of: {', '.join(archs)}")
    if args.attention_type is not None and args.attention_type not in ATTENTION_CHOICES:
        p.error(f"unknown attention type {args.attention_type!r}; choose one of: {', '.join(ATTENTION_CHOICES)}")
    attentions = [args.attention_type] if args.attention_type else None
    if args.attention_param is not None and attentions is None:  # one value means one module's parameter
        p.error("--attention_param needs --attention_type")
    try:
        rows = summary_rows(args.dataset, [args.arch] if args.arch else None, attentions, args.attention_param)
    except ValueError as e:  # a parameter the module cannot take
        p.error(f"--attention_param: {e}")
    print(json.dumps(rows, indent=1) if args.json else markdown(rows), end="\n" if args.json else "")


if __name__ == "__main__":
    main()
