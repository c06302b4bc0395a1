"""`make demo`: train a SimAM-ResNet-18 on the built-in demo dataset on the CPU, then evaluate it.

Three steps, each an ordinary command you can run yourself:
  1. generate data/demo/ (10 pattern classes, 64-96 px JPEGs) unless it is there;
  2. python main_imagenet.py (no DATA: the demo set) ... --ckpt runs/demo  -- a few CPU minutes;
  3. python main_imagenet.py -e --resume runs/demo/<run>/model_best.pth.tar
and a summary of where the run's files are.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One core computes (one intra-op thread), one decodes JPEGs (-j 1): on a 2-core machine this is
# several times faster than letting a 2-thread OpenMP pool compete with the loader.
ENV = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
sys.path.insert(0, str(ROOT))
from utils.args import parse_args  # noqa: E402
from utils.inputs.demo_data import CLASSES, ensure_demo_dataset  # noqa: E402

EPOCHS = 20
COMMON = ["-a", "resnet18", "--attention_type", "simam", "--attention_param", "0.1",
          "--train-crop-size", "64", "--val-resize-size", "72", "--val-crop-size", "64", "-j", "1"]
TRAIN = ["--epochs", str(EPOCHS), "-b", "32", "--lr", "0.02", "--cos_lr", "--warmup-epochs", "1",
         "--seed", "0", "-p", "5", "--ckpt", "runs/demo"]


def demo_run_dir():
    """The demo run's folder (relative to the repository), named by the trainer's own rule (utils.recipe);
    the Makefile's DEMO_RUN is this path."""
    from main_imagenet import get_args_parser
    from utils.recipe import folder_name
    args = parse_args(get_args_parser(), COMMON + TRAIN)
    return Path(args.ckpt) / folder_name("imagenet", args)


def step(title):
    print(f"\n=== {title}", flush=True)


def main():
    t0 = time.time()
    step("1/3 demo data")
    root = ensure_demo_dataset()
    n = sum(1 for _ in root.rglob("*.JPEG"))
    print(f"{root.relative_to(ROOT)}: {n} images, {len(CLASSES)} classes ({', '.join(CLASSES)})")

    run_dir = ROOT / demo_run_dir()
    step(f"2/3 training SimAM-ResNet-18 for {EPOCHS} epochs on the CPU")
    # An earlier demo is continued (or, finished, left as it is), never started over: `make clean` removes it.
    resume = ["--resume", str((run_dir / "checkpoint.pth.tar").relative_to(ROOT))] \
        if (run_dir / "checkpoint.pth.tar").is_file() else []
    cmd = [sys.executable, "main_imagenet.py", *COMMON, *TRAIN, *resume]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True)

    step("3/3 evaluating the best checkpoint")
    best = run_dir / "model_best.pth.tar"
    cmd = [sys.executable, "main_imagenet.py", *COMMON, "-e", "--resume", str(best.relative_to(ROOT))]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best_row = max(rows, key=lambda r: r["val_acc1"])
    print(f"\nbest validation Acc@1 {best_row['val_acc1']:.1f}% at epoch {best_row['epoch']} "
          f"(chance: {100 / len(CLASSES):.0f}%), {time.time() - t0:.0f} s in all")
    print(f"run folder: {run_dir.relative_to(ROOT)}/")
    for f in sorted(run_dir.iterdir()):
        print(f"  {f.name:<20} {f.stat().st_size / 1e6:8.1f} MB" if f.suffix == ".tar" else f"  {f.name}")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
