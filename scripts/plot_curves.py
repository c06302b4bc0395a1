"""Training curves of one or more runs: top-1 and loss per epoch (train dashed, validation solid).
For COCO runs (main_coco.py) the top panel is validation box AP (solid) and mask AP (dash-dot).

    python scripts/plot_curves.py checkpoints/imagenet-resnet50 checkpoints/imagenet-resnet50-simam-param0.1 -o curves.png

One colour per run; a bottom panel shows each run's learning rate (log scale) and dotted vertical
lines mark the epochs where a step schedule drops it, so the jumps in accuracy line up with them.
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import UserError, error_line  # noqa: E402
from utils.reporting.runs import (ARCH_LABEL, DETECTOR_LABEL, attention_label, best_key, effective_param, find_runs,
                                  read_each, read_run)


def run_label(args):
    att = args.get("attention_type", "none")
    label = ARCH_LABEL.get(args["arch"], args["arch"])
    if args.get("detector"):
        label = f"{DETECTOR_LABEL.get(args['detector'], args['detector'])} {label}"
    if att != "none":
        label += " + " + attention_label(att, effective_param(att, args.get("attention_param")))
    if args.get("seed") is not None:
        label += f", seed {args['seed']}"
    return label


def lr_drops(rows):
    """Epochs (1-based) that start a step schedule's new stage: lr at most half the previous
    epoch's, after at least two epochs at that lr (so a cosine's steep tail is not marked)."""
    lrs = [r["lr"] for r in rows]
    return [rows[i]["epoch"] for i in range(1, len(rows))
            if lrs[i] <= 0.5 * lrs[i - 1] and (i < 2 or math.isclose(lrs[i - 1], lrs[i - 2]))]


def make_figure(runs, title=None):
    """The figure: top-1, loss and lr panels sharing the epoch axis (returned, not saved)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    kinds = {best_key(r["rows"]) for r in runs}
    if len(kinds) > 1:
        raise UserError("cannot plot classification and COCO runs in one figure: plot them separately")
    coco = kinds == {"bbox_AP"}
    fig, (ax_acc, ax_loss, ax_lr) = plt.subplots(
        3, 1, figsize=(9, 10), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    last = max(len(r["rows"]) for r in runs)
    marker = "o" if last <= 30 else None  # short runs: show the epochs themselves
    drops = set()
    for i, run in enumerate(runs):
        rows, c = run["rows"], colors[i % len(colors)]
        ep = [r["epoch"] for r in rows]
        label = run_label(run["args"])
        style = dict(color=c, marker=marker, ms=4)
        if coco:
            ax_acc.plot(ep, [r["bbox_AP"] for r in rows], lw=2, **style,
                        label=f"{label}: box AP (best {run['best']['bbox_AP']:.2f})")
            if "segm_AP" in rows[0]:
                ax_acc.plot(ep, [r["segm_AP"] for r in rows], lw=1.5, ls="-.", **style, label=f"{label}: mask AP")
        else:
            ax_acc.plot(ep, [r["val_acc1"] for r in rows], lw=2, **style,
                        label=f"{label}: val (best {run['best']['val_acc1']:.2f})")
            ax_acc.plot(ep, [r["train_acc1"] for r in rows], lw=1.2, ls="--", **style, label=f"{label}: train")
            ax_loss.plot(ep, [r["val_loss"] for r in rows], lw=2, **style, label=f"{label}: val")
        ax_loss.plot(ep, [r["train_loss"] for r in rows], lw=1.2, ls="--", **style, label=f"{label}: train")
        ax_lr.plot(ep, [r["lr"] for r in rows], color=c, lw=1.5, drawstyle="steps-post")
        drops.update(lr_drops(rows))
    for ax in (ax_acc, ax_loss, ax_lr):
        for e in sorted(drops):
            ax.axvline(e, color="0.5", ls=":", lw=1)
        ax.grid(alpha=0.3)
    ax_acc.set_ylabel("COCO val AP (%)" if coco else "top-1 accuracy (%)")
    ax_acc.legend(fontsize=8, loc="best")
    ax_loss.set_ylabel("training loss (sum of the detector's losses)" if coco else "cross-entropy loss")
    losses = [r[k] for run in runs for r in run["rows"] for k in ("train_loss", "val_loss") if k in r]
    if min(losses) > 0 and max(losses) > 20 * min(losses):
        ax_loss.set_yscale("log")  # an early blow-up would flatten every other point
    ax_loss.legend(fontsize=8, loc="best")
    ax_lr.set_ylabel("lr (epoch start)")
    ax_lr.set_yscale("log")
    ax_lr.set_xlabel("epoch" + ("   (dotted lines: lr drops)" if drops else ""))
    ax_lr.set_xlim(0.8, last + 0.2)
    if last <= 20:
        ax_lr.set_xticks(range(1, last + 1))
    ax_acc.set_title(title or ("Validation AP and training loss" if coco else
                               "Training (dashed) and validation (solid) curves"))
    fig.tight_layout()
    return fig


def finished_run(run):
    """read_run(run); UserError (the run is left out with a warning) while it has no finished epoch."""
    r = read_run(run)
    if not r["rows"]:
        raise UserError("no finished epoch yet (metrics.jsonl has no row): left out")
    return r


def plot(runs, out, title=None):
    import matplotlib.pyplot as plt
    fig = make_figure(runs, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders holding run folders")
    p.add_argument("-o", "--output", default="curves.png", help="image file to write (default: curves.png)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        # A run that cannot be read, or has no finished epoch yet, is named on stderr and left out.
        runs = read_each(find_runs(args.runs), finished_run)
        out = plot(runs, args.output, args.title)
    except UserError as e:
        sys.exit(f"error: {error_line(e)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
