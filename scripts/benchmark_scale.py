"""Loader set-up at real dataset scale: ours against torchvision's path, on synthetic full-size indexes.

    python scripts/benchmark_loader.py --scale imagenet --root /scratch/bench     # 1000 x 1281 files
    python scripts/benchmark_loader.py --scale coco --root /scratch/bench         # COCO-2017-sized JSON
    python scripts/benchmark_loader.py --scale coco --root /tmp/b --images 2000 --repeats 1   # smaller

Builds under --root (once; reused while its stamp matches) either an ImageNet-sized train folder
(--classes x --per-class files, hard links to one tiny JPEG per class: the index, not decoding, is
measured) or a COCO-2017-sized train split (--images images hard-linked to a few tiny JPEGs, ~7.3
annotations an image with realistic polygons, ~1% crowd with uncompressed RLE). Each side runs in a
child process of its own, one after the other (interleaved over --repeats), so that neither's memory
counts for the other:
  ours         SafeImageFolder + EpochLoader / CocoSplit + CocoDetection (masks decoded) + CocoLoader,
               persistent workers started as a DDP rank starts them (utils.lifecycle.processes.
               worker_start_method, called first thing as utils.trainer.run_rank does: a fork server
               imports beside the index build); epoch 1 is its last --fraction (the rest skipped as a
               resume skips it) read to its end, as every epoch of a run is, so epoch 2 starts as in training;
  torchvision  datasets.ImageFolder / datasets.CocoDetection (pycocotools) + DataLoader(shuffle, fork),
               workers started every epoch (its reference scripts' setting).
Figures: index build (ImageFolder scan / annotation load: JSON parse and checks vs pycocotools' COCO()),
the epoch's batch list (ours; torchvision's sampler draws lazily), time from starting an epoch to its
first batch (epochs 1 and 2) and from the start of the index build to epoch 1's first batch, each worker's USS (/proc/PID/smaps_rollup: its private memory) at
the first batch and at the end of --fraction of epoch 1, and the PSS of main + workers (+ fork
server) then. Remove --root afterwards (rm -rf): over a million links.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

from utils import UserError  # noqa: E402

IMAGENET_STAMP = "imagenet v1: {classes} x {per_class}"
COCO_STAMP = "coco v1: {images} images, {per_image} annotations an image, seed 0"


def tiny_jpeg(path, seed):
    from PIL import Image
    g = np.random.default_rng(seed)
    Image.fromarray(g.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path, quality=90)


def _stamped(folder, stamp):
    s = folder / ".bench_stamp"
    return s.is_file() and s.read_text() == stamp


def make_imagenet(root, classes, per_class):
    """root/train/n<class>/n<class>_<i>.JPEG: hard links to one 8x8 JPEG per class (ImageNet's name lengths)."""
    stamp = IMAGENET_STAMP.format(classes=classes, per_class=per_class)
    folder = root / "imagenet"
    if _stamped(folder, stamp):
        return folder / "train"
    if folder.exists():
        raise UserError(f"{folder} exists without this size's stamp: remove it first")
    (folder / "src").mkdir(parents=True)
    for c in range(classes):
        name = f"n{c:08d}"
        src = folder / "src" / f"{name}.JPEG"
        tiny_jpeg(src, c)
        d = folder / "train" / name
        d.mkdir(parents=True)
        for i in range(per_class):
            os.link(src, d / f"{name}_{i}.JPEG")
    (folder / ".bench_stamp").write_text(stamp)
    return folder / "train"


def _polygon(g, x, y, w, h):
    """A realistic outline inside the box: 3-200 points (median ~17) on a jittered ellipse, 2 decimals."""
    n = int(np.clip(round(g.lognormal(np.log(17), 0.7)), 3, 200))
    t = np.sort(g.uniform(0, 2 * np.pi, n))
    r = g.uniform(0.7, 1.0, n)
    px = np.round(x + w / 2 * (1 + r * np.cos(t)), 2)
    py = np.round(y + h / 2 * (1 + r * np.sin(t)), 2)
    return np.stack([px, py], 1).reshape(-1).tolist()


def make_coco(root, images, per_image):
    """root/coco/{annotations/instances_train2017.json, train2017/}: COCO-2017-sized train split."""
    stamp = COCO_STAMP.format(images=images, per_image=per_image)
    folder = root / "coco"
    if _stamped(folder, stamp):
        return folder
    if folder.exists():
        raise UserError(f"{folder} exists without this size's stamp: remove it first")
    (folder / "annotations").mkdir(parents=True)
    (folder / "train2017").mkdir()
    (folder / "src").mkdir()
    sources = []
    for k in range(8):  # a file takes at most ~65,000 links
        sources.append(folder / "src" / f"{k}.jpg")
        tiny_jpeg(sources[-1], k)
    g = np.random.default_rng(0)
    ann_id = 0
    with open(folder / "annotations" / "instances_train2017.json", "w") as f:
        f.write('{"info": {"description": "synthetic, scripts/benchmark_scale.py"}, "licenses": [], "images": [')
        sizes = []
        for i in range(images):
            w, h = (640, int(g.integers(360, 640))) if g.random() < 0.7 else (int(g.integers(360, 640)), 640)
            sizes.append((w, h))
            name = f"{i + 1:012d}.jpg"
            os.link(sources[i % len(sources)], folder / "train2017" / name)
            f.write(("," if i else "") + json.dumps({"license": 1, "file_name": name, "height": h, "width": w,
                                                     "id": i + 1, "date_captured": "2013-11-14 17:02:52"}))
        f.write('], "annotations": [')
        for i, (w, h) in enumerate(sizes):
            for _ in range(int(g.poisson(per_image))):
                ann_id += 1
                bw, bh = float(g.uniform(4, w / 2)), float(g.uniform(4, h / 2))
                x, y = float(g.uniform(0, w - bw)), float(g.uniform(0, h - bh))
                a = {"id": ann_id, "image_id": i + 1, "category_id": int(g.integers(1, 91)), "iscrowd": 0}
                if g.random() < 0.01:  # crowd: uncompressed RLE, column-major runs adding up to h * w
                    runs = g.integers(1, 2 * h, int(g.integers(50, 400)))
                    runs = runs[np.cumsum(runs) < h * w]
                    a["iscrowd"] = 1
                    a["segmentation"] = {"size": [h, w], "counts": runs.tolist() + [int(h * w - runs.sum())]}
                else:
                    a["segmentation"] = [_polygon(g, x, y, bw, bh) for _ in range(1 if g.random() < 0.9 else 2)]
                a["area"] = round(bw * bh * 0.7, 2)
                a["bbox"] = [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)]
                f.write(("," if ann_id > 1 else "") + json.dumps(a))
        cats = [{"supercategory": "thing", "id": c, "name": f"class{c}"} for c in range(1, 91)]
        f.write('], "categories": ' + json.dumps(cats) + "}")
    (folder / ".bench_stamp").write_text(stamp)
    return folder


