"""CIFAR-10/100 from the standard python archives, held as uint8 tensors on the training device.

Reading: the archives (cifar-10-batches-py/, cifar-100-python/) are pickled dicts. `pickle.load` would
run whatever a pickle asks for, so `SafeUnpickler` resolves only the few names a numpy uint8 array
needs, and to our own stand-ins, not numpy's functions: the array's bytes are taken as data and
rebuilt with np.frombuffer. Any other name (os.system, builtins.eval, ...) is refused.

Training: the whole split lives on the device as uint8 [N, 3, 32, 32] (150 MB for CIFAR train), and
`DeviceLoader` crops, flips and normalizes each batch there with batched tensor ops, so a GPU never
waits on DataLoader workers. The order and the augmentation of every image are drawn from a CPU
generator seeded by (seed, epoch) alone: a resumed run sees the same epochs as an uninterrupted one,
and CPU and GPU runs see the same images.
"""
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import UserError
from .data import RASampler, sample_seed, worker_seed

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the reference's values (as in its main_cifar.py)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

# dataset -> (folder, train files, test file, meta file, label key, class-name key, classes)
LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "labels", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names", 100),
}
TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


# ---- restricted unpickling -------------------------------------------------------------------

class _Array:
    """Stands in for numpy.ndarray while unpickling: keeps (shape, dtype, raw bytes)."""

    def __init__(self, shape=None, dtype=None, raw=None):
        self.shape, self.dtype, self.raw = shape, dtype, raw

    def __setstate__(self, state):  # ndarray's state: (version, shape, dtype, fortran, raw bytes)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("unexpected array state")
        _, self.shape, self.dtype, fortran, self.raw = state
        if fortran:
            raise pickle.UnpicklingError("Fortran-ordered array")


class _DType:
    """Stands in for numpy.dtype: only its name ('u1', 'i8', ...) and byte order matter."""

    def __init__(self, name, align=False, copy=False):
        self.name, self.order = name, "|"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1:
            self.order = state[1]


def _reconstruct(cls, shape, dtype):  # numpy.core.multiarray._reconstruct (protocols 0-4)
    return _Array()


def _frombuffer(buf, dtype, shape, order):  # numpy.core.numeric._frombuffer (protocol 5)
    if order != "C":
        raise pickle.UnpicklingError("Fortran-ordered array")
    return _Array(shape, dtype, bytes(buf))


def _codecs_encode(text, encoding="utf-8"):  # how Python 3 writes bytes at protocol 2
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"unexpected encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _Array,
    ("numpy", "dtype"): _DType,
    ("_codecs", "encode"): _codecs_encode,
}


class RefusedGlobal(pickle.UnpicklingError):
    pass


