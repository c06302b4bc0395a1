"""Evaluate checkpoints (ours or the authors' released ones) on a validation folder; print the table.

    python scripts/eval_checkpoints.py checkpoints/imagenet-resnet50-simam-param0.1 --data /data/imagenet
    python scripts/eval_checkpoints.py simam_r50.pth.tar simam_r18.pth.tar --data /data/imagenet/val -b 200

A checkpoint is a .pth.tar file or a run folder (its model_best.pth.tar). Our checkpoints record
arch, attention type and parameter. The reference's record only `arch`, so the attention type is
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
from utils.args import check_number, parse_gpu_ids  # noqa: E402
from utils.lifecycle.checkpoint import load_checkpoint, load_model_weights, model_state  # noqa: E402
from utils.inputs.data import EpochLoader, SafeImageFolder, check_image_folder, collate_skipping, imagenet_transforms  # noqa: E402
from utils.engine import evaluate  # noqa: E402
from utils.reporting.models import checkpoint_file  # noqa: E402
from utils.reporting.models import identify as identify_checkpoint  # noqa: E402
from utils.reporting.runs import csv_table, markdown_table, sort_rows, table_row  # noqa: E402
from utils.trainer import num_classes_of  # noqa: E402

def identify(ckpt, path, args):
    """(arch, attention_type, attention_param) of a checkpoint: recorded, given, or inferred (utils.reporting.models)."""
    return identify_checkpoint(ckpt, path, args.arch, args.attention_type, args.attention_param, archs=IMAGENET_ARCHS)


def evaluate_checkpoint(path, val_dir, classes, args, device):
    ckpt = load_checkpoint(path)
    arch, att, param = identify(ckpt, path, args)
    n = num_classes_of(model_state(ckpt))
    if n != len(classes):
        raise UserError(f"{path} classifies {n} classes but {val_dir} has {len(classes)} class folders")
    model = create_net(arch, att, param, num_classes=n)
    load_model_weights(model, ckpt, path)
    model.to(device)
    _, val_tf = imagenet_transforms(val_resize_size=args.val_resize_size, val_crop_size=args.val_crop_size)
    loader = EpochLoader(SafeImageFolder(str(val_dir), val_tf), args.batch_size, args.workers, seed=0,
                         train=False, pin_memory=device.type == "cuda", collate_fn=collate_skipping)
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    va = evaluate(model, loader(0), device, amp_dtype=amp)
    print(f" * {path}: Acc@1 {va['acc1']:.3f} Acc@5 {va['acc5']:.3f} Loss {va['loss']:.4f} "
          f"({va['count']} images)", file=sys.stderr, flush=True)
    return table_row(arch, att, param, va["acc1"], va["acc5"], ckpt.get("epoch", "?"), path, n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help=".pth.tar files or run folders")
    p.add_argument("--data", required=True, metavar="DIR", help="validation class folders, or a root holding val/")
    p.add_argument("-a", "--arch", default=None, help="for checkpoints that do not record it")
    p.add_argument("--attention_type", default=None, choices=ATTENTION_CHOICES,
                   help="for checkpoints that do not record it (default: inferred from the weights)")
    p.add_argument("--attention_param", type=float, default=None)
    p.add_argument("-b", "--batch-size", type=int, default=256, dest="batch_size")
    p.add_argument("-j", "--workers", type=int, default=8)
    p.add_argument("--val-resize-size", type=int, default=256, dest="val_resize_size")
    p.add_argument("--val-crop-size", type=int, default=224, dest="val_crop_size")
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    p.add_argument("--gpu", default=None, metavar="ID", help="GPU id (default: the first; -1: CPU)")
    p.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    args = p.parse_args(argv)
    try:
        check_number("-b", args.batch_size, 1)
        check_number("-j", args.workers, 0)
        check_number("--val-resize-size", args.val_resize_size, 1)
        check_number("--val-crop-size", args.val_crop_size, 1)
        check_number("--attention_param", args.attention_param, 0, low_open=True)  # the module checks the rest
        data = Path(args.data)
        val_dir = data / "val" if (data / "val").is_dir() else data
        classes = check_image_folder(val_dir)
        ids = parse_gpu_ids(args.gpu)
        device = torch.device("cuda", (ids or [0])[0]) if torch.cuda.is_available() and ids != [] else torch.device("cpu")
        paths = [checkpoint_file(c) for c in args.checkpoints]
        rows = [evaluate_checkpoint(c, val_dir, classes, args, device) for c in paths]
    except UserError as e:
        sys.exit(f"error: {error_line(e)}")
    rows = sort_rows(rows)
    print(csv_table(rows) if args.csv else markdown_table(rows), end="")


if __name__ == "__main__":
    main()