# ---------------------------------------------------------------- measuring (in a child process)

def memory(pid):
    """(USS, PSS) in MB of a process, from /proc/PID/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":", 1)
        fields[k] = int(v.split()[0])
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024, fields["Pss"] / 1024


def snapshot(it):
    """Workers' USS and main + workers (+ their fork server) PSS, from a multiprocessing iterator."""
    pids = [w.pid for w in it._workers]
    parents = {int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) for p in pids}
    extra = [p for p in parents if p != os.getpid()]  # a fork server
    uss = [memory(p)[0] for p in pids]
    return uss, sum(memory(p)[1] for p in [os.getpid(), *pids, *extra])


SIDES = ("ours", "torchvision", "ours-fork")


def _start_method(side):
    """ours: workers as a DDP rank starts them (from the fork server where a fork can hang, see
    utils.lifecycle.processes.worker_start_method); ours-fork: forked from the main process, as a
    single-process run starts them."""
    import utils.inputs.coco
    import utils.inputs.data
    from utils.lifecycle.processes import worker_start_method
    choose = (lambda workers: worker_start_method(workers, process_group=True)) if side == "ours" else (lambda workers: None)
    if side != "torchvision":
        utils.inputs.data.worker_start_method = utils.inputs.coco.worker_start_method = choose
    return choose


def _stub_image(path):
    import torch
    return torch.zeros(3, 8, 8, dtype=torch.uint8)


def tv_collate(batch):
    return tuple(zip(*batch))


def run_epochs(make_iter, batches, fraction, persistent):
    """First-batch times of epochs 1 and 2, memory at epoch 1's first batch and after `fraction` of it.
    make_iter(epoch, skip): an iterator over the epoch's batches from batch `skip` on. With persistent
    workers (ours) epoch 1 is its last `fraction` (skipped as a resume skips, nothing loaded), read to its
    end as every epoch of a run is, so that epoch 2 starts as it does in training (an epoch left half
    read would have its prefetched batches drained first)."""
    out = {}
    target = max(1, int(batches * fraction))
    start = time.perf_counter()
    it = make_iter(0, batches - target if persistent else 0)
    next(it)
    out["first_batch_at"] = time.perf_counter()
    out["first_batch_1"] = out["first_batch_at"] - start
    out["uss_first"], out["pss_first"] = snapshot(it)
    read = 1
    while read < target:
        next(it)
        read += 1
    out["uss_end"], out["pss_end"] = snapshot(it)
    out["batches_read"] = read
    if persistent:
        assert next(it, None) is None  # the epoch's end
    del it
    start = time.perf_counter()
    it = make_iter(1, 0)
    next(it)
    out["first_batch_2"] = time.perf_counter() - start
    del it
    return out