class SafeUnpickler(pickle.Unpickler):
    """Builtin containers, numbers, str/bytes and plain numpy arrays; nothing else."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise RefusedGlobal(f"it asks for {module}.{name}, which a CIFAR archive never contains")


def _to_numpy(value):
    """An unpickled _Array as a numpy array (numeric dtypes only), other values unchanged."""
    if not isinstance(value, _Array):
        return value
    name = value.dtype.name if isinstance(value.dtype, _DType) else None
    name = name.decode("latin1") if isinstance(name, bytes) else name
    if (not isinstance(name, str) or not name or name[0] not in "uif"
            or not isinstance(value.raw, (bytes, bytearray))):
        raise pickle.UnpicklingError(f"array of unsupported type {name!r}")
    order = value.dtype.order.decode("latin1") if isinstance(value.dtype.order, bytes) else value.dtype.order
    dtype = np.dtype(name).newbyteorder("<" if order in ("|", "=") else order)
    shape = tuple(int(s) for s in value.shape)
    if math.prod(shape) * dtype.itemsize != len(value.raw):
        raise pickle.UnpicklingError(f"array of shape {shape} does not match its {len(value.raw)} bytes")
    return np.frombuffer(value.raw, dtype=dtype).reshape(shape)


def load_pickle(path, title):
    """One archive file as a dict with str keys; damaged or code-carrying files -> UserError."""
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, encoding="bytes").load()  # bytes: Python 2's str stays bytes
        if not isinstance(obj, dict):
            raise UserError(f"{title} file {path} is damaged (holds a {type(obj).__name__}, not a dict)")
        return {(k.decode("latin1") if isinstance(k, bytes) else k): _to_numpy(v) for k, v in obj.items()}
    except RefusedGlobal as e:
        raise UserError(f"refusing to read {path}: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {title} file {path}: {e.strerror or e}") from None
    except pickle.UnpicklingError as e:
        why = "truncated" if "truncated" in str(e) else e
        raise UserError(f"{title} file {path} is damaged ({why}); re-extract the archive") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            RecursionError, UnicodeDecodeError) as e:
        why = "truncated" if isinstance(e, EOFError) else f"not a CIFAR pickle: {type(e).__name__}"
        raise UserError(f"{title} file {path} is damaged ({why}); re-extract the archive") from None


# ---- the archive folders ----------------------------------------------------------------------

def archive_dir(root, dataset):
    """root/<archive folder>, or root itself when it is that folder; UserError when absent."""
    folder, train_files, test_file, meta_file, *_ = LAYOUTS[dataset]
    root = Path(root)
    for d in (root / folder, root):
        if (d / meta_file).is_file() or (d / test_file).is_file():
            return d
    names = ", ".join(train_files[:1] + (["..."] if len(train_files) > 1 else []) + [test_file, meta_file])
    raise UserError(f"{TITLES[dataset]} not found: put the extracted {folder}/ folder ({names}) in {root} "
                    f"(nothing is downloaded)")


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor  # int64 [N]

    def __len__(self):
        return len(self.labels)


def read_classes(root, dataset):
    d = archive_dir(root, dataset)
    folder, _, _, meta_file, _, names_key, n = LAYOUTS[dataset]
    title = TITLES[dataset]
    path = d / meta_file
    if not path.is_file():
        raise UserError(f"{title} archive incomplete: {path} is missing (re-extract {folder}/ into {root})")
    names = load_pickle(path, title).get(names_key)
    if not isinstance(names, list) or len(names) != n:
        raise UserError(f"{title} file {path} is damaged: expected {n} names under {names_key!r}")
    return [x.decode("latin1") if isinstance(x, bytes) else str(x) for x in names]


def read_split(root, dataset, train):
    """The train or test split as a Split of CPU tensors; every file checked (shape, dtype, labels)."""
    d = archive_dir(root, dataset)
    folder, train_files, test_file, _, label_key, _, n_classes = LAYOUTS[dataset]
    title = TITLES[dataset]
    images, labels = [], []
    for name in (train_files if train else [test_file]):
        path = d / name
        if not path.is_file():
            raise UserError(f"{title} archive incomplete: {path} is missing (re-extract {folder}/ into {root})")
        entry = load_pickle(path, title)
        data, target = entry.get("data"), entry.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise UserError(f"{title} file {path} is damaged: 'data' is {what}, expected uint8 (N, 3072)")
        if isinstance(target, np.ndarray):
            target = target.tolist()
        if (not isinstance(target, list) or len(target) != len(data)
                or not all(isinstance(t, int) and 0 <= t < n_classes for t in target)):
            raise UserError(f"{title} file {path} is damaged: {label_key!r} must be {len(data)} labels "
                            f"in 0..{n_classes - 1}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))  # rows are R, G, B planes
        labels.append(torch.tensor(target, dtype=torch.int64))
    return Split(torch.cat(images), torch.cat(labels))


# ---- augmentation and loading on the device ---------------------------------------------------

def random_crop_flip(images, offsets, flips, pad=4):
    """Pad(pad) with zeros + crop at (top, left) = offsets + horizontal flip where flips, as one gather.

    images: uint8 [B, C, H, W]; offsets: int64 [B, 2] in [0, 2 * pad]; flips: bool [B]. Same
    pixels as torchvision's Pad(4) -> RandomCrop(32) -> RandomHorizontalFlip with those draws.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = offsets[:, :1] + ar_h  # [B, H]
    cols = offsets[:, 1:] + torch.where(flips[:, None], ar_w.flip(0), ar_w)  # a flip reads columns backwards
    bi = torch.arange(b, device=images.device)[:, None, None, None]
    ci = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(images, mean, std):
    """uint8 -> float as ToTensor + Normalize compute it (same ops, so the same floats)."""
    return images.float().div(255).sub_(mean).div_(std)


