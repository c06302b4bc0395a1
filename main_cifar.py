"""Train or evaluate a CIFAR-10/100 classifier with a pluggable attention module.

    python main_cifar.py --dataset cifar100 --dataset_dir DIR -a resnet20 --attention_type simam --attention_param 1e-4
    torchrun --nproc_per_node=2 main_cifar.py --dataset cifar10 --dataset_dir DIR -a resnet56   # DDP; -b: total
    python main_cifar.py --dataset cifar100 --dataset_dir DIR -a resnet20 -e \\
        --resume checkpoints/cifar100-resnet20/model_best.pth.tar

DIR holds the extracted python archives (cifar-10-batches-py/ or cifar-100-python/); nothing is
downloaded. The defaults are the reference's recipe (164 epochs, lr 0.1 x0.1 after epochs 81 and
122, weight decay 5e-4, batch 128, test batch 100). The loop, checkpoints, resume, metrics and AMP
are main_imagenet.py's (utils/trainer.py); only the data (utils/inputs/cifar.py) and the schedule differ.
Docs: docs/cifar.md.
"""
import argparse
import functools
import math

import torch

from networks import ATTENTION_CHOICES, create_net, model_names
from utils import cli_main
from utils.args import get_args_parser as common_args_parser
from utils.args import add_recipe_args, check_number, parse_args, set_help
from utils.inputs.cifar import CIFAR_MEAN, CIFAR_STD, DeviceLoader, read_classes, read_split
from utils.inputs.data import SampleAugment, augment_options
from utils.schedule import lr_at, schedule_from_args
from utils.trainer import Task, run

# The reference's main_cifar.py flag names, accepted as aliases of ours.
REFERENCE_ALIASES = {"batch_size": "--batch_size", "epochs": "--num_epoch", "lr": "--base_lr",
                     "momentum": "--beta1", "weight_decay": "--weight_decay", "print_freq": "--disp_iter",
                     "gpu": "--gpu_ids", "test_batch_size": "--test_batch_size"}


def get_args_parser():
    p = common_args_parser("PyTorch CIFAR-10/100 training and evaluation (SimAM reproduction)",
                           archs=model_names("cifar"))
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100"),
                   help="%(choices)s (default: %(default)s)")
    p.add_argument("--dataset_dir", default="data", metavar="DIR",
                   help="folder holding cifar-10-batches-py/ or cifar-100-python/ (default: %(default)s)")
    p.add_argument("--test-batch-size", default=100, type=int, dest="test_batch_size", metavar="N",
                   help="total evaluation batch size (default: %(default)s)")
    p.add_argument("--milestones", default=[81, 122], type=int, nargs="+", metavar="E",
                   help="lr x gamma once the 0-based epoch index passes each, as the reference's "
                        "`epoch <= 81` test (default: %(default)s, i.e. 82 + 41 + 41 epochs)")
    p.add_argument("--gamma", default=0.1, type=float, metavar="G",
                   help="lr factor at each milestone (default: %(default)s)")
    p.add_argument("--warmup", action="store_true",
                   help="the reference's warm-up for deep nets: lr 0.01 during the first epoch")
    add_recipe_args(p)
    p.set_defaults(arch="resnet20", epochs=164, batch_size=128, lr=0.1, weight_decay=5e-4, print_freq=100)
    set_help(p, cos_lr="cosine learning rate, updated every iteration (default: off, x --gamma at --milestones)",
             workers="unused: the data lives on the training device and is augmented there in batches "
                     "(default: %(default)s)")
    actions = {a.dest: a for a in p._actions}
    for dest, flag in REFERENCE_ALIASES.items():
        p.add_argument(flag, dest=dest, type=actions[dest].type, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


@functools.cache
def split(root, dataset, train):  # read once: classes() checks the files, datasets() reuses them
    return read_split(root, dataset, train)


def classes(args):
    names = read_classes(args.dataset_dir, args.dataset)
    split(args.dataset_dir, args.dataset, False)
    if not args.evaluate:
        split(args.dataset_dir, args.dataset, True)
    return names


def datasets(args, train=True):
    test = split(args.dataset_dir, args.dataset, False)
    return (split(args.dataset_dir, args.dataset, True) if train else None), test


def model(args, num_classes):
    return create_net(args.arch, args.attention_type, args.attention_param, num_classes=num_classes)


def device_loader(split, batch_size, workers, seed, rank=0, world_size=1, train=True, pin_memory=False,
                  collate_fn=None, *, test_batch_size, ra_reps=1, augment=None):
    """Called as EpochLoader is (through make_loader). pin_memory=True exactly when the run is on
    CUDA, and init_distributed has made this rank's GPU the current device. augment: the recipe's
    per-image options (utils.inputs.data.augment_options)."""
    device = torch.device("cuda", torch.cuda.current_device()) if pin_memory else torch.device("cpu")
    if not train:
        batch_size = math.ceil(test_batch_size / world_size)
    return DeviceLoader(split, batch_size, seed, rank, world_size, train=train, device=device, ra_reps=ra_reps,
                        augment=SampleAugment(**(augment or {}), mean=CIFAR_MEAN, std=CIFAR_STD))


def make_loader(args):
    # A partial, not a closure: the Task travels to the processes --nproc / --gpu 0,1,.. start.
    return functools.partial(device_loader, test_batch_size=args.test_batch_size, ra_reps=args.ra_reps,
                             augment=augment_options(args))


def schedule(args, iters_per_epoch):
    if args.lr_scheduler:  # torchvision's per-epoch schedule (--lr-scheduler cosineannealinglr)
        return schedule_from_args(args, iters_per_epoch)
    milestones = [m + 1 for m in args.milestones]  # lr_at drops at epoch >= m, the reference at epoch > m

    def lr_fn(epoch, it):
        if args.warmup and epoch == 0:
            return 0.01
        return lr_at(epoch, it, iters_per_epoch, args.lr, args.epochs, cos=args.cos_lr,
                     warmup_epochs=args.warmup_epochs, gamma=args.gamma, milestones=milestones,
                     ref_shift=args.cos_ref_shift, warmup_method=args.lr_warmup_method,
                     warmup_decay=args.lr_warmup_decay)
    return lr_fn


def check_schedule_args(args):
    """CIFAR's own numbers (the trainer's check_args checks the common ones)."""
    check_number("--test-batch-size", args.test_batch_size, 1)
    check_number("--gamma", args.gamma, 0, low_open=True)  # 0 would stop training at the first milestone
    for m in args.milestones:
        check_number("--milestones", m, 0)
    return args


def make_task(args):
    return Task(name=args.dataset, archs=model_names("cifar"), attentions=ATTENTION_CHOICES, classes=classes,
                datasets=datasets, model=model, image_size=32, loader=make_loader(args), schedule=schedule)


def main(argv=None):
    def go():
        args = check_schedule_args(parse_args(get_args_parser(), argv))
        return run(args, make_task(args))
    return cli_main(go)


if __name__ == "__main__":
    main()