def median_seconds(fn, repeats=3):
    """Median wall time of fn(i) over i in range(repeats) (the batch list of epochs 0, 1, 2)."""
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def torchvision_epochs(ds, batch, workers, fraction, **loader_kw):
    """torchvision's side: a shuffled DataLoader made anew every epoch (its references' setting), forked workers."""
    import torch
    from torch.utils.data import DataLoader
    gen = torch.Generator()

    def make_iter(epoch, skip):
        gen.manual_seed(epoch)
        return iter(DataLoader(ds, batch, shuffle=True, num_workers=workers, generator=gen,
                               multiprocessing_context="fork", **loader_kw))
    return run_epochs(make_iter, -(-len(ds) // batch), fraction, persistent=False)


def child_imagenet(side, data, workers, batch, fraction):
    import torch
    start_method = _start_method(side)
    torch.set_num_threads(1)
    from torchvision import datasets
    from utils.inputs.data import EpochLoader, SafeImageFolder, collate_skipping, epoch_batches
    out = {}
    start = time.perf_counter()
    if side != "torchvision":
        start_method(workers)  # first thing, as utils.trainer.run_rank: a fork server imports beside the scan
        ds = SafeImageFolder(data)
        ds.loader = _stub_image  # decode stubbed: the index and the workers are measured
        out["index_s"] = time.perf_counter() - start
        # persistent workers, as the trainer's seeded transforms have them (EpochLoader)
        loader = EpochLoader(ds, batch, workers, seed=0, collate_fn=collate_skipping, persistent_workers=True)
        out.update(run_epochs(lambda e, skip: iter(loader(e, skip)), len(loader), fraction, persistent=True))
        out["batch_list_s"] = median_seconds(lambda epoch: epoch_batches(loader.sampler, batch, True, 0, epoch))
    else:
        ds = datasets.ImageFolder(data, loader=_stub_image)
        out["index_s"] = time.perf_counter() - start
        out["batch_list_s"] = 0.0
        out.update(torchvision_epochs(ds, batch, workers, fraction))
    out["entries"] = len(ds)
    out["to_first_batch"] = out.pop("first_batch_at") - start
    return out


def child_coco(side, root, workers, batch, fraction):
    import torch
    start_method = _start_method(side)
    torch.set_num_threads(1)
    import contextlib
    import io
    from torchvision import datasets
    from utils.inputs.coco import CocoDetection, CocoLoader, CocoSplit
    from pycocotools.coco import COCO  # noqa: F401
    out = {}
    start = time.perf_counter()
    if side != "torchvision":
        start_method(workers)  # first thing, as utils.trainer.run_rank: a fork server imports beside the load
        split = CocoSplit(root, "train")
        out["load_s"] = time.perf_counter() - start
        ds = CocoDetection(split, train=True, with_masks=True)
        loader = CocoLoader(ds, batch, workers, seed=0)
        out.update(run_epochs(lambda e, skip: iter(loader(e, skip)), len(loader), fraction, persistent=True))
        out["batch_list_s"] = median_seconds(loader.keys)
        out["annotations"] = len(split.arrays["ann_id"])
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            ds = datasets.CocoDetection(str(Path(root) / "train2017"), str(Path(root) / "annotations" / "instances_train2017.json"))
        out["load_s"] = time.perf_counter() - start
        out["batch_list_s"] = 0.0
        out["annotations"] = len(ds.coco.anns)
        out.update(torchvision_epochs(ds, batch, workers, fraction, collate_fn=tv_collate))
    out["entries"] = len(ds)
    out["to_first_batch"] = out.pop("first_batch_at") - start
    return out


# ---------------------------------------------------------------- report

def med(rows, key):
    xs = [r[key] for r in rows]
    return f"{statistics.median(xs):.2f}" + (f" [{min(xs):.2f}-{max(xs):.2f}]" if len(xs) > 1 else "")


def mb(rows, key):
    xs = [max(r[key]) if isinstance(r[key], list) else r[key] for r in rows]
    return f"{statistics.median(xs):,.0f}" + (f" [{min(xs):,.0f}-{max(xs):,.0f}]" if len(xs) > 1 else "")


def report(scale, results, workers, batch):
    ours, tv, fork = results["ours"], results["torchvision"], results.get("ours-fork")
    load = "index_s" if scale == "imagenet" else "load_s"
    load_name = "ImageFolder scan (index build)" if scale == "imagenet" else \
        "annotation load (ours: JSON + checks; torchvision: pycocotools COCO())"
    print(f"\n{scale}: {ours[0]['entries']:,} entries" +
          (f", {ours[0]['annotations']:,} annotations" if scale == "coco" else "") +
          f"; {workers} workers, batch {batch}; {len(ours)} repeat(s): median [min-max]; times in s, memory in MB")
    print("| | ours | torchvision |" + (" ours, one process (workers forked) |\n|---|---|---|---|" if fork else "\n|---|---|---|"))
    rows = [(load_name, med, load), ("batch list of an epoch (main process)", med, "batch_list_s"),
            ("epoch 1: start to first batch", med, "first_batch_1"),
            (f"set-up to epoch 1's first batch ({'scan' if scale == 'imagenet' else 'load'} included)", med, "to_first_batch"),
            ("epoch 2: start to first batch", med, "first_batch_2"),
            ("per-worker USS at the first batch (largest worker)", mb, "uss_first"),
            (f"per-worker USS after {ours[0]['batches_read']:,} batches (largest worker)", mb, "uss_end"),
            ("main + workers PSS at the first batch", mb, "pss_first"),
            ("main + workers PSS at the end", mb, "pss_end")]
    for name, f, key in rows:
        print(f"| {name} | {f(ours, key)} | {f(tv, key)} |" + (f" {f(fork, key)} |" if fork else ""))


def cpu_name():
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())


def add_args(p):
    p.add_argument("--scale", choices=("imagenet", "coco"), help="loader set-up at dataset scale (scripts/benchmark_scale.py)")
    p.add_argument("--root", type=Path, help="--scale: folder for the synthetic data (built once, reused)")
    p.add_argument("--classes", type=int, default=1000, help="--scale imagenet: class folders (default 1000)")
    p.add_argument("--per-class", type=int, default=1281, help="--scale imagenet: files per class (default 1281)")
    p.add_argument("--coco-images", type=int, default=117_266, help="--scale coco: train images (default 117,266)")
    p.add_argument("--per-image", type=float, default=7.33, help="--scale coco: mean annotations an image (7.33)")
    p.add_argument("--fraction", type=float, default=1.0, help="--scale: part of epoch 1 read before the end figures")
    p.add_argument("--scale-workers", type=int, help="--scale: workers (default 8 ImageNet, 4 COCO)")
    p.add_argument("--scale-batch", type=int, help="--scale: batch size (default 256 ImageNet, 2 COCO)")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)


