"""Cost of each attention module: the module alone and a full training step of a network.

    python scripts/benchmark.py                       # CPU, ResNet-50, batch 8 at 224, a few minutes
    python scripts/benchmark.py --device cuda --amp --channels-last --batch 64

For every attention type (none, se, cbam, simam: the fused default, simam-eager: the analytic
Function in plain ops, simam-formula: the paper's formula under autograd, and the later modules eca,
gc, srm, coordatt, triplet at their default parameters) it measures:
  module  forward+backward of the module alone on one tensor (default 16x256x56x56), next to
          `copy` -- four copy_ calls of that tensor (eight passes over it), the memory-traffic floor;
  network one training step (forward, cross-entropy, backward, SGD step) of --model;
each as the median over --repeats runs after --warmup runs, the variants interleaved within every
repeat so that machine noise (other jobs on a shared CPU) hits all of them alike; plus the
activation memory autograd keeps for backward (bytes of the distinct storages packed by
saved_tensors_hooks, weights that layers save included), images/s, and peak device memory on CUDA.
It prints tables of ratios against the plain network / the formula and writes --json-out.
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from torch import nn  # noqa: E402

from networks import MODELS, create_attention, create_net, model_names  # noqa: E402
from networks.attentions import simam_fused  # noqa: E402
from networks.attentions.simam import SimAM  # noqa: E402
from utils import UserError  # noqa: E402
from utils.args import check_number  # noqa: E402

VARIANTS = ("none", "se", "cbam", "simam", "simam-eager", "simam-formula", "eca", "gc", "srm", "coordatt", "triplet")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", choices=list(MODELS),
                   help="an ImageNet or CIFAR arch (CIFAR: 100 classes, 32x32, plus the device loader's images/s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="input height and width (default: 224; CIFAR archs 32)")
    p.add_argument("--module-shape", default="16,256,56,56", help="N,C,H,W of the module-alone tensor")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 on the CPU, float16 on CUDA)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each network (slow to start)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from: {', '.join(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-module", action="store_true")
    p.add_argument("--skip-network", action="store_true")
    p.add_argument("--lambda", dest="e_lambda", type=float, default=0.1, help="SimAM lambda (the ImageNet runs: 0.1)")
    p.add_argument("--json-out", default="bench_results.json")
    a = p.parse_args(argv)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad or not a.variants:
        p.error(f"unknown variant(s) {', '.join(bad) or '(none given)'}; choose from: {', '.join(VARIANTS)}")
    try:
        shape = tuple(int(s) for s in a.module_shape.split(","))
        assert len(shape) == 4 and min(shape) > 0
    except (ValueError, AssertionError):
        p.error(f"--module-shape wants four positive integers N,C,H,W, got {a.module_shape!r}")
    a.module_shape = shape
    a.cifar = a.model in model_names("cifar")
    a.size = (32 if a.cifar else 224) if a.size is None else a.size
    if min(a.batch, a.size, a.repeats) < 1 or a.warmup < 0:
        p.error("--batch, --size and --repeats must be >= 1, --warmup >= 0")
    try:
        check_number("--lambda", a.e_lambda, 0, low_open=True)
    except UserError as e:
        p.error(str(e))
    try:
        a.device = torch.device(a.device)
    except RuntimeError:
        p.error(f"unknown device {a.device!r}")
    if a.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    return a


# ---- measuring ---------------------------------------------------------------------------------

@contextlib.contextmanager
def saved_bytes(counter: dict):
    """Adds to counter["bytes"] the size of every distinct storage autograd saves for backward.

    Weights that layers save count too (as in the issue's 1.22x): what the graph keeps alive.
    """
    seen = set()

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            counter["bytes"] = counter.get("bytes", 0) + s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield counter


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def peak_memory(fn, device):
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def interleaved(cases: dict, args):
    """Seconds of every repeat per case; each repeat runs all cases once, in turn."""
    for _ in range(args.warmup):
        for fn in cases.values():
            fn()
    times = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, fn in cases.items():
            times[k].append(timed(fn, args.device))
    return times


def summary(times):
    """Median (the figure the tables rank by), min (least disturbed by other jobs) and every run, in ms."""
    return {"ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "runs_ms": [1e3 * t for t in times]}


def autocast(args):
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(args.device.type, dtype=torch.float16 if args.device.type == "cuda" else torch.bfloat16)


# ---- the two benchmarks ------------------------------------------------------------------------

def attention_module(variant, channels, e_lambda):
    if variant == "none":
        return nn.Identity()
    if variant.startswith("simam"):
        impl = {"simam": None, "simam-eager": "eager", "simam-formula": "formula"}[variant]
        return SimAM(channels, e_lambda, impl=impl)
    return create_attention(variant, channels)


def bench_module(args):
    n, c, h, w = args.module_shape
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, device=args.device).to(memory_format=fmt)
    if args.amp:  # what a network under autocast hands the module
        x = x.to(torch.float16 if args.device.type == "cuda" else torch.bfloat16)
    x.requires_grad_()
    g = torch.randn_like(x)
    mods = {v: attention_module(v, c, args.e_lambda).to(args.device).to(memory_format=fmt) for v in args.variants
            if v != "none"}

    def step(m):
        def run():
            x.grad = None
            with autocast(args):
                out = m(x)
            out.backward(g.to(out.dtype))
        return run

    dst = [torch.empty_like(x) for _ in range(4)]
    cases = {"copy": lambda: [d.copy_(x) for d in dst], **{v: step(m) for v, m in mods.items()}}
    secs = interleaved(cases, args)
    rows = {}
    for v, ts in secs.items():
        saved = {}
        if v != "copy":
            with saved_bytes(saved), autocast(args):
                mods[v](x)
        rows[v] = {**summary(ts), "saved_bytes": saved.get("bytes", 0), "peak_bytes": peak_memory(cases[v], args.device)}
    return rows


def bench_network(args):
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device).to(memory_format=fmt)
    y = torch.randint(0, 100 if args.cifar else 1000, (args.batch,), device=args.device)
    models, opts, steps = {}, {}, {}
    for v in args.variants:
        torch.manual_seed(0)
        m = create_net(args.model, "simam" if v.startswith("simam") else v, args.e_lambda if v.startswith("simam") else None,
                       num_classes=100 if args.cifar else 1000)
        for mod in m.modules():
            if isinstance(mod, SimAM):
                mod.impl = {"simam": None, "simam-eager": "eager", "simam-formula": "formula"}[v]
        m = m.to(args.device).to(memory_format=fmt).train()
        models[v] = m
        opts[v] = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        fwd = torch.compile(m) if args.compile else m

        def step(fwd=fwd, opt=opts[v]):
            opt.zero_grad(set_to_none=True)
            with autocast(args):
                loss = nn.functional.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()
        steps[v] = step
    secs = interleaved(steps, args)
    rows = {}
    for v, ts in secs.items():
        saved = {}
        with saved_bytes(saved), autocast(args):
            # eager forward: under --compile the compiled graph's choices are counted in peak memory instead
            models[v](x)
        rows[v] = {**summary(ts), "img_per_s": args.batch / statistics.median(ts), "saved_bytes": saved.get("bytes", 0),
                   "peak_bytes": peak_memory(steps[v], args.device)}
    return rows


def bench_cifar_loader(args, n=50000, epochs=2):
    """images/s of main_cifar.py's device-resident loader (crop + flip + normalize on the device)."""
    from utils.inputs.cifar import DeviceLoader, Split
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 100, (n,), generator=g))
    loader = DeviceLoader(split, args.batch, seed=0, train=True, device=args.device)
    times = []
    for epoch in range(epochs):
        sync(args.device)
        t0 = time.perf_counter()
        for x, _ in loader(epoch):
            pass
        sync(args.device)
        times.append(time.perf_counter() - t0)
    return {"images": n, "batch": args.batch, "img_per_s": n / min(times)}


