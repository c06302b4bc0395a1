"""What a launcher does with a config: scripts/train.sh and scripts/slurm_train.sh ask

    python scripts/launch_plan.py [DATA] --config CONFIG [main_imagenet.py / main_coco.py flags]

which prints `new`, `resume` or `done`, the script (main_coco.py for configs/coco/, else main_imagenet.py),
then the run folder or checkpoint, tab-separated, the path last (it may hold spaces). It sits beside the launchers, above the training scripts whose own
parsers it uses, so that utils/ never imports a main script.
"""
import argparse
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import UserError  # noqa: E402
from utils.args import parse_args  # noqa: E402
from utils.recipe import folder_name  # noqa: E402
from utils.reporting.runs import read_metrics  # noqa: E402


def script_for(argv):
    """The training script a command is for: main_coco.py when the config (configs/coco/) or a flag
    sets `detector`, else main_imagenet.py."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    try:
        cfg = tomllib.loads(Path(known.config).read_bytes().decode()) if known.config and Path(known.config).is_file() else {}
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        cfg = {}  # the script's own parser reports it
    coco = "detector" in cfg or any(a == "--detector" or a.startswith("--detector=") for a in argv)
    return "main_coco.py" if coco else "main_imagenet.py"


def plan(argv):
    """("done", run_dir) when every epoch is in metrics.jsonl, ("resume", checkpoint) when a checkpoint
    is there, else ("new", run_dir). Uses the trainer's own parser, so flags and config merge the same way."""
    script = script_for(argv)
    resolve = None
    if script == "main_coco.py":
        from main_coco import get_args_parser, make_task
        from main_coco import resolve_defaults as resolve  # epochs, -b, sizes: recipe or demo defaults
    else:
        from main_imagenet import get_args_parser, make_task
    parser = get_args_parser()
    parser.prog = script  # errors name the flags' owner
    args = parse_args(parser, argv, resolve=resolve)
    run = Path(args.ckpt) / folder_name(make_task(args).name, args)  # the trainer's own name: utils.recipe
    epochs_done = max((r["epoch"] for r in read_metrics(run)), default=0) if (run / "metrics.jsonl").is_file() else 0
    if epochs_done >= args.epochs:
        return "done", run
    if (run / "checkpoint.pth.tar").is_file():
        return "resume", run / "checkpoint.pth.tar"
    return "new", run


def main(argv):
    if not argv:
        sys.exit("usage: python scripts/launch_plan.py [DATA] --config CONFIG [main_imagenet.py / main_coco.py flags]")
    try:
        state, path = plan(argv)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(state, script_for(argv), path, sep="\t")  # the path last and whole: it may hold spaces


if __name__ == "__main__":
    main(sys.argv[1:])
