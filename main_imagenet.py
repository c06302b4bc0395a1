"""Train or evaluate an ImageNet classifier with a pluggable attention module.

    python main_imagenet.py DATA -a resnet50 --attention_type simam --attention_param 0.1
    torchrun --nproc_per_node=4 main_imagenet.py DATA -a resnet50 ...   # DDP, -b is the total batch
    python main_imagenet.py DATA -a resnet50 -e --resume checkpoints/imagenet-resnet50/model_best.pth.tar

Without DATA the built-in demo dataset (data/demo/, generated on first use) is used.
Docs: docs/imagenet.md. The loop lives in utils/ (trainer.py, engine.py) and is shared with main_cifar.py.
"""
import dataclasses
import functools

from networks import ATTENTION_CHOICES, IMAGENET_ARCHS, create_net
from utils import UserError, cli_main
from utils.args import get_args_parser as common_args_parser
from utils.args import add_recipe_args, parse_args
from utils.inputs.data import (BACKENDS, SafeImageFolder, augment_options, check_data_root, collate_skipping,
                               imagenet_loader, imagenet_transforms)
from utils.inputs.demo_data import ensure_demo_dataset
from utils.trainer import Task, run


def get_args_parser():
    p = common_args_parser("PyTorch ImageNet training and evaluation (SimAM reproduction)", archs=IMAGENET_ARCHS)
    p.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="ImageFolder root with train/ and val/, any number of classes "
                        "(default: the built-in demo dataset, data/demo/)")
    p.add_argument("--train-crop-size", default=224, type=int, dest="train_crop_size", metavar="S",
                   help="RandomResizedCrop size of training images (default: %(default)s)")
    p.add_argument("--val-resize-size", default=256, type=int, dest="val_resize_size", metavar="S",
                   help="validation: Resize of the shorter side (default: %(default)s)")
    p.add_argument("--val-crop-size", default=224, type=int, dest="val_crop_size", metavar="S",
                   help="validation: CenterCrop size after the resize (default: %(default)s)")
    p.add_argument("--data-backend", default="torch", choices=BACKENDS, dest="data_backend",
                   help="image decoding: torch (decode_jpeg + transforms.v2 on uint8), pil (PIL decode "
                        "and resize), dali (NVIDIA DALI, nvJPEG on the GPU; pip install -r requirements-dali.txt) "
                        "(default: %(default)s)")
    return add_recipe_args(p)


def data_root(args):
    if args.data is None:  # the built-in demo dataset, generated on first use
        args.data = str(ensure_demo_dataset())
    return args.data


# The recipe's data flags, which the DALI pipeline (utils/inputs/dali.py) does not implement.
DATA_RECIPE_FLAGS = {"auto_augment": None, "random_erase": 0.0, "ra_reps": 1}


def check_backend(args):
    if getattr(args, "data_backend", "torch") == "dali":
        for dest, off in DATA_RECIPE_FLAGS.items():
            if getattr(args, dest, off) != off:
                raise UserError(f"--{dest.replace('_', '-')} is not implemented for --data-backend dali; "
                                f"use --data-backend torch")


def classes(args):
    check_backend(args)
    return check_data_root(data_root(args), need_train=not args.evaluate)


def datasets(args, train=True):
    root = data_root(args)
    train_tf, val_tf = imagenet_transforms(args.train_crop_size, args.val_resize_size, args.val_crop_size,
                                           **augment_options(args))
    backend = getattr(args, "data_backend", "torch")
    if backend == "dali":
        from utils.inputs.dali import DaliImageFolder  # optional dependency, imported only when asked for
        return ((DaliImageFolder(f"{root}/train", train_tf) if train else None),
                DaliImageFolder(f"{root}/val", val_tf, evaluate_once=True))
    val = SafeImageFolder(f"{root}/val", val_tf, backend=backend, evaluate_once=True)
    return (SafeImageFolder(f"{root}/train", train_tf, backend=backend) if train else None), val


def model(args, num_classes):
    return create_net(args.arch, args.attention_type, args.attention_param, num_classes=num_classes)


TASK = Task(name="imagenet", archs=IMAGENET_ARCHS, attentions=ATTENTION_CHOICES, classes=classes,
            datasets=datasets, model=model, collate_fn=collate_skipping, loader=imagenet_loader)


def make_task(args):
    """TASK with the run's repeated-augmentation sampler (--ra-reps) in its training loader."""
    return dataclasses.replace(TASK, loader=functools.partial(imagenet_loader, ra_reps=args.ra_reps))


def main(argv=None):
    def go():
        args = parse_args(get_args_parser(), argv)
        return run(args, make_task(args))
    return cli_main(go)


if __name__ == "__main__":
    main()