def check_args(args):
    """The --scale flags' ranges (one line each), checked with the script's others before any work."""
    from utils.args import check_number
    for flag, value in (("--classes", args.classes), ("--per-class", args.per_class), ("--coco-images", args.coco_images),
                        ("--scale-workers", args.scale_workers), ("--scale-batch", args.scale_batch)):
        check_number(flag, value, 1)
    check_number("--per-image", args.per_image, 0, low_open=True)
    check_number("--fraction", args.fraction, 0, 1, low_open=True)


def main(args):
    if args.root is None:
        raise UserError("--scale needs --root FOLDER (where the synthetic data is built)")
    workers = args.scale_workers if args.scale_workers is not None else (8 if args.scale == "imagenet" else 4)
    batch = args.scale_batch or (256 if args.scale == "imagenet" else 2)
    args.root.mkdir(parents=True, exist_ok=True)
    if args.scale == "imagenet":
        data = make_imagenet(args.root, args.classes, args.per_class)
    else:
        data = make_coco(args.root, args.coco_images, args.per_image)
    if args.child:
        run = child_imagenet if args.scale == "imagenet" else child_coco
        print("RESULT " + json.dumps(run(args.child, data, workers, batch, args.fraction)), flush=True)
        return
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    from utils.lifecycle.processes import worker_start_method
    # Where a DDP rank starts workers from a fork server, also ours as one process does (fork): the server's start apart.
    sides = SIDES if worker_start_method(workers, process_group=True) is not None else ("ours", "torchvision")
    results = {side: [] for side in sides}
    for r in range(args.repeats):
        for side in results:
            cmd = [sys.executable, __file__, "--scale", args.scale, "--root", str(args.root), "--child", side,
                   "--classes", str(args.classes), "--per-class", str(args.per_class),
                   "--coco-images", str(args.coco_images), "--per-image", str(args.per_image),
                   "--fraction", str(args.fraction), "--scale-workers", str(workers), "--scale-batch", str(batch)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if done.returncode or line is None:
                raise UserError(f"the {side} measurement failed: {(done.stderr or done.stdout).strip()[-2000:]}")
            results[side].append(json.loads(line[7:]))
            print(f"repeat {r + 1}/{args.repeats}: {side} done", flush=True)
    report(args.scale, results, workers, batch)


if __name__ == "__main__":
    from utils import error_line
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(p)
    p.add_argument("--repeats", type=int, default=1)
    try:
        a = p.parse_args()
        if a.scale is None:
            raise UserError("give --scale imagenet|coco")
        main(a)
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