def epoch_draws(n, seed, epoch, pad=4):
    """(order, offsets, flips) of one epoch: a pure function of (seed, epoch), shared by all ranks.

    offsets and flips are indexed by image, so an image's augmentation does not depend on the
    number of processes either.
    """
    g = torch.Generator().manual_seed(worker_seed(seed, epoch, 0))
    order = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    flips = torch.randint(0, 2, (n,), generator=g).bool()
    return order, offsets, flips


class Batches:
    """An iterable with a length: what a loader returns for one epoch."""

    def __init__(self, make_iter, length):
        self.make_iter, self.length = make_iter, max(0, length)

    def __iter__(self):
        return self.make_iter()

    def __len__(self):
        return self.length


class DeviceLoader:
    """EpochLoader's interface (`loader(epoch)` is iterable and has a len) over a Split on `device`.

    train: a shuffled, augmented epoch; rank r of w takes every w-th image of the shared order
    (disjoint, equal shares of floor(N / w)), in batches of batch_size; a last batch of one image
    is dropped (BatchNorm). eval: the contiguous shard [r*N//w, (r+1)*N//w) in order, unaugmented,
    so over all ranks every image is counted exactly once.

    Recipe options (train only). ra_reps > 1: the order is utils.inputs.data.RASampler's (repeated
    augmentation), and copy r of image i is augmented as "image" i + r * N. augment: a
    utils.inputs.data.SampleAugment (--auto-augment, --random-erase) applied after the crop and flip to each
    image on the CPU, seeded by sample_seed(seed, epoch, key) (per sample: slower than the batched path).
    """

    def __init__(self, split, batch_size, seed, rank=0, world_size=1, train=True, device="cpu",
                 mean=CIFAR_MEAN, std=CIFAR_STD, pad=4, ra_reps=1, augment=None):
        device = torch.device(device)
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32, device=device)[:, None, None]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.train, self.pad, self.device = train, pad, device
        n = len(split)
        self.count = n // world_size if train else (rank + 1) * n // world_size - rank * n // world_size
        self.ra = RASampler(n, world_size, rank, seed, ra_reps) if train and ra_reps > 1 else None
        if self.ra is not None:
            self.count = len(self.ra)
        self.augment = augment if train and augment else None
        self.epoch = 0

    def __call__(self, epoch=0, start_batch=0):
        """The epoch's batches from `start_batch` on (a mid-epoch resume skips the ones it trained on)."""
        self.epoch = epoch
        return Batches(lambda: self.batches(start_batch, epoch), len(self) - start_batch)

    def __len__(self):
        full, rest = divmod(self.count, self.batch_size)
        return full + (rest > (1 if self.train else 0))

    def indices(self, epoch=None):
        """This rank's image indices for `epoch`, in the order they are served."""
        return self.keys(epoch) % len(self.labels)

    def keys(self, epoch=None):
        """indices(), with repetition r of image i (ra_reps) as i + r * N: what its augmentation is drawn for."""
        n = len(self.labels)
        epoch = self.epoch if epoch is None else epoch
        if not self.train:
            return torch.arange(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)
        if self.ra is not None:
            self.ra.set_epoch(epoch)
            return torch.tensor([i + r * n for i, r in self.ra.draws()], dtype=torch.int64)
        order = epoch_draws(n, self.seed, epoch, self.pad)[0]
        return order[self.rank::self.world_size][:self.count]

    def __iter__(self):
        return self.batches(0)

    def batches(self, start=0, epoch=None):
        epoch = self.epoch if epoch is None else epoch
        n = len(self.labels)
        keys = self.keys(epoch).to(self.device)
        if self.train:  # drawn for every key: copies of an image (ra_reps) get their own crops and flips
            _, offsets, flips = epoch_draws(n * (self.ra.repetitions if self.ra else 1), self.seed, epoch, self.pad)
            offsets, flips = offsets.to(self.device), flips.to(self.device)
        for k in range(start, len(self)):
            key = keys[k * self.batch_size:(k + 1) * self.batch_size]
            i = key % n
            x = self.images[i]
            if self.train:
                x = random_crop_flip(x, offsets[key], flips[key], self.pad)
            if self.augment is not None:
                x = torch.stack([self.augment(img, sample_seed(self.seed, epoch, kk))
                                 for img, kk in zip(x.cpu(), key.tolist())]).to(self.device)
            if x.dtype == torch.uint8:
                x = normalize(x, self.mean, self.std)
            yield x, self.labels[i]
