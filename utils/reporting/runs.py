"""Results of runs: reading run folders, the paper's numbers, and the comparison table.

Shared by scripts/make_table.py, scripts/eval_checkpoints.py, scripts/plot_curves.py and
scripts/launch_plan.py (what the shell launchers do with a config).
"""
import csv
import io
import json
import math
import sys
from pathlib import Path

from .. import UserError

# The paper's ImageNet figures: (top-1, top-5 or None, source key). Source: ../shared/paper/simam.md,
# which copies the reference README's table, the reference's own logs and torchvision's V1 weights.
PAPER = {
    ("resnet18", "simam"): (71.31, 89.88, "paper"),
    ("resnet34", "simam"): (74.49, 92.02, "paper"),
    ("resnet50", "simam"): (77.45, 93.66, "paper"),
    ("resnet101", "simam"): (78.65, 94.11, "paper"),
    ("resnext50_32x4d", "simam"): (78.00, 93.93, "paper"),
    ("mobilenet_v2", "simam"): (72.36, 90.74, "paper"),
    ("resnext50_32x4d", "none"): (77.466, 93.524, "log"),
    ("resnet18", "none"): (69.758, None, "torchvision"),
    ("resnet50", "none"): (76.130, None, "torchvision"),
    ("resnet101", "none"): (77.374, None, "torchvision"),
    ("mobilenet_v2", "none"): (71.878, None, "torchvision"),
}
SOURCES = {
    "paper": "the paper's ImageNet table (reference README)",
    "log": "the reference's own training logs (ImageNet ResNeXt-50 32x4d without attention; CIFAR-100 ResNet-20 + SimAM)",
    "torchvision": "torchvision V1 weights (~90-epoch step recipe), not the paper's own run",
}
MARKS = {"paper": "", "log": " †", "torchvision": " *"}
PAPER_PARAM = {"simam": 0.1}  # the paper's SimAM rows used lambda 0.1: other lambdas are not compared
# CIFAR: the reference's one log (CIFAR-100 ResNet-20 + SimAM, lambda 1e-4, seed 0), keyed with its lambda.
PAPER_CIFAR = {("cifar100", "resnet20", "simam", 1e-4): (69.83, None, "log")}
IMAGE_SIZE = {"imagenet": 224, "cifar10": 32, "cifar100": 32}

ARCH_ORDER = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "mobilenet_v2")
ARCH_LABEL = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50", "resnet101": "ResNet-101",
              "resnet152": "ResNet-152", "resnext50_32x4d": "ResNeXt-50 (32x4d)", "mobilenet_v2": "MobileNetV2"}
ATT_ORDER = ("none", "se", "cbam", "simam", "eca", "gc", "srm", "coordatt", "triplet")
ATT_LABEL = {"none": "none", "se": "SE", "cbam": "CBAM", "simam": "SimAM", "eca": "ECA", "gc": "GC", "srm": "SRM",
             "coordatt": "CoordAtt", "triplet": "Triplet"}
PARAM_SYMBOL = {"simam": "λ", "eca": "k"}  # the others' parameter is a reduction r
PARAM_NONE = {"eca": "k=adaptive"}  # what a None parameter means; SRM and Triplet have none: no brackets


def effective_param(attention_type, attention_param):
    """The module's parameter as the trainer resolves it (its default when not given)."""
    from networks.attentions import resolve_param
    return resolve_param(attention_type, attention_param)


def attention_label(attention_type, param):
    """e.g. "SimAM (λ=0.1)", "SE (r=16)", "ECA (k=adaptive)", "SRM"."""
    if attention_type == "none":
        return "none"
    label = ATT_LABEL.get(attention_type, attention_type)
    if param is None:
        return f"{label} ({PARAM_NONE[attention_type]})" if attention_type in PARAM_NONE else label
    return f"{label} ({PARAM_SYMBOL.get(attention_type, 'r')}={param:g})"


# ---------------------------------------------------------------- run folders

def find_runs(paths):
    """Run folders (holding metrics.jsonl) among `paths`; a folder of run folders gives all of them.
    Each run once, however often it is named (a folder given twice, a run and its parent folder):
    a run counted twice would pass for two seeds."""
    runs = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            runs.append(p)
        elif p.is_dir():
            found = sorted(d for d in p.iterdir() if (d / "metrics.jsonl").is_file())
            if not found:
                raise UserError(f"no run folder (with metrics.jsonl) at or under {p}")
            runs += found
        else:
            raise UserError(f"run folder not found: {p}")
    seen, unique = set(), []
    for r in runs:
        if r.resolve() not in seen:
            seen.add(r.resolve())
            unique.append(r)
    return unique


