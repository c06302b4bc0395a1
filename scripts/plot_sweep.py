"""SimAM's lambda sweep from run folders: best top-1 (mean +- std over seeds) against lambda, and the table.

    python scripts/plot_sweep.py runs/sweep -o lambda_sweep.png          # every run folder under it
    python scripts/plot_sweep.py runs/sweep/cifar100-resnet20-simam-* --csv

One line per model (dataset, arch, number of classes) over its SimAM runs, lambda on a log axis;
error bars are the sample std over seeds (none for a single seed). Runs of the same model without
attention, when given, are drawn as a dashed line with a band (mean +- std): the baseline lambda
has to beat. Other attention types are left out. The markdown table (or --csv) goes to stdout;
each model's best lambda is in bold. Runs come from scripts/lambda_sweep.sh or any trainer runs
(utils.reporting.runs reads args.json and metrics.jsonl: the best epoch's top-1/top-5).
"""
import argparse
import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import UserError, error_line  # noqa: E402
from utils.reporting.runs import (ARCH_LABEL, DATASET_LABEL, aggregate_seeds, find_runs, is_coco_run,  # noqa: E402
                                  read_each, run_row)


def model_label(key):
    dataset, arch, classes = key
    label = ARCH_LABEL.get(arch, arch)
    if dataset == "imagenet":
        return label if classes == 1000 else f"{label} ({classes} classes)"
    return f"{label} ({DATASET_LABEL.get(dataset, dataset)})"


def sweep(rows):
    """{(dataset, arch, classes): {"points": [row per lambda, ascending], "baseline": row or None}};
    rows are utils.reporting.runs rows, one per run, aggregated here over seeds (mean, sample std)."""
    runs = [r for r in rows if r["attention"] in ("simam", "none")]
    if not any(r["attention"] == "simam" for r in runs):
        raise UserError("no SimAM run among the run folders: nothing to plot against lambda")
    models = {}
    for r in sorted(aggregate_seeds(runs), key=lambda r: r["param"] or 0):
        m = models.setdefault((r["dataset"], r["arch"], r["classes"]), {"points": [], "baseline": None})
        if r["attention"] == "simam":
            m["points"].append(r)
        else:
            m["baseline"] = r
    return {k: v for k, v in models.items() if v["points"]}


def sweep_row(run):
    """A classification run's row; UserError (the run is left out with a warning) for a COCO run or
    a run without a finished epoch."""
    if is_coco_run(run):
        raise UserError("a COCO run (box AP, no top-1 against lambda): left out; plot it with plot_curves.py")
    row = run_row(run)
    if row["top1"] is None:
        raise UserError("no finished epoch yet (metrics.jsonl has no row): left out")
    return row


def _acc(mean, std):
    if mean is None:
        return "–"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(models):
    lines = ["| Model | λ | Seeds | Top-1 | Top-5 |", "|---|---|---|---|---|"]
    for key, m in models.items():
        best = max(m["points"], key=lambda r: r["top1"])
        for r in m["points"] + ([m["baseline"]] if m["baseline"] else []):
            top1 = _acc(r["top1"], r["top1_std"])
            if r is best:
                top1 = f"**{top1}**"
            lam = "no attention" if r["attention"] == "none" else f"{r['param']:g}"
            lines.append(f"| {model_label(key)} | {lam} | {r['seeds']} | {top1} | {_acc(r['top5'], r['top5_std'])} |")
    return ("\n".join(lines) + "\n\nTop-1/Top-5: best epoch of each run; over several seeds mean ± sample std. "
            "Bold: each model's best lambda.\n")


def csv_table(models):
    fields = ["dataset", "arch", "classes", "attention", "param", "seeds", "top1", "top1_std", "top5", "top5_std"]
    out = io.StringIO()
    w = csv.DictWriter(out, fields, lineterminator="\n")
    w.writeheader()
    for m in models.values():
        for r in m["points"] + ([m["baseline"]] if m["baseline"] else []):
            w.writerow({k: ("" if r[k] is None else r[k]) for k in fields})
    return out.getvalue()


def make_figure(models, title=None):
    """Top-1 against lambda (log axis), one line per model (returned, not saved)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (key, m) in enumerate(models.items()):
        c = colors[i % len(colors)]
        pts = m["points"]
        xs, ys = [r["param"] for r in pts], [r["top1"] for r in pts]
        errs = [r["top1_std"] or 0.0 for r in pts]
        seeds = sorted({r["seeds"] for r in pts})
        n = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        ax.errorbar(xs, ys, yerr=errs, color=c, marker="o", capsize=4, lw=2,
                    label=f"{model_label(key)} + SimAM ({n} seed{'s' if seeds[-1] > 1 else ''})")
        best = max(pts, key=lambda r: r["top1"])
        ax.annotate(f"{best['top1']:.2f}", (best["param"], best["top1"]), textcoords="offset points",
                    xytext=(7, 3), ha="left", fontsize=8, color=c)  # beside the error bar, not on it
        b = m["baseline"]
        if b is not None:
            ax.axhline(b["top1"], color=c, ls="--", lw=1.2, label=f"{model_label(key)}, no attention")
            if b["top1_std"]:
                ax.axhspan(b["top1"] - b["top1_std"], b["top1"] + b["top1_std"], color=c, alpha=0.12, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("SimAM λ")
    ax.set_ylabel("best top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "Top-1 against SimAM's λ (mean ± std over seeds)")
    fig.tight_layout()
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders holding run folders")
    p.add_argument("-o", "--output", default="lambda_sweep.png", help="image file to write (default: lambda_sweep.png)")
    p.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        # A run that cannot be read or plotted here is named on stderr and left out.
        rows = read_each(find_runs(args.runs), sweep_row)
        models = sweep(rows)
        import matplotlib.pyplot as plt
        fig = make_figure(models, args.title)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        plt.close(fig)
    except UserError as e:
        sys.exit(f"error: {error_line(e)}")
    print(csv_table(models) if args.csv else markdown_table(models), end="")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
