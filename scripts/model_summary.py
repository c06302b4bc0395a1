"""Parameters and FLOPs of every network x attention module, counted the way the paper did.

    python scripts/model_summary.py                          # every ImageNet arch x attention
    python scripts/model_summary.py -a resnet50 --attention_type simam
    python scripts/model_summary.py --dataset cifar --json   # CIFAR nets, 10 and 100 classes, 32x32

FLOPs are multiply-adds for one image (224x224 ImageNet, 32x32 CIFAR) counted with thop under the
convention of thop 0.0.31, the release the paper used (utils/flops.py). The last column is the
attention modules' own element-wise work, which that convention leaves out (docs in README).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from networks import ATTENTION_CHOICES, create_net, model_names  # noqa: E402
from networks.attentions import resolve_param  # noqa: E402
from utils.args import Parser  # noqa: E402
from utils.flops import profile_model  # noqa: E402

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
    args = p.parse_args(argv)

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
        p.error(str(e))
    print(json.dumps(rows, indent=1) if args.json else markdown(rows), end="\n" if args.json else "")


if __name__ == "__main__":
    main()