# ---- report ------------------------------------------------------------------------------------

def ratio(a, b):
    return f"{a / b:.2f}x" if a is not None and b else "-"


def mb(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def module_table(rows):
    base = rows.get("simam-formula")
    out = ["| module | fwd+bwd ms | min ms | speed-up vs formula | x copy floor | saved for backward MB | saved vs formula |"
           + (" peak MB |" if rows["copy"]["peak_bytes"] is not None else ""),
           "|---|---|---|---|---|---|---|" + ("---|" if rows["copy"]["peak_bytes"] is not None else "")]
    for v, r in rows.items():
        line = (f"| {'copy floor (4x copy_)' if v == 'copy' else v} | {r['ms']:.2f} | {r['min_ms']:.2f} | "
                f"{ratio(base['ms'], r['ms']) if base else '-'} | {ratio(r['ms'], rows['copy']['ms'])} | "
                f"{mb(r['saved_bytes'])} | {ratio(r['saved_bytes'], base['saved_bytes']) if base else '-'} |")
        if r["peak_bytes"] is not None:
            line += f" {mb(r['peak_bytes'])} |"
        out.append(line)
    return "\n".join(out)


def network_table(rows):
    plain, formula = rows.get("none"), rows.get("simam-formula")
    cuda = next(iter(rows.values()))["peak_bytes"] is not None
    out = ["| attention | step ms | min ms | images/s | time vs none | min vs none | time vs simam-formula | saved MB | "
           "saved vs none | saved vs simam-formula |" + (" peak MB |" if cuda else ""),
           "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for v, r in rows.items():
        line = (f"| {v} | {r['ms']:.1f} | {r['min_ms']:.1f} | {r['img_per_s']:.1f} | {ratio(r['ms'], plain and plain['ms'])} | "
                f"{ratio(r['min_ms'], plain and plain['min_ms'])} | "
                f"{ratio(r['ms'], formula and formula['ms'])} | {mb(r['saved_bytes'])} | "
                f"{ratio(r['saved_bytes'], plain and plain['saved_bytes'])} | "
                f"{ratio(r['saved_bytes'], formula and formula['saved_bytes'])} |")
        if cuda:
            line += f" {mb(r['peak_bytes'])} |"
        out.append(line)
    return "\n".join(out)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # Linux names the model
        name = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    info = {"device": device_name(args.device), "torch": torch.__version__, "model": args.model,
            "batch": args.batch, "size": args.size, "module_shape": list(args.module_shape), "amp": args.amp,
            "channels_last": args.channels_last, "compile": args.compile, "warmup": args.warmup,
            "repeats": args.repeats, "lambda": args.e_lambda,
            "simam_impl": simam_fused.resolve_impl(), "load_average_before": os.getloadavg()}
    print(f"# {info['device']}, torch {info['torch']}, SIMAM_IMPL={info['simam_impl']}, "
          f"amp={args.amp}, channels_last={args.channels_last}, compile={args.compile}, "
          f"median of {args.repeats} after {args.warmup} warm-up, variants interleaved", flush=True)
    result = {"info": info}
    if not args.skip_module:
        result["module"] = bench_module(args)
        print(f"\n## Module alone, {'x'.join(map(str, args.module_shape))}, forward+backward\n")
        print(module_table(result["module"]), flush=True)
    if not args.skip_network:
        result["network"] = bench_network(args)
        print(f"\n## {args.model} training step, batch {args.batch}, {args.size}x{args.size}\n")
        print(network_table(result["network"]), flush=True)
    if args.cifar:
        result["cifar_loader"] = bench_cifar_loader(args)
        print(f"\nCIFAR device loader (main_cifar.py): {result['cifar_loader']['img_per_s']:,.0f} images/s "
              f"(random crop + flip + normalize on {args.device}, batch {args.batch}, 50,000 images)", flush=True)
    info["simam_compiled"] = simam_fused.compiled_available()
    info["load_average_after"] = os.getloadavg()
    print(f"\nload average before/after: {info['load_average_before'][0]:.2f} / {info['load_average_after'][0]:.2f}"
          f"; fused SimAM compiled: {info['simam_compiled']}")
    Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
