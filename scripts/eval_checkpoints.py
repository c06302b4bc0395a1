"""Evaluate checkpoints (ours or the authors' released ones) on a validation folder; print the table.

    python scripts/eval_checkpoints.py checkpoints/imagenet-resnet50-simam-param0.1 --data /data/imagenet
    python scripts/eval_checkpoints.py simam_r50.pth.tar simam_r18.pth.tar --data /data/imagenet/val -b 200

A checkpoint is a .pth.tar file or a run folder (its model_best.pth.tar). Our checkpoints record
arch, attention type and parameter, and the run's data folder, validation sizes, data backend and amp:
each is used unless given (a given value that differs is said), so `eval_checkpoints.py RUN` prints
the figure the run logged. The reference's record only `arch`, so the attention type is
found from the state_dict's layout (or --attention_type); SimAM's lambda leaves no trace in the
weights, so it is --attention_param, else 0.1 (the value of the reference's ImageNet runs).
Loading, data and evaluation are the trainer's own functions (utils.lifecycle.checkpoint, utils.inputs.data, utils.engine).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from networks import ATTENTION_CHOICES, IMAGENET_ARCHS, create_net  # noqa: E402
from utils import UserError, error_line  # noqa: E402
from utils.args import check_number, given, parse_args, parse_gpu_ids  # noqa: E402
from utils.lifecycle.checkpoint import (check_class_names, load_checkpoint, load_model_weights, model_state,  # noqa: E402
                                        recorded_settings)
from utils.inputs.data import (BACKENDS, EpochLoader, SafeImageFolder, check_image_folder, collate_skipping,  # noqa: E402
                               imagenet_transforms)
from utils.engine import evaluate  # noqa: E402
from utils.reporting.models import checkpoint_file  # noqa: E402
from utils.reporting.models import identify as identify_checkpoint  # noqa: E402
from utils.reporting.runs import csv_table, markdown_table, sort_rows, table_row  # noqa: E402
from utils.trainer import num_classes_of  # noqa: E402

def identify(ckpt, path, args):
    """(arch, attention_type, attention_param) of a checkpoint: recorded, given, or inferred (utils.reporting.models)."""
    return identify_checkpoint(ckpt, path, args.arch, args.attention_type, args.attention_param, archs=IMAGENET_ARCHS)


# The flags that decide a validation figure besides the weights, and their values for a checkpoint that
# records none (the reference's ImageNet protocol).
SETTINGS = {"val_resize_size": 256, "val_crop_size": 224, "data_backend": "torch", "amp": "off"}


def settings_for(path, rec, args):
    """{data: the val folder, val_resize_size, ...} for one checkpoint: given on the command line, else
    what its run recorded (checkpoint or args.json), else SETTINGS; a given value that differs from the
    record is said in one line."""
    told = given(args)
    out = {}
    for key, fallback in {"data": None, **SETTINGS}.items():
        mine, theirs = getattr(args, key), rec.get(key)
        if key in told:
            out[key] = mine
            if theirs is not None and str(theirs) != str(mine) and not (key == "data" and _same_val_dir(mine, theirs)):
                flag = "--" + key.replace("_", "-")
                print(f"note: {path}: {flag} {mine} given; its run was validated with {theirs}", file=sys.stderr)
        else:
            out[key] = theirs if theirs is not None else fallback
    if out["data"] is None:
        raise UserError(f"{path} records no data folder: pass --data DIR")
    data = Path(out["data"])
    out["data"] = data / "val" if (data / "val").is_dir() else data
    return out


def _same_val_dir(a, b):
    a, b = Path(a), Path(b)
    return a == b or a == b / "val" or a.resolve() == b.resolve() or a.resolve() == (b / "val").resolve()


def val_loader(s, args, device):
    """The trainer's validation data for settings `s` (the same transforms and backends as main_imagenet.py)."""
    _, val_tf = imagenet_transforms(val_resize_size=s["val_resize_size"], val_crop_size=s["val_crop_size"])
    if s["data_backend"] == "dali":
        from utils.inputs.dali import DaliImageFolder  # optional dependency, imported only when asked for
        dataset = DaliImageFolder(str(s["data"]), val_tf, evaluate_once=True)
    else:
        dataset = SafeImageFolder(str(s["data"]), val_tf, backend=s["data_backend"], evaluate_once=True)
    return EpochLoader(dataset, args.batch_size, args.workers, seed=0, train=False,
                       pin_memory=device.type == "cuda", collate_fn=collate_skipping)


