"""Datasets, transforms, samplers and loaders. Nothing here knows about the training loop.

Input pipeline (docs/input-pipeline.md): workers decode JPEGs with `torchvision.io.decode_jpeg`
(PIL for what it cannot read), crop/resize/flip uint8 tensors with `torchvision.transforms.v2`, and
batches travel as uint8 NCHW; `normalize_uint8` turns them into normalized floats on the device.
Every random draw of a sample's augmentation comes from `sample_seed(seed, epoch, index)`, so the
images do not depend on -j, on the number of processes, or on where an epoch was resumed.

Unreadable images: skip-and-count. ImageNet has 1.28M files, so nothing decodes them all up front;
`check_image_folder` only checks the layout (fast). When a file fails to decode, `SafeImageFolder`
returns the next readable sample instead (so batch sizes, and DDP's collective calls, stay the same
on every rank) and reports the bad path with the batch; the loop counts and logs them. In validation
the replacement carries the target UNREADABLE and the loop drops it (engine._unpack), so every
readable image is evaluated exactly once. More than `MAX_BAD_IN_A_ROW` unreadable files in a row
stops the run: that is a broken folder, not a bad file.
"""
import io
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate
from torchvision import datasets, transforms
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .. import UserError
from .imagefiles import has_image, walk_images
from .shared import SharedArray
from ..lifecycle.processes import end_workers_at_exit, ignore_stop_signals_in_worker, worker_start_method

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_BAD_IN_A_ROW = 16
UNREADABLE = -1  # validation target of a replacement image: not evaluated (see engine._unpack)
BACKENDS = ("torch", "pil", "dali")
_M64 = (1 << 64) - 1


# ---- seeding ---------------------------------------------------------------------------------

