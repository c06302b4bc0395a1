"""Images/s of the ImageNet input pipelines, side by side: decode -> augment -> batch ready for the device.

    python scripts/benchmark_loader.py                      # 200 generated JPEGs, a few minutes on 2 cores
    python scripts/benchmark_loader.py --data /imagenet/val --images 2000 --workers 8 --repeats 5
    python scripts/benchmark_loader.py --backends torch --auto-augment ta_wide --random-erase 0.1   # recipe cost
    python scripts/benchmark_loader.py --scale imagenet --root /scratch/bench   # set-up at ImageNet / COCO scale

--scale imagenet|coco measures the loaders' set-up, memory and epoch start on synthetic full-size
indexes instead, against torchvision's path (scripts/benchmark_scale.py says what and how).

Backends (utils/inputs/data.py, utils/inputs/dali.py):
  old    the previous path: PIL decode, RandomResizedCrop/flip or Resize/CenterCrop on PIL, ToTensor,
         Normalize, float32 batches built on the CPU;
  pil    PIL decode and resize, uint8 batches (`--data-backend pil`);
  torch  decode_jpeg + transforms.v2 on uint8 tensors, uint8 batches (`--data-backend torch`, the default);
  dali   NVIDIA DALI with CPU decoding (on a GPU node the trainer decodes with nvJPEG instead), if installed.
Two measures for each, train and val transforms:
  per core     one process, -j 0, one intra-op thread: images per second of the process's CPU time
               (all its threads: DALI's worker and executor threads count), collation included; CPU
               time rather than wall time, so that other jobs on a shared machine do not count;
  -j N         the loader with N worker processes (DALI: N threads), total images/s over the epoch
               (workers persist and were started by a warm-up repeat; DALI builds its pipeline per
               epoch, included).
Every repeat runs all backends in turn (interleaved, so load from other jobs hits them alike); the
table gives median [min-max] over repeats, the ratio to `old` within each repeat (median
[min-max]), and the cores one GPU needs at the median per-core rate for ResNet-50 at 3,000 and ResNet-18 at 8,000 images/s.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark_scale, beside this file
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from utils import UserError, error_line  # noqa: E402
from utils.args import AUTO_AUGMENT_POLICIES, SEED_MAX, check_number  # noqa: E402
from utils.inputs.data import EpochLoader, SafeImageFolder, collate_skipping, imagenet_transforms, reference_transforms  # noqa: E402
import benchmark_scale  # noqa: E402

GPU_RATES = {"ResNet-50": 3000, "ResNet-18": 8000}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="an ImageFolder split (class folders of JPEGs); default: generate --images")
    p.add_argument("--images", type=int, default=200, help="images per measurement (default 200)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="-j for the end-to-end measure (default 2; 0: skip it)")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 3; with --scale 1)")
    p.add_argument("--backends", default="old,pil,torch,dali")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--auto-augment", choices=AUTO_AUGMENT_POLICIES, help="the pil/torch train transforms with this "
                   "policy (main_imagenet.py's --auto-augment; `old` stays without)")
    p.add_argument("--random-erase", type=float, default=0.0, help="... and this --random-erase probability")
    p.add_argument("--train-arch", help="also time training steps of this network (e.g. resnet18) fed by each "
                   "backend's -j N loader vs by one synthetic batch already on the device")
    p.add_argument("--device", default="cpu", help="for --train-arch: cpu or cuda (DALI then decodes on the GPU)")
    p.add_argument("--steps", type=int, default=50, help="for --train-arch: timed steps after 5 warm-up steps")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="for --train-arch")
    p.add_argument("--channels-last", action="store_true", help="for --train-arch")
    benchmark_scale.add_args(p)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.scale else 3
    if args.images < args.batch or args.batch < 1 or args.repeats < 1 or args.workers < 0:
        raise UserError("need --images >= --batch >= 1, --repeats >= 1, --workers >= 0")
    check_number("--seed", args.seed, 0, SEED_MAX)
    check_number("--random-erase", args.random_erase, 0, 1)
    check_number("--steps", args.steps, 1)
    benchmark_scale.check_args(args)
    return args


def make_images(root, n, seed=0, classes=4):
    """ImageNet-like JPEGs: 500x375 (a fifth portrait), smooth content plus sensor-like noise, quality
    90, about 100 KB each (ImageNet's train mean is ~110 KB at ~400x350)."""
    g = np.random.default_rng(seed)
    for i in range(n):
        w, h = (375, 500) if i % 5 == 4 else (500, 375)
        small = g.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img += g.normal(0, 14, img.shape)
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:05d}.JPEG", quality=90)
    return root