def read_each(runs, read, warn=None):
    """[read(run) for run in runs], leaving out (in one line each to `warn`, default stderr) a run whose
    files cannot be read, e.g. an args.json torn by a crash mid-write; UserError when none is left."""
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    out = []
    for run in runs:
        try:
            out.append(read(run))
        except UserError as e:
            warn(f"warning: skipped {run}: {e}")
    if runs and not out:
        raise UserError(f"none of the {len(runs)} run folders could be read (see the warnings above)")
    return out


def read_args(run):
    """<run>/args.json as a dict; UserError naming the file when it is missing, torn or not JSON."""
    path = Path(run) / "args.json"
    if not path.is_file():
        raise UserError(f"{run} has no args.json (the settings the trainer records)")
    try:
        args = json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise UserError(f"{path} is torn or not JSON (not valid JSON{where}: a crash mid-write?)") from None
    if not isinstance(args, dict) or "arch" not in args:
        raise UserError(f"{path} is not the trainer's settings (no 'arch' key)")
    return args


def read_metrics(run):
    """The rows of <run>/metrics.jsonl, one per epoch; a half-written last line (a crash) is ignored."""
    from ..lifecycle.runfolder import METRICS, read_rows
    return read_rows(Path(run) / METRICS)


def best_key(rows):
    """The metrics.jsonl key that picks a run's best epoch: val_acc1, or bbox_AP for detection."""
    return "bbox_AP" if rows and "bbox_AP" in rows[0] else "val_acc1"


def read_run(run):
    """{run, args, rows, best}: the recorded settings, the epochs, and the best epoch's row (top-1;
    box AP for COCO runs)."""
    run = Path(run)
    args = read_args(run)
    rows = read_metrics(run)
    # The reference keeps the best top-1 epoch (model_best); its top-5 is that epoch's top-5.
    key = best_key(rows)
    best = max(rows, key=lambda r: r.get(key, -math.inf)) if rows else None
    return {"run": run, "args": args, "rows": rows, "best": best}


# ---------------------------------------------------------------- the table

_STATS = {}


def model_stats(arch, attention_type, attention_param, num_classes=1000, image_size=224):
    """Params and FLOPs in the paper's convention (utils.reporting.flops), cached per model."""
    key = (arch, attention_type, attention_param, num_classes, image_size)
    if key not in _STATS:
        from networks import create_net
        from utils.reporting.flops import profile_model
        model = create_net(arch, attention_type, attention_param, num_classes=num_classes)
        _STATS[key] = profile_model(model, image_size=image_size)
    return _STATS[key]


def paper_figures(dataset, arch, attention_type, param, num_classes=1000):
    """(top-1, top-5, source) the paper or the reference reports for this setting, or Nones."""
    if dataset != "imagenet":
        return PAPER_CIFAR.get((dataset, arch, attention_type, param), (None, None, None))
    if num_classes != 1000:  # not ImageNet-1k (e.g. the demo data): nothing of the paper's to compare with
        return None, None, None
    if attention_type in PAPER_PARAM and param != PAPER_PARAM[attention_type]:
        return None, None, None
    return PAPER.get((arch, attention_type), (None, None, None))


def table_row(arch, attention_type, attention_param, top1, top5, epochs, source, num_classes=1000,
              dataset="imagenet", seed=None):
    """One row of the comparison; attention_param None means the module's default."""
    param = effective_param(attention_type, attention_param)
    stats = model_stats(arch, attention_type, param, num_classes, IMAGE_SIZE.get(dataset, 224))
    paper_top1, paper_top5, paper_src = paper_figures(dataset, arch, attention_type, param, num_classes)
    diff = lambda ours, ref: None if ours is None or ref is None else ours - ref  # noqa: E731
    return {"dataset": dataset, "arch": arch, "attention": attention_type, "param": param, "classes": num_classes,
            "params": stats["params"], "flops": stats["flops"], "epochs": epochs, "seeds": 1, "seed": seed,
            "top1": top1, "top5": top5, "top1_std": None, "top5_std": None,
            "paper_top1": paper_top1, "paper_top5": paper_top5,
            "diff_top1": diff(top1, paper_top1), "diff_top5": diff(top5, paper_top5),
            "paper_source": paper_src, "source": str(source)}