def evaluate_checkpoint(path, args, device):
    ckpt = load_checkpoint(path)
    arch, att, param = identify(ckpt, path, args)
    s = settings_for(path, recorded_settings(ckpt, path), args)
    classes = check_image_folder(s["data"])
    n = num_classes_of(model_state(ckpt))
    if n != len(classes):
        raise UserError(f"{path} classifies {n} classes but {s['data']} has {len(classes)} class folders")
    check_class_names(ckpt, path, classes, s["data"])
    if s["amp"] == "fp16" and device.type != "cuda":
        raise UserError(f"{path}: --amp fp16 needs a GPU; pass --amp off (or bf16) to evaluate on the CPU")
    model = create_net(arch, att, param, num_classes=n)
    load_model_weights(model, ckpt, path)
    model.to(device)
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[s["amp"]]
    va = evaluate(model, val_loader(s, args, device)(0), device, amp_dtype=amp)
    print(f" * {path}: Acc@1 {va['acc1']:.3f} Acc@5 {va['acc5']:.3f} Loss {va['loss']:.4f} "
          f"({va['count']} images)", file=sys.stderr, flush=True)
    return table_row(arch, att, param, va["acc1"], va["acc5"], ckpt.get("epoch", "?"), path, n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help=".pth.tar files or run folders")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="validation class folders, or a root holding val/ (default: the one the run recorded)")
    p.add_argument("-a", "--arch", default=None, help="for checkpoints that do not record it")
    p.add_argument("--attention_type", default=None, choices=ATTENTION_CHOICES,
                   help="for checkpoints that do not record it (default: inferred from the weights)")
    p.add_argument("--attention_param", type=float, default=None)
    p.add_argument("-b", "--batch-size", type=int, default=256, dest="batch_size")
    p.add_argument("-j", "--workers", type=int, default=8)
    p.add_argument("--val-resize-size", type=int, default=SETTINGS["val_resize_size"], dest="val_resize_size",
                   help="(default: the run's, else 256)")
    p.add_argument("--val-crop-size", type=int, default=SETTINGS["val_crop_size"], dest="val_crop_size",
                   help="(default: the run's, else 224)")
    p.add_argument("--data-backend", default=SETTINGS["data_backend"], choices=BACKENDS, dest="data_backend",
                   help="image decoding (default: the run's, else torch)")
    p.add_argument("--amp", default=SETTINGS["amp"], choices=("off", "bf16", "fp16"),
                   help="mixed precision (default: the run's, else off)")
    p.add_argument("--gpu", default=None, metavar="ID", help="GPU id (default: the first; -1: CPU)")
    p.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    try:
        args = parse_args(p, argv)
        check_number("-b", args.batch_size, 1)
        check_number("-j", args.workers, 0)
        check_number("--val-resize-size", args.val_resize_size, 1)
        check_number("--val-crop-size", args.val_crop_size, 1)
        check_number("--attention_param", args.attention_param, 0, low_open=True)  # the module checks the rest
        ids = parse_gpu_ids(args.gpu)
        device = torch.device("cuda", (ids or [0])[0]) if torch.cuda.is_available() and ids != [] else torch.device("cpu")
        paths = [checkpoint_file(c) for c in args.checkpoints]
        rows = [evaluate_checkpoint(c, args, device) for c in paths]
    except UserError as e:
        sys.exit(f"error: {error_line(e)}")
    rows = sort_rows(rows)
    print(csv_table(rows) if args.csv else markdown_table(rows), end="")


if __name__ == "__main__":
    main()