def subset(ds, n):
    """n images spread over the classes (ImageFolder lists them class by class)."""
    ds.samples = ds.samples[::max(1, len(ds.samples) // n)][:n]
    return ds


def make_loader(backend, root, n, train, batch, workers, seed, device="cpu", augment=None):
    """augment: the recipe's options of the pil/torch train transform (utils.inputs.data.SampleAugment)."""
    train_tf, val_tf = reference_transforms() if backend == "old" else imagenet_transforms(**(augment or {}))
    tf = train_tf if train else val_tf
    if backend == "dali":
        from utils.inputs.dali import DaliImageFolder, DaliLoader
        return DaliLoader(subset(DaliImageFolder(root, tf, evaluate_once=not train), n), batch, workers, seed,
                          train=train, device=device)
    ds = subset(SafeImageFolder(root, tf, backend="pil" if backend == "old" else backend, evaluate_once=not train), n)
    # Persistent workers for `old` too: the measure is the steady state, not worker start-up.
    return EpochLoader(ds, batch, workers, seed, train=train, collate_fn=collate_skipping, persistent_workers=True,
                       pin_memory=torch.device(device).type == "cuda")


def recipe(args):
    return {"auto_augment": args.auto_augment, "random_erase": args.random_erase}


def measure(loader, epoch, cpu):
    """Images/s of one whole epoch (workers already started by the warm-up repeat). cpu: per second
    of this process's CPU time (all its threads) instead of wall time, so that other jobs on a
    shared machine do not count; only meaningful with -j 0, where all the work is in this process."""
    clock = time.process_time if cpu else time.perf_counter
    start, n = clock(), 0
    for images, _, _ in loader(epoch):
        n += images.shape[0]
    return n / (clock() - start)


def fmt(xs):
    return f"{statistics.median(xs):7.0f} [{min(xs):.0f}-{max(xs):.0f}]"


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.scale:
            return benchmark_scale.main(args)
        torch.set_num_threads(1)
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        if "dali" in backends:
            try:
                import nvidia.dali  # noqa: F401
            except ImportError:
                print("dali: not installed, skipped (pip install -r requirements-dali.txt)")
                backends.remove("dali")
        if (args.auto_augment or args.random_erase) and "dali" in backends:
            print("dali: skipped (main_imagenet.py refuses the recipe's augmentations with --data-backend dali)")
            backends.remove("dali")
        unknown = set(backends) - {"old", "pil", "torch", "dali"}
        if unknown:
            raise UserError(f"unknown backend(s): {', '.join(sorted(unknown))}")
        with tempfile.TemporaryDirectory() as tmp:
            if args.data is None:
                root = make_images(Path(tmp) / "images", args.images, args.seed)
            elif not args.data.is_dir():
                raise UserError(f"data folder not found: {args.data}")
            else:
                root = args.data
            report(args, root, backends)
            if args.train_arch:
                train_speed(args, root, backends)
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)


def cpu_name():
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())