def recipe_of(args):
    """A run's recipe (utils.recipe: every training setting but those in its readable name) from its
    args.json: runs of one recipe only are seeds of one row."""
    from ..recipe import NAMED, recipe
    return {k: v for k, v in recipe(args).items() if k not in NAMED and k not in RECORD_ONLY}


# args.json keys that the trainer adds to the flags (not settings of the run).
RECORD_ONLY = frozenset({"seed_used", "world_size", "classes", "class_names", "data_realpath", "recipe_defaults"})


def run_row(run):
    """The table row of a run folder (best epoch so far). `seed` is the seed given (--seed), None for a
    run that drew its own: a drawn seed is no seed to show."""
    r = read_run(run)
    a, best = r["args"], r["best"]
    done = f"{len(r['rows'])}/{a.get('epochs', '?')}"
    dataset = a.get("dataset", "imagenet")
    classes = a.get("classes") or {"cifar10": 10, "cifar100": 100}.get(dataset, 1000)
    row = table_row(a["arch"], a.get("attention_type", "none"), a.get("attention_param"),
                    best["val_acc1"] if best else None, best["val_acc5"] if best else None,
                    done, r["run"], int(classes), dataset, a.get("seed"))
    row["recipe_settings"] = recipe_of(a)
    return row


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5  # sample std (ddof 1)


def _recipe_key(r):
    from ..recipe import canonical
    return canonical(r.get("recipe_settings") or {})


def differing_settings(recipes):
    """For recipes (dicts), each one's settings where they differ, e.g. ["lr=0.1", "lr=0.01"]."""
    from ..recipe import canonical
    keys = sorted({k for rec in recipes for k in rec if len({canonical(other.get(k)) for other in recipes}) > 1})
    return [" ".join(f"{k}={json.dumps(rec.get(k), default=str)}" for k in keys) for rec in recipes]


def name_settings(rows):
    """Each row's "settings": the recipe settings in which runs of its model (dataset, arch, classes)
    differ, e.g. "lr=0.01 epochs=2"; "" where all runs of the model share one recipe."""
    models = {}
    for r in rows:
        models.setdefault((r["dataset"], r["arch"], r["classes"]), []).append(r)
    for group in models.values():
        for r, settings in zip(group, differing_settings([r.get("recipe_settings") or {} for r in group])):
            r["settings"] = settings
    return rows


def aggregate_seeds(rows):
    """One row per setting: runs of one recipe that differ only in their seed become mean +- sample std
    over seeds. Runs of other recipes (another lr, another number of epochs, ...) are other rows, named
    by the settings in which they differ (name_settings)."""
    groups = {}
    for r in rows:
        key = (r["dataset"], r["arch"], r["attention"], r["param"], r["classes"], r.get("recipe"), _recipe_key(r))
        groups.setdefault(key, []).append(r)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        row = dict(group[0], seeds=len(group), seed=None)
        row["top1"], row["top1_std"] = _mean_std([r["top1"] for r in group])
        row["top5"], row["top5_std"] = _mean_std([r["top5"] for r in group])
        for k in ("ema_top1", "ema_top5"):  # modern-recipe rows
            if k in row:
                row[k], row[f"{k}_std"] = _mean_std([r[k] for r in group])
        for k in ("top1", "top5"):
            ref = row.get(f"paper_{k}")
            if f"diff_{k}" in row:
                row[f"diff_{k}"] = None if row[k] is None or ref is None else row[k] - ref
        epochs = sorted({str(r["epochs"]) for r in group})
        row["epochs"] = epochs[0] if len(epochs) == 1 else ",".join(epochs)
        row["source"] = " ".join(sorted(str(r["source"]) for r in group))
        out.append(row)
    return name_settings(out)


def sort_rows(rows):
    rank = lambda v, order: order.index(v) if v in order else len(order)  # noqa: E731
    return sorted(rows, key=lambda r: (r["dataset"], rank(r["arch"], ARCH_ORDER), rank(r["attention"], ATT_ORDER),
                                       r["param"] or 0, r["source"]))


