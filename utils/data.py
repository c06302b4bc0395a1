"""Datasets, transforms, samplers and loaders. Nothing here knows about the training loop.

Unreadable images: skip-and-count. ImageNet has 1.28M files, so nothing decodes them all up front;
`check_image_folder` only checks the layout (fast). When a file fails to decode, `SafeImageFolder`
returns the next readable sample instead (so batch sizes, and DDP's collective calls, stay the same
on every rank) and reports the bad path with the batch; the loop counts and logs them. More than
`MAX_BAD_IN_A_ROW` unreadable files in a row stops the run: that is a broken folder, not a bad file.
"""
import itertools
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate
from torchvision import datasets, transforms

from . import UserError
from .imagefiles import walk_images
from .preempt import end_workers_at_exit, ignore_stop_signals_in_worker

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_BAD_IN_A_ROW = 16


def imagenet_transforms(train_crop_size=224, val_resize_size=256, val_crop_size=224):
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = transforms.Compose([
        transforms.RandomResizedCrop(train_crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    val = transforms.Compose([
        transforms.Resize(val_resize_size),
        transforms.CenterCrop(val_crop_size),
        transforms.ToTensor(),
        normalize,
    ])
    return train, val


def check_image_folder(root):
    """Fast layout check of an ImageFolder split; returns the sorted class names.

    Lists directories only (one scandir per class), so it costs seconds even on ImageNet.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UserError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    exts = datasets.folder.IMG_EXTENSIONS
    for c in classes:
        with os.scandir(root / c) as it:
            if not any(e.name.lower().endswith(exts) for e in it):
                raise UserError(f"class folder has no images: {root / c}")
    return classes


def check_data_root(data, need_train=True):
    """Check DATA/train and DATA/val; returns the class names (train and val must agree)."""
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"data folder not found: {data}")
    val = check_image_folder(data / "val")
    if need_train:
        train = check_image_folder(data / "train")
        if train != val:
            extra = sorted(set(train) ^ set(val))
            raise UserError(f"train and val class folders differ in {data}: e.g. {extra[:3]}")
    return val


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder whose items are (image, target, skipped_paths): see the module docstring.

    Files are listed in ImageFolder's order, but a directory symlink loop is an error (utils.imagefiles).
    """

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        is_image = is_valid_file or (lambda name: name.lower().endswith(tuple(extensions)))
        return [(path, class_to_idx[c]) for c in sorted(class_to_idx)
                for path in walk_images(os.path.join(directory, c), is_image)]

    def __getitem__(self, index):
        skipped = []
        for k in range(MAX_BAD_IN_A_ROW + 1):
            path, target = self.samples[(index + k) % len(self.samples)]
            try:
                sample = self.loader(path)
            except Exception:  # PIL raises several types for truncated/garbage files
                skipped.append(path)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            return sample, target, tuple(skipped)
        raise UserError(f"{len(skipped)} unreadable images in a row, e.g. {skipped[0]}")


def collate_skipping(batch):
    """default_collate for (image, target), plus the concatenated skipped paths of the batch."""
    images, targets = default_collate([b[:2] for b in batch])
    return images, targets, [p for b in batch for p in b[2]]


class ShardSampler(Sampler):
    """Rank r of w gets the contiguous slice [r*n//w, (r+1)*n//w): every index exactly once,
    no padding, so evaluation sums over ranks equal a single-process evaluation."""

    def __init__(self, n, rank=0, world_size=1):
        self.start, self.stop = rank * n // world_size, (rank + 1) * n // world_size

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self):
        return self.stop - self.start


def worker_seed(seed, epoch, rank):
    """Base seed of the loader's workers: a pure function of (seed, epoch, rank), so a resumed run
    draws the same augmentations as an uninterrupted one."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**63)


class SkipFirst(Sampler):
    """The indices of `sampler` after its first `n`: a resumed epoch loads none of the batches it
    already trained on, and the rest come in the uninterrupted epoch's order."""

    def __init__(self, sampler, n):
        self.sampler, self.n = sampler, n

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.n, None)

    def __len__(self):
        return max(0, len(self.sampler) - self.n)


class EpochLoader:
    """A DataLoader whose shuffling and worker seeds depend only on (seed, epoch, rank).

    `loader(epoch, start_batch=0)` returns the DataLoader for that epoch from batch `start_batch`
    on (a mid-epoch resume); `len(loader)` is the full epoch's number of batches. Training samplers
    are DistributedSampler (with world_size 1 in a single process), so the order is a function of
    (seed, epoch).
    """

    def __init__(self, dataset, batch_size, workers, seed, rank=0, world_size=1, train=True,
                 pin_memory=False, collate_fn=None):
        if train:
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                              shuffle=True, seed=seed, drop_last=False)
        else:
            self.sampler = ShardSampler(len(dataset), rank, world_size)
        if workers:
            end_workers_at_exit()
        self.generator = torch.Generator()
        self.seed, self.rank, self.batch_size = seed, rank, batch_size
        self.options = dict(dataset=dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                            drop_last=train,  # train: no 1-image batches for BatchNorm
                            generator=self.generator, collate_fn=collate_fn,
                            worker_init_fn=ignore_stop_signals_in_worker,
                            persistent_workers=False)  # fresh workers each epoch, seeded from that epoch's generator

    def __call__(self, epoch=0, start_batch=0):
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(worker_seed(self.seed, epoch, self.rank))
        sampler = SkipFirst(self.sampler, start_batch * self.batch_size) if start_batch else self.sampler
        return DataLoader(sampler=sampler, **self.options)

    def __len__(self):
        n, b = len(self.sampler), self.batch_size
        return n // b if self.options["drop_last"] else -(-n // b)