def report(args, root, backends):
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision.io's decoders
    files = [Path(p) for p, _ in subset(SafeImageFolder(root), args.images).samples]
    sizes = [Image.open(f).size for f in files[:200]]
    kb = np.mean([f.stat().st_size for f in files]) / 1e3
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}, Python {platform.python_version()}")
    print(f"data: {len(files)} images from {root if args.data else 'generated'}, mean {kb:.0f} KB, "
          f"mean {np.mean([s[0] for s in sizes]):.0f}x{np.mean([s[1] for s in sizes]):.0f}; batch {args.batch}, "
          f"{args.repeats} interleaved repeats")

    modes = [("per core", 0)] + ([(f"-j {args.workers}", args.workers)] if args.workers else [])
    loaders = {(b, split, m): make_loader(b, root, args.images, split == "train", args.batch, w, args.seed,
                                             augment=recipe(args))
               for b in backends for split in ("train", "val") for m, w in modes}
    results = {k: [] for k in loaders}
    for r in range(args.repeats + 1):  # repeat 0 warms up (workers start, files in the page cache)
        for (b, split, m), loader in loaders.items():
            ips = measure(loader, r, cpu=m == "per core")
            if r:
                results[(b, split, m)].append(ips)
        if r:
            print(f"repeat {r}/{args.repeats} done", flush=True)

    def ratio(b, split, m):  # per repeat against `old` in the same repeat, then median [min-max]
        if "old" not in backends:
            return "-"
        rs = [x / y for x, y in zip(results[(b, split, m)], results[("old", split, m)])]
        return f"{statistics.median(rs):.2f}x [{min(rs):.2f}-{max(rs):.2f}]"

    j = f"-j {args.workers}"
    print()
    print("| backend | split | per core: images/s | vs old | cores/GPU R50 @3k | cores/GPU R18 @8k |"
          + (f" {j}: images/s | vs old |" if args.workers else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if args.workers else ""))
    for split in ("train", "val"):
        for b in backends:
            core = results[(b, split, "per core")]
            med = statistics.median(core)
            row = f"| {b} | {split} | {fmt(core)} | {ratio(b, split, 'per core')} |"
            row += "".join(f" {rate / med:.1f} |" for rate in GPU_RATES.values())
            if args.workers:
                row += f" {fmt(results[(b, split, j)])} | {ratio(b, split, j)} |"
            print(row)
    print("per core: images per CPU-second; -j: images per wall-clock second; median [min-max] over repeats; "
          "vs old: the per-repeat ratio to `old`, median [min-max]. "
          f"Load average at the end: {os.getloadavg()[0]:.1f}")


def train_speed(args, root, backends):
    """Training images/s of --train-arch fed by each backend (uint8 backends only) vs synthetic data."""
    from networks import create_net
    from utils.engine import _unpack
    device = torch.device(args.device)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    model = create_net(args.train_arch, "none", None, num_classes=1000).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    crit = torch.nn.CrossEntropyLoss()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(batch):
        images, target, _ = _unpack(batch, device, args.channels_last, amp_dtype=amp_dtype)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = crit(model(images), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # fp16 without a scaler: timing only
        opt.step()
        return images.shape[0]

    def batches(loader):
        epoch = 0
        while True:
            yield from loader(epoch)
            epoch += 1

    synthetic = (torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8, device=device),
                 torch.randint(0, 1000, (args.batch,)), [])
    feeds = {"synthetic (on device)": lambda: iter(lambda: synthetic, None)}
    for b in backends:
        if b != "old":
            feeds[f"{b} -j {args.workers}"] = lambda b=b: batches(make_loader(
                b, root, args.images, True, args.batch, args.workers, args.seed, device, recipe(args)))
    print(f"\n{args.train_arch} training on {device} (batch {args.batch}, amp {args.amp}, "
          f"channels_last {args.channels_last}, {args.steps} steps):")
    print("| input | images/s | ms/step |\n|---|---|---|")
    for name, make in feeds.items():
        it = make()
        for _ in range(5):
            step(next(it))
        sync()
        start, n = time.perf_counter(), 0
        for _ in range(args.steps):
            n += step(next(it))
        sync()
        dt = time.perf_counter() - start
        print(f"| {name} | {n / dt:.0f} | {1000 * dt / args.steps:.1f} |", flush=True)


if __name__ == "__main__":
    main()