def _num(v, fmt):
    return "–" if v is None else format(v, fmt)


def _short(source):
    names = []
    for part in str(source).split(" "):
        p = Path(part)
        names.append(f"{p.parent.name}/{p.name}" if p.name.endswith(".pth.tar") else p.name)
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1})"


def _acc(mean, std, fmt=".2f"):
    return _num(mean, fmt) if std is None else f"{mean:{fmt}} ± {std:{fmt}}"


DATASET_LABEL = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _model_label(r):
    label = ARCH_LABEL.get(r["arch"], r["arch"])
    return label if r["dataset"] == "imagenet" else f"{label} ({DATASET_LABEL.get(r['dataset'], r['dataset'])})"


def _seeds(r):
    """A row's Seeds cell: the number of runs; a single run's seed when it was given (--seed)."""
    return str(r["seeds"] if r["seeds"] > 1 else (r["seed"] if r["seed"] is not None else 1))


def _with_settings(head, rows, cells_of):
    """The table's lines; a Settings column after Attention when runs of a model differ in their recipe."""
    shown = any(r.get("settings") for r in rows)
    if shown:
        head = head[:2] + ["Settings"] + head[2:]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = cells_of(r)
        if shown:
            cells = cells[:2] + [r.get("settings") or "–"] + cells[2:]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_table(rows):
    head = ["Model", "Attention", "Params", "FLOPs", "Epochs", "Seeds", "Top-1", "Top-5",
            "Paper Top-1", "Paper Top-5", "Δ Top-1", "Δ Top-5", "Run"]
    def cells(r):
        mark = MARKS.get(r["paper_source"], "")
        small = r["dataset"] != "imagenet"  # CIFAR nets: 0.278 M / 0.0412 G need more digits
        return [_model_label(r), attention_label(r["attention"], r["param"]),
                f"{r['params'] / 1e6:.{3 if small else 2}f} M", f"{r['flops'] / 1e9:.{4 if small else 2}f} G",
                str(r["epochs"]), _seeds(r),
                _acc(r["top1"], r["top1_std"]), _acc(r["top5"], r["top5_std"]),
                _num(r["paper_top1"], ".2f") + (mark if r["paper_top1"] is not None else ""),
                _num(r["paper_top5"], ".2f"), _num(r["diff_top1"], "+.2f"), _num(r["diff_top5"], "+.2f"),
                _short(r["source"])]
    lines = _with_settings(head, rows, cells)
    notes = [f"Paper columns: {SOURCES['paper']}"]
    used = {r["paper_source"] for r in rows}
    notes += [f"{MARKS[s].strip()} {SOURCES[s]}" for s in ("log", "torchvision") if s in used]
    notes.append("Params/FLOPs: the paper's thop convention (multiply-adds at 224x224 for ImageNet, 32x32 for CIFAR), "
                 "for each model as trained (its number of classes).")
    if any(r["seeds"] > 1 for r in rows):
        notes.append("Rows over several seeds show mean ± sample std; Seeds is their count (a single run shows its "
                     "seed when one was given).")
    if any(r.get("settings") for r in rows):
        notes.append("Settings: the recipe settings in which runs of a model differ; each row is one recipe.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


CSV_FIELDS = ["dataset", "arch", "attention", "param", "classes", "params", "flops", "epochs", "seeds",
              "top1", "top1_std", "top5", "top5_std",
              "paper_top1", "paper_top5", "diff_top1", "diff_top5", "paper_source", "source", "settings"]


def csv_table(rows, fields=CSV_FIELDS):
    """CSV text of `rows` (dicts) in the order of `fields`; None is an empty cell."""
    out = io.StringIO()
    w = csv.DictWriter(out, fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
    return out.getvalue()


# ---------------------------------------------------------------- modern-recipe runs (issue 18's flags)

# The recipe flags' "off" values (utils.args.add_recipe_args): a run with any other value is a modern-recipe
# run, shown in its own table (the paper's numbers are for the paper's recipe: no paper column there).
RECIPE_OFF = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "auto_augment": None, "random_erase": 0.0, "ra_reps": 1,
              "model_ema": False, "norm_weight_decay": None, "bias_weight_decay": None, "clip_grad_norm": None,
              "grad_accum_steps": 1, "lr_warmup_decay": None, "lr_warmup_method": "linear", "lr_scheduler": None,
              "sync_bn": False}


def recipe_name(args):
    """None for the paper's recipe; "tv2" for configs/imagenet/tv2/ runs; else "modern"."""
    if all(args.get(k, off) == off for k, off in RECIPE_OFF.items()):
        return None
    return "tv2" if "/tv2/" in str(args.get("config") or "").replace("\\", "/") else "modern"


def recipe_row(run):
    """A modern-recipe run's row: the model's best epoch (top-1, its top-5) and, for EMA runs, the EMA's
    best epoch (val_ema_acc1, its val_ema_acc5)."""
    r = read_run(run)
    row = run_row(run)
    for k in [k for k in row if k.startswith(("paper_", "diff_"))]:
        del row[k]
    rows = [x for x in r["rows"] if "val_ema_acc1" in x]
    ema = max(rows, key=lambda x: x["val_ema_acc1"]) if rows else None
    row.update(recipe=recipe_name(r["args"]), ema_top1=ema["val_ema_acc1"] if ema else None,
               ema_top5=ema["val_ema_acc5"] if ema else None, ema_top1_std=None, ema_top5_std=None)
    return row


def recipe_markdown_table(rows):
    head = ["Model", "Attention", "Recipe", "Params", "FLOPs", "Epochs", "Seeds", "Top-1", "Top-5",
            "EMA Top-1", "EMA Top-5", "Run"]
    def cells(r):
        small = r["dataset"] != "imagenet"
        return [_model_label(r), attention_label(r["attention"], r["param"]), r["recipe"],
                f"{r['params'] / 1e6:.{3 if small else 2}f} M", f"{r['flops'] / 1e9:.{4 if small else 2}f} G",
                str(r["epochs"]), _seeds(r),
                _acc(r["top1"], r["top1_std"]), _acc(r["top5"], r["top5_std"]),
                _acc(r["ema_top1"], r["ema_top1_std"]), _acc(r["ema_top5"], r["ema_top5_std"]),
                _short(r["source"])]
    lines = _with_settings(head, rows, cells)
    notes = ["Modern-recipe runs (docs/recipes.md): tv2 = configs/imagenet/tv2/ (torchvision's ResNet-50 recipe; its "
             "plain ResNet-50: 80.858 top-1), modern = other recipe flags. The paper's figures are for its own recipe: "
             "no paper column.",
             "Top-1/Top-5: the model's best epoch; EMA: the weights' moving average's best epoch "
             "(– without --model-ema)."]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


RECIPE_CSV_FIELDS = ["dataset", "arch", "attention", "param", "recipe", "classes", "params", "flops", "epochs",
                     "seeds", "top1", "top1_std", "top5", "top5_std", "ema_top1", "ema_top1_std", "ema_top5",
                     "ema_top5_std", "source", "settings"]


# ---------------------------------------------------------------- COCO runs (main_coco.py)

# The paper's COCO table (../shared/paper/simam.md): (AP, AP50, AP75, APs, APm, APl) box, then mask.
PAPER_COCO = {
    ("faster_rcnn", "resnet50", "simam"): ((39.2, 60.7, 40.8, 22.8, 43.0, 50.6), None, "paper"),
    ("faster_rcnn", "resnet101", "simam"): ((41.2, 62.4, 45.0, 24.0, 45.6, 52.8), None, "paper"),
    ("mask_rcnn", "resnet50", "simam"): ((39.8, 61.0, 43.4, 23.1, 43.7, 51.4),
                                         (36.0, 57.9, 38.2, 19.1, 39.7, 48.6), "paper"),
    ("mask_rcnn", "resnet101", "simam"): ((41.8, 62.8, 46.0, 24.8, 46.2, 53.9),
                                          (37.6, 59.5, 40.1, 20.5, 41.5, 50.8), "paper"),
    # The paper has no plain-backbone rows; mmdetection's own 1x figures (AP only) stand in.
    ("faster_rcnn", "resnet50", "none"): ((37.4,), None, "mmdetection"),
    ("faster_rcnn", "resnet101", "none"): ((39.4,), None, "mmdetection"),
    ("mask_rcnn", "resnet50", "none"): ((38.2,), (34.7,), "mmdetection"),
    ("mask_rcnn", "resnet101", "none"): ((40.0,), (36.1,), "mmdetection"),
}
COCO_SOURCES = {"paper": "the paper's COCO table (mmdetection 1x, SimAM lambda 0.1)",
                "mmdetection": "mmdetection's published 1x baselines (pytorch-style ResNet), not the paper's runs"}
DETECTOR_LABEL = {"faster_rcnn": "Faster R-CNN", "mask_rcnn": "Mask R-CNN"}
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def is_coco_run(run):
    return (Path(run) / "args.json").is_file() and "detector" in read_args(run)


def coco_run_row(run):
    """A COCO run's row: its last epoch's COCOeval figures (a 1x schedule reports its final model)."""
    run = Path(run)
    a = read_args(run)
    rows = read_metrics(run)
    last = rows[-1] if rows else {}
    param = effective_param(a.get("attention_type", "none"), a.get("attention_param"))
    box, mask, src = PAPER_COCO.get((a["detector"], a["arch"], a.get("attention_type", "none")), (None, None, None))
    if a.get("attention_type") in PAPER_PARAM and param != PAPER_PARAM[a["attention_type"]]:
        box = mask = src = None
    classes = int(a.get("classes", 91))
    if classes != 91:  # not COCO (e.g. the demo set): nothing of the paper's to compare with
        box = mask = src = None
    row = {"detector": a["detector"], "arch": a["arch"], "attention": a.get("attention_type", "none"),
           "param": param, "classes": classes, "epochs": f"{len(rows)}/{a.get('epochs', '?')}",
           "seed": a.get("seed"), "paper_source": src, "source": str(run)}
    for t, ref in (("bbox", box), ("segm", mask)):
        for i, k in enumerate(COCO_KEYS):
            row[f"{t}_{k}"] = last.get(f"{t}_{k}")
            row[f"paper_{t}_{k}"] = ref[i] if ref is not None and i < len(ref) else None
        ours, theirs = row[f"{t}_AP"], row[f"paper_{t}_AP"]
        row[f"diff_{t}_AP"] = None if ours is None or theirs is None else ours - theirs
    return row


def coco_markdown_table(rows):
    head = ["Model", "Attention", "Epochs", "box AP", "AP50", "AP75", "APs", "APm", "APl", "mask AP",
            "Paper box AP", "Δ box AP", "Paper mask AP", "Δ mask AP", "Run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    rank = lambda v, order: order.index(v) if v in order else len(order)  # noqa: E731
    rows = sorted(rows, key=lambda r: (r["detector"], rank(r["arch"], ARCH_ORDER), rank(r["attention"], ATT_ORDER),
                                       r["param"] or 0, r["source"]))
    for r in rows:
        mark = " †" if r["paper_source"] == "mmdetection" else ""
        cells = [f"{DETECTOR_LABEL.get(r['detector'], r['detector'])} {ARCH_LABEL.get(r['arch'], r['arch'])}",
                 attention_label(r["attention"], r["param"]), r["epochs"]]
        shown = lambda v: _num(None if v is None or v < 0 else v, ".1f")  # noqa: E731  (-1: no objects of that size)
        cells += [shown(r[f"bbox_{k}"]) for k in COCO_KEYS] + [shown(r["segm_AP"])]
        cells += [_num(r["paper_bbox_AP"], ".1f") + (mark if r["paper_bbox_AP"] is not None else ""),
                  _num(r["diff_bbox_AP"], "+.1f"),
                  _num(r["paper_segm_AP"], ".1f") + (mark if r["paper_segm_AP"] is not None else ""),
                  _num(r["diff_segm_AP"], "+.1f"), _short(r["source"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Paper columns: {COCO_SOURCES['paper']}; COCO val2017, percent; our figures: the last epoch."]
    if any(r["paper_source"] == "mmdetection" for r in rows):
        notes.append(f"† {COCO_SOURCES['mmdetection']}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


COCO_CSV_FIELDS = (["detector", "arch", "attention", "param", "classes", "epochs", "seed"]
                   + [f"{t}_{k}" for t in ("bbox", "segm") for k in COCO_KEYS]
                   + [f"paper_{t}_{k}" for t in ("bbox", "segm") for k in COCO_KEYS]
                   + ["diff_bbox_AP", "diff_segm_AP", "paper_source", "source"])


def coco_csv_table(rows):
    return csv_table(rows, COCO_CSV_FIELDS)