def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def sample_seed(seed, epoch, index):
    """The seed of one sample's augmentation: a pure function of (seed, epoch, index), hashed so that
    neighbouring samples and epochs get unrelated streams."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ epoch) ^ index) >> 1


def rrc_params(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) of a RandomResizedCrop window, drawn from `rng` (a random.Random).

    The distribution of torchvision's RandomResizedCrop.get_params: area fraction uniform in
    `scale`, log aspect uniform in log(`ratio`), 10 tries, then the central crop of the nearest
    allowed aspect. Our own RNG instead of the global one is what makes it seedable per sample.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ---- decoding and transforms -----------------------------------------------------------------

def pil_rgb(img):
    """A PIL image as 8-bit RGB. 16-bit grayscale (mode I;16*, e.g. a 16-bit PNG) keeps its top 8 bits
    (value >> 8), where convert("RGB") would clip it to white; 32-bit integer or float images outside
    0-255 are refused (ValueError naming the mode: no one scale fits them). Colour 16-bit PNGs already
    open as 8-bit RGB(A) (PIL keeps the high byte)."""
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))  # mode L
    elif img.mode in ("I", "F"):
        lo, hi = img.getextrema()
        if lo < 0 or hi > 255:
            raise ValueError(f"a {'32-bit integer' if img.mode == 'I' else 'float'} image with values "
                             f"{lo}..{hi}: no 8-bit scale fits it; convert it to 8 or 16 bits")
    return img.convert("RGB")


def pil_loader(path):
    with open(path, "rb") as f:
        return pil_rgb(Image.open(f))


def check_pixels(data):
    """PIL's decompression-bomb rule for decoders other than PIL: raises Image.DecompressionBombError when
    the encoded image's header declares more than 2 * PIL.Image.MAX_IMAGE_PIXELS pixels (178,956,970 by
    default), as PIL (the pil backend, COCO, DALI's header read) refuses it; so every backend skips the
    same images (docs/input-pipeline.md). Reads the header only; a header PIL cannot parse is left to the decoder."""
    try:
        with Image.open(io.BytesIO(data)):
            pass
    except Image.DecompressionBombError:
        raise
    except Exception:  # not PIL's to judge: decode_jpeg decides whether the file is readable
        pass


def tensor_loader(path):
    """uint8 RGB CHW tensor: libjpeg-turbo through decode_jpeg; PIL for the rest (PNG named .JPEG,
    odd colour spaces). Raises for files neither can read, and (check_pixels) for images above PIL's
    decompression-bomb limit."""
    data = read_file(str(path))
    check_pixels(data.numpy())
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        return F.pil_to_tensor(pil_loader(path))


LOADERS = {"torch": tensor_loader, "pil": pil_loader}


def _as_uint8_tensor(img):
    return img if isinstance(img, torch.Tensor) else F.pil_to_tensor(img)


def auto_augment_policy(name, ra_magnitude=9, augmix_severity=3):
    """torchvision.transforms.v2's policy for --auto-augment NAME (None: none), bilinear as the
    classification reference's default --interpolation."""
    if name is None:
        return None
    bilinear = v2.InterpolationMode.BILINEAR
    if name == "ta_wide":
        return v2.TrivialAugmentWide(interpolation=bilinear)
    if name == "ra":
        return v2.RandAugment(interpolation=bilinear, magnitude=ra_magnitude)
    if name == "augmix":
        return v2.AugMix(interpolation=bilinear, severity=augmix_severity)
    return v2.AutoAugment(v2.AutoAugmentPolicy(name), interpolation=bilinear)  # imagenet, cifar10


class SampleAugment:
    """The recipe's per-sample augmentations after the crop and flip, where torchvision's classification
    reference has them: the --auto-augment policy on the uint8 image, then (--random-erase P)
    v2.RandomErasing(P, value=0) on the normalized float image. Returns uint8 CHW without erasing,
    the normalized float32 image with it (normalize_uint8's float operations, so the pixels it does not
    erase are those the device would compute).

    v2's transforms draw from torch's global CPU generator: it is seeded from the sample's seed inside
    fork_rng, so the draws are a pure function of (seed, epoch, index) and nothing else's RNG moves.
    """

    def __init__(self, auto_augment=None, random_erase=0.0, ra_magnitude=9, augmix_severity=3,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.policy = auto_augment_policy(auto_augment, ra_magnitude, augmix_severity)
        self.erase = v2.RandomErasing(p=random_erase, value=0) if random_erase > 0 else None
        self.mean, self.std = mean, std

    def __bool__(self):
        return self.policy is not None or self.erase is not None

    def __call__(self, img, seed):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_splitmix64(seed) >> 1)  # a stream apart from rrc_params' one
            if self.policy is not None:
                img = self.policy(img)
            if self.erase is not None:
                img = self.erase(normalize_uint8(img[None], mean=self.mean, std=self.std)[0])
        return img


class TrainTransform:
    """RandomResizedCrop + horizontal flip on a uint8 tensor (or PIL image) -> uint8 CHW tensor,
    every draw from sample_seed(...). `seeded` tells SafeImageFolder to pass the seed.
    Recipe options (auto_augment, random_erase, ...): SampleAugment after the flip; with
    random_erase > 0 the result is the normalized float32 image (see SampleAugment)."""
    seeded = True

    def __init__(self, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), **augment):
        self.size, self.scale, self.ratio = size, scale, ratio
        self.augment = SampleAugment(**augment)

    def params(self, height, width, seed):
        """((top, left, h, w), flip) for an image of that size: shared with the DALI backend."""
        rng = random.Random(seed)
        return rrc_params(height, width, rng, self.scale, self.ratio), rng.random() < 0.5

    def __call__(self, img, seed):
        h, w = F.get_size(img)
        (top, left, ch, cw), flip = self.params(h, w, seed)
        img = F.resized_crop(img, top, left, ch, cw, [self.size, self.size], antialias=True)
        if flip:
            img = F.horizontal_flip(img)
        img = _as_uint8_tensor(img)
        if self.augment:
            img = self.augment(img, seed)
        return img.contiguous()


class ValTransform:
    """Resize (shorter side) + CenterCrop -> uint8 CHW tensor; deterministic."""
    seeded = True

    def __init__(self, resize_size=256, crop_size=224):
        self.resize_size, self.crop_size = resize_size, crop_size

    def __call__(self, img, seed=None):
        img = F.resize(img, [self.resize_size], antialias=True)
        return _as_uint8_tensor(F.center_crop(img, [self.crop_size, self.crop_size])).contiguous()


