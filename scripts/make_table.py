"""Compare finished (or running) ImageNet and COCO runs with the paper: a markdown table, or CSV.

    python scripts/make_table.py checkpoints/                      # every run folder under it
    python scripts/make_table.py RUN_DIR [RUN_DIR ...] --csv > results.csv
    python scripts/make_table.py checkpoints/ --write-csv results.csv > results.md   # both
    python scripts/make_table.py checkpoints/cifar100-resnet20-simam-param0.0001-seed*   # mean +- std

Runs that differ only in their seed (same dataset, model, attention and parameter) are one row:
mean +- sample std of their best top-1/top-5 (`--per-seed` lists them one by one).

Each run folder's args.json (the trainer's merged settings) names the model; metrics.jsonl gives the
best validation top-1 over the epochs so far and that epoch's top-5. Params/FLOPs come from
utils.flops (the paper's convention) for the model as trained.

COCO runs (main_coco.py, run folders coco-<detector>-...) get their own table beside the paper's COCO
table: the last epoch's box (and mask) AP, AP50, AP75, APs, APm, APl, one row per run.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import UserError, error_line  # noqa: E402
from utils.runs import (aggregate_seeds, coco_csv_table, coco_markdown_table, coco_run_row, csv_table,  # noqa: E402
                        find_runs, is_coco_run, markdown_table, read_each, run_row, sort_rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders holding run folders")
    p.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    p.add_argument("--write-csv", metavar="FILE", help="also write the CSV form to FILE")
    p.add_argument("--per-seed", action="store_true", help="one row per run instead of mean +- std over seeds")
    args = p.parse_args(argv)
    try:
        # A run whose files are unreadable (a torn args.json) is named on stderr and left out.
        read = read_each(find_runs(args.runs), lambda r: (True, coco_run_row(r)) if is_coco_run(r) else (False, run_row(r)))
        coco = [row for is_coco, row in read if is_coco]
        rows = [row for is_coco, row in read if not is_coco]
        rows = sort_rows(rows if args.per_seed else aggregate_seeds(rows))
    except UserError as e:
        sys.exit(f"error: {error_line(e)}")
    tables = ([csv_table(rows) if args.csv else markdown_table(rows)] if rows else []) + \
        ([coco_csv_table(coco) if args.csv else coco_markdown_table(coco)] if coco else [])
    print("\n".join(tables), end="")
    if args.write_csv:
        Path(args.write_csv).write_text("\n".join(([csv_table(rows)] if rows else []) + ([coco_csv_table(coco)] if coco else [])))


if __name__ == "__main__":
    main()
