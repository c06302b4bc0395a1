"""Compare finished (or running) ImageNet and COCO runs with the paper: a markdown table, or CSV.

    python scripts/make_table.py checkpoints/                      # every run folder under it
    python scripts/make_table.py RUN_DIR [RUN_DIR ...] --csv > results.csv
    python scripts/make_table.py checkpoints/ --write-csv results.csv > results.md   # both
    python scripts/make_table.py checkpoints/cifar100-resnet20-simam-param0.0001-seed*   # mean +- std

Runs that differ only in their seed (same dataset, model, attention, parameter and recipe: every training
setting, utils/recipe.py) are one row: mean +- sample std of their best top-1/top-5 (`--per-seed` lists
them one by one). Runs of a model with other settings (another --lr, --epochs, ...) are rows of their
own, whose Settings column names what differs.

Each run folder's args.json (the trainer's merged settings) names the model; metrics.jsonl gives the
best validation top-1 over the epochs so far and that epoch's top-5. Params/FLOPs come from
utils.reporting.flops (the paper's convention) for the model as trained.

COCO runs (main_coco.py, run folders coco-<detector>-...) get their own table beside the paper's COCO
table: the last epoch's box (and mask) AP, AP50, AP75, APs, APm, APl, one row per run.

Modern-recipe runs (any of the recipe flags of docs/recipes.md on, e.g. configs/imagenet/tv2/) get their
own table, without paper columns (the paper's numbers are for its own recipe), with the EMA's best top-1/top-5
beside the model's where the run kept an EMA.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import UserError, error_line  # noqa: E402
from utils.reporting.runs import (RECIPE_CSV_FIELDS, aggregate_seeds, coco_csv_table, coco_markdown_table, coco_run_row,
                                  csv_table, find_runs, is_coco_run, markdown_table, name_settings, read_args,
                                  read_each, recipe_markdown_table, recipe_name, recipe_row, run_row, sort_rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders holding run folders")
    p.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    p.add_argument("--write-csv", metavar="FILE", help="also write the CSV form to FILE")
    p.add_argument("--per-seed", action="store_true", help="one row per run instead of mean +- std over seeds")
    args = p.parse_args(argv)
    try:
        # A run whose files are unreadable (a torn args.json) is named on stderr and left out.
        def kind_and_row(run):
            if is_coco_run(run):
                return "coco", coco_run_row(run)
            return ("recipe", recipe_row(run)) if recipe_name(read_args(run)) else ("paper", run_row(run))
        read = read_each(find_runs(args.runs), kind_and_row)
        coco, rows, recipe = ([row for kind, row in read if kind == want] for want in ("coco", "paper", "recipe"))
        rows = sort_rows(name_settings(rows) if args.per_seed else aggregate_seeds(rows))
        recipe = sort_rows(name_settings(recipe) if args.per_seed else aggregate_seeds(recipe))
    except UserError as e:
        sys.exit(f"error: {error_line(e)}")
    csv_tables = ([csv_table(rows)] if rows else []) + ([csv_table(recipe, RECIPE_CSV_FIELDS)] if recipe else []) + \
        ([coco_csv_table(coco)] if coco else [])
    md_tables = ([markdown_table(rows)] if rows else []) + \
        ([f"Modern recipes (no paper column)\n\n{recipe_markdown_table(recipe)}"] if recipe else []) + \
        ([coco_markdown_table(coco)] if coco else [])
    print("\n".join(csv_tables if args.csv else md_tables), end="")
    if args.write_csv:
        Path(args.write_csv).write_text("\n".join(csv_tables))


if __name__ == "__main__":
    main()