def imagenet_transforms(train_crop_size=224, val_resize_size=256, val_crop_size=224, **augment):
    """(train, val) transforms of the uint8 pipeline; they take a PIL image or a uint8 tensor.
    `augment`: the recipe's SampleAugment options (auto_augment, random_erase, ...) of the train one."""
    return TrainTransform(train_crop_size, **augment), ValTransform(val_resize_size, val_crop_size)


def augment_options(args):
    """The recipe's SampleAugment options from the parsed flags (utils.args.add_recipe_args)."""
    return {"auto_augment": args.auto_augment, "random_erase": args.random_erase,
            "ra_magnitude": args.ra_magnitude, "augmix_severity": args.augmix_severity}


def reference_transforms(train_crop_size=224, val_resize_size=256, val_crop_size=224):
    """The previous float pipeline (PIL, ToTensor, Normalize on the CPU, global RNG): kept as the
    reference for the equivalence tests and scripts/benchmark_loader.py."""
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


_STATS = {}


def normalize_uint8(images, dtype=torch.float32, channels_last=False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 NCHW (on its device) -> (x / 255 - mean) / std in `dtype`, in three elementwise kernels.

    The same float32 operations as ToTensor + Normalize, so the result equals the old CPU path bit
    for bit (rounded once to `dtype` at the end, e.g. the autocast dtype). The layout change to
    channels_last happens in the first kernel, which also converts to float.
    """
    key = (images.device, mean, std)
    if key not in _STATS:
        _STATS[key] = tuple(torch.tensor(v, dtype=torch.float32, device=images.device).view(-1, 1, 1)
                            for v in (255.0, mean, std))
    c255, m, s = _STATS[key]
    fmt = torch.channels_last if channels_last and images.dim() == 4 else torch.contiguous_format
    x = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=fmt)
    # 255 as a device tensor, not a Python number: CUDA turns division by a CPU scalar into
    # multiplication by its reciprocal, which is not bit-identical to ToTensor's x / 255.
    torch.div(images, c255, out=x)
    x.sub_(m)
    out = x if dtype == torch.float32 else torch.empty_like(x, dtype=dtype)
    return torch.div(x, s, out=out)


def check_image_folder(root):
    """Fast layout check of an ImageFolder split; returns the sorted class names.

    A class needs one image at any depth below its folder, as SafeImageFolder (ImageFolder) reads nested
    images too; the search stops at the first image, so a class folder holding its images directly costs
    one directory listing and the check costs seconds even on ImageNet.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UserError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    exts = datasets.folder.IMG_EXTENSIONS
    for c in classes:
        if not has_image(root / c, lambda name: name.lower().endswith(exts)):
            raise UserError(f"class folder has no images: {root / c} (none at any depth below it)")
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


class SampleIndex:
    """An ImageFolder's (path, target) list held in three flat arrays shared with the loader workers
    (utils.inputs.shared): the class folders' paths once, each file's path below its class folder as
    one byte buffer with offsets, the targets as integers. 1.28M entries take ~40 MB, once for all
    processes, where a list of tuples costs ~300 MB in every worker. Items are ImageFolder's
    (path, target) tuples; slicing gives another SampleIndex."""

    def __init__(self, folders, names, offsets, targets):
        self.folders = list(folders)  # class folder path of each target, as the walk wrote it
        self.names = names if isinstance(names, SharedArray) else SharedArray(names)
        self.offsets = offsets if isinstance(offsets, SharedArray) else SharedArray(offsets)
        self.targets = targets if isinstance(targets, SharedArray) else SharedArray(targets)

    @classmethod
    def walk(cls, directory, class_to_idx, is_image):
        """The samples of ImageFolder's make_dataset (classes sorted, files walked in sorted order),
        listed one class folder at a time so that no list of all paths is ever built."""
        folders = [""] * (max(class_to_idx.values(), default=-1) + 1)
        chunks, lengths, targets = [], [], []
        for c in sorted(class_to_idx):
            folder = os.path.join(directory, c)
            paths = walk_images(folder, is_image)
            prefix = str(Path(folder))  # walk_images's paths start with the folder as Path writes it
            folders[class_to_idx[c]] = prefix
            names = [os.fsencode(p[len(prefix):]) for p in paths]
            chunks.append(b"".join(names))
            lengths.append(np.fromiter(map(len, names), np.int64, len(names)))
            targets.append(np.full(len(names), class_to_idx[c], np.int32))
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(folders, np.frombuffer(b"".join(chunks), np.uint8),
                   offsets, np.concatenate(targets) if targets else np.zeros(0, np.int32))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        target = int(self.targets.array[i])  # IndexError out of range
        i = i + len(self) if i < 0 else i
        start, stop = self.offsets.array[i], self.offsets.array[i + 1]
        return self.folders[target] + os.fsdecode(self.names.array[start:stop].tobytes()), target

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, rows):
        """The SampleIndex of these rows (a subset or reordering)."""
        rows = np.asarray(rows, np.int64)
        starts, stops = self.offsets.array[rows], self.offsets.array[rows + 1]
        lengths = stops - starts
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # every byte of the chosen names: for each, its start plus 0..length-1
        pos = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return SampleIndex(self.folders, self.names.array[pos], offsets, self.targets.array[rows])


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder whose items are (image, target, skipped_paths): see the module docstring.

    backend: "torch" (decode_jpeg, PIL fallback) or "pil" (PIL decode and resize). Items may be
    indexed by `index` or by `(index, seed)` (what EpochLoader's batches hold); seeded transforms
    (TrainTransform, ValTransform) get that seed, plain callables only the image.
    evaluate_once: a replacement image gets the target UNREADABLE (validation: the loop drops it,
    so it is not evaluated twice). skipped_paths holds the sample's own file only when unreadable:
    a bad file met while looking for a replacement is reported by its own index, so counts are
    files, not skip events. Files are listed in ImageFolder's order, but a directory symlink loop
    is an error (utils.inputs.imagefiles). `samples` is a SampleIndex (flat shared arrays: what
    every loader worker receives), `targets` a numpy array.
    """

    def __init__(self, root, transform=None, backend="torch", evaluate_once=False):
        if backend not in LOADERS:
            raise UserError(f"unknown image backend {backend!r} for SafeImageFolder; choose one of: {', '.join(LOADERS)}")
        datasets.VisionDataset.__init__(self, root, transform=transform)
        self.classes, self.class_to_idx = self.find_classes(self.root)
        self.extensions = datasets.folder.IMG_EXTENSIONS
        suffixes = tuple(self.extensions)
        self.samples = SampleIndex.walk(self.root, self.class_to_idx, lambda name: name.lower().endswith(suffixes))
        self.loader = LOADERS[backend]
        self.backend, self.evaluate_once = backend, evaluate_once

    @property
    def targets(self):
        return self.samples.targets.array

    @property
    def imgs(self):
        return self.samples

    def __getitem__(self, index):
        index, seed = index if isinstance(index, tuple) else (index, sample_seed(0, 0, index))
        skipped = []
        for k in range(MAX_BAD_IN_A_ROW + 1):
            path, target = self.samples[(index + k) % len(self.samples)]
            try:
                sample = self.loader(path)
            except Exception:  # decoders raise several types for truncated/garbage files
                skipped.append(path)
                continue
            if self.transform is not None:
                sample = self.transform(sample, seed) if getattr(self.transform, "seeded", False) else self.transform(sample)
            if skipped and self.evaluate_once:
                target = UNREADABLE
            return sample, target, tuple(skipped[:1])
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
    """Base seed of the loader's workers: a pure function of (seed, epoch, rank). Our transforms
    do not use the workers' RNG (see sample_seed); this keeps other datasets' transforms seeded."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**63)


class RASampler(Sampler):
    """Repeated augmentation, as torchvision's classification reference's RASampler (from DeiT): the
    epoch's permutation of range(n) (torch.randperm seeded with seed + epoch), each index repeated
    `repetitions` times in a row, padded by wrapping to a multiple of num_replicas, rank r taking every
    num_replicas-th entry from r, cut to floor(n // 256 * 256 / num_replicas) entries (so an epoch has
    about n images, not n * repetitions). Consecutive copies of an image go to different ranks.

    draws() gives this rank's (index, repetition) pairs: epoch_batches seeds each copy on its own, so the
    copies of an image get different augmentations.
    """

    def __init__(self, n, num_replicas=1, rank=0, seed=0, repetitions=3):
        self.n, self.num_replicas, self.rank, self.seed, self.repetitions = n, num_replicas, rank, seed, repetitions
        self.total_size = math.ceil(n * repetitions / num_replicas) * num_replicas
        self.num_selected_samples = math.floor(n // 256 * 256 / num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def draw_arrays(self):
        """This rank's (indices, repetitions) as two int64 numpy arrays."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        index = torch.randperm(self.n, generator=g).numpy().repeat(self.repetitions)
        rep = np.tile(np.arange(self.repetitions, dtype=np.int64), self.n)
        pad = self.total_size - len(index)  # wrap around, as the reference: fewer than n * repetitions
        index, rep = np.concatenate([index, index[:pad]]), np.concatenate([rep, rep[:pad]])
        mine = slice(self.rank, self.total_size, self.num_replicas)
        return index[mine][:self.num_selected_samples], rep[mine][:self.num_selected_samples]

    def draws(self):
        index, rep = self.draw_arrays()
        return list(zip(index.tolist(), rep.tolist()))

    def __iter__(self):
        return iter(self.draw_arrays()[0].tolist())

    def __len__(self):
        return self.num_selected_samples


def sample_seeds(seed, epoch, keys):
    """sample_seed(seed, epoch, k) for every k of an int array, vectorized (uint64 arithmetic wraps
    as the & _M64 of the scalar version); returns int64."""
    x = np.asarray(keys, np.int64).astype(np.uint64) ^ np.uint64(_splitmix64(_splitmix64(seed & _M64) ^ epoch))
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((x ^ (x >> np.uint64(31))) >> np.uint64(1)).astype(np.int64)


class EpochBatches:
    """An epoch's batches held as two flat arrays (sample indices, their seeds) cut every batch_size:
    a batch, the list of (index, seed) pairs the workers receive, is built only when the loader takes
    it. Slicing by batches ([k:]) gives another EpochBatches; equal to a list of such lists."""

    def __init__(self, index, seeds, batch_size):
        self.index, self.seeds, self.batch_size = index, seeds, batch_size

    def __len__(self):
        return -(-len(self.index) // self.batch_size)

    def __getitem__(self, b):
        if isinstance(b, slice):
            start, stop, step = b.indices(len(self))
            if step != 1:
                raise ValueError("EpochBatches slices take every batch")
            lo, hi = start * self.batch_size, max(start, stop) * self.batch_size
            return EpochBatches(self.index[lo:hi], self.seeds[lo:hi], self.batch_size)
        if not -len(self) <= b < len(self):
            raise IndexError(b)
        lo = (b % len(self)) * self.batch_size
        return list(zip(self.index[lo:lo + self.batch_size].tolist(), self.seeds[lo:lo + self.batch_size].tolist()))

    def __iter__(self):
        return (self[b] for b in range(len(self)))

    def __eq__(self, other):
        return list(self) == list(other)


def epoch_batches(sampler, batch_size, drop_last, seed, epoch):
    """The epoch's batches (an EpochBatches) of (index, sample_seed(seed, epoch, key)) pairs; key is the
    index, or for a RASampler's repetition r of index i, i + r * n (copy 0 is augmented as without
    repetition). Built with numpy: ~0.1 s at ImageNet's 1.28M samples."""
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if isinstance(sampler, RASampler):
        index, rep = sampler.draw_arrays()
        keys = index + rep * sampler.n
    else:
        index = keys = sampler_order(sampler)
    stop = len(index) - len(index) % batch_size if drop_last else len(index)
    return EpochBatches(index[:stop], sample_seeds(seed, epoch, keys[:stop]), batch_size)


def sampler_order(sampler):
    """The indices a sampler yields this epoch, as an int64 array. A DistributedSampler's are made here
    with numpy (its shuffle, cyclic padding and rank stride; tests/test_data_pipeline.py checks them
    against the sampler's own): 0.02 s instead of 0.12 s for ImageNet's 1.28M, at every epoch start."""
    if type(sampler) is not DistributedSampler:
        return np.fromiter(iter(sampler), np.int64, len(sampler))
    n = len(sampler.dataset)
    if sampler.shuffle:
        g = torch.Generator()
        g.manual_seed(sampler.seed + sampler.epoch)
        order = torch.randperm(n, generator=g).numpy()
    else:
        order = np.arange(n, dtype=np.int64)
    # padded by repeating the order (drop_last=False), or cut (True), to total_size; then every num_replicas-th
    order = np.resize(order, sampler.total_size) if n else order
    return order[sampler.rank:sampler.total_size:sampler.num_replicas].astype(np.int64, copy=False)


class _Batches(Sampler):
    """A batch sampler whose list the loader replaces each epoch: the DataLoader (and its
    persistent workers) stay, the indices change; they are drawn in the main process."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class EpochLoader:
    """A DataLoader whose order and augmentations depend only on (seed, epoch), not on -j or rank.

    `loader(epoch, start_batch=k)` returns the iterable of that epoch's batches from batch k on;
    the first k are neither loaded nor decoded (their indices are sliced off), and batches k, k+1,
    ... equal those of a full epoch bit for bit. `len(loader)` is the full number of batches.
    Training samplers are DistributedSampler (world_size 1 in a single process), validation uses
    ShardSampler; ra_reps > 1: RASampler (repeated augmentation). Workers prefetch `prefetch_factor`
    batches each and persist across epochs
    (persistent_workers=None: when the dataset's transform is seeded per sample, see sample_seed).
    """

    def __init__(self, dataset, batch_size, workers, seed, rank=0, world_size=1, train=True,
                 pin_memory=False, collate_fn=None, prefetch_factor=4, persistent_workers=None, ra_reps=1):
        if train and ra_reps > 1:
            self.sampler = RASampler(len(dataset), world_size, rank, seed, ra_reps)
        elif train:
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                              shuffle=True, seed=seed, drop_last=False)
        else:
            self.sampler = ShardSampler(len(dataset), rank, world_size)
        self.batch_size, self.drop_last = batch_size, train  # train: no 1-image batches for BatchNorm
        self.generator = torch.Generator()  # DataLoader draws its base seed here, not from the global RNG
        self.seed, self.rank = seed, rank
        self.batches = _Batches()
        if workers:
            end_workers_at_exit()
        self.loader = DataLoader(
            dataset, batch_sampler=self.batches, num_workers=workers, pin_memory=pin_memory,
            generator=self.generator, collate_fn=collate_fn, worker_init_fn=ignore_stop_signals_in_worker,
            multiprocessing_context=worker_start_method(workers),
            # Persistent workers keep their RNG across epochs: by default only for per-sample seeded transforms.
            persistent_workers=workers > 0 and (getattr(getattr(dataset, "transform", None), "seeded", False)
                                                if persistent_workers is None else persistent_workers),
            prefetch_factor=prefetch_factor if workers > 0 else None)

    def __call__(self, epoch=0, start_batch=0):
        self.batches.batches = epoch_batches(self.sampler, self.batch_size, self.drop_last, self.seed, epoch)[start_batch:]
        self.generator.manual_seed(worker_seed(self.seed, epoch, self.rank))
        return self.loader

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def imagenet_loader(dataset, batch_size, workers, seed, rank=0, world_size=1, train=True,
                    pin_memory=False, collate_fn=None, ra_reps=1):
    """Task.loader of main_imagenet.py: EpochLoader, or utils.inputs.dali.DaliLoader for DALI datasets
    (which main_imagenet.py does not give the recipe's data flags: it refuses them)."""
    if getattr(dataset, "backend", None) == "dali":
        # DaliImageFolder builds its own DaliLoader, so that utils.inputs.data never imports the optional utils.inputs.dali.
        # The trainer pins memory exactly when it trains on a GPU (the current device): decode there.
        device = torch.device("cuda", torch.cuda.current_device()) if pin_memory else torch.device("cpu")
        return dataset.make_loader(batch_size, workers, seed, rank, world_size, train=train, device=device)
    return EpochLoader(dataset, batch_size, workers, seed, rank, world_size, train=train,
                       pin_memory=pin_memory, collate_fn=collate_fn, ra_reps=ra_reps)
