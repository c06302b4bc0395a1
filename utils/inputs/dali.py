"""`--data-backend dali`: NVIDIA DALI decodes (nvJPEG, `device="mixed"`) and resizes on the GPU.

Optional (pip install -r requirements-dali.txt); imported only when that backend is chosen.
Without a GPU the same pipeline decodes on the CPU (device "cpu"), which is what the tests run.

Same interface and seeding as utils.inputs.data: DaliLoader(dataset, ...)(epoch, start_batch=k) yields
(uint8 NCHW images, targets, skipped_paths); images live on the GPU when one is used, and
engine._unpack normalizes them there. DALI draws nothing at random: the Python side reads the
file, its size from the JPEG header, and the crop window and flip from TrainTransform.params with
sample_seed(seed, epoch, index) (the torch backend's own windows); DALI decodes only that window
(ROI decode), resizes and flips. Not bit-exact with the torch backend: nvJPEG's IDCT and chroma
upsampling and DALI's antialiased linear resize differ from libjpeg-turbo + torchvision by a few
levels of 255, and validation's resize rounds the longer side where torchvision truncates.
Unreadable files: those whose header PIL cannot read are skipped and counted as in utils.inputs.data; a
file with a valid header and corrupt data stops the run with DALI's decoder error.
"""
import io
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision import datasets

from .. import UserError
from .data import MAX_BAD_IN_A_ROW, UNREADABLE, DistributedSampler, ShardSampler, TrainTransform, epoch_batches

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError as e:  # one clear line instead of a traceback (main_imagenet prints UserErrors)
    raise UserError(f"--data-backend dali needs NVIDIA DALI ({e}); pip install -r requirements-dali.txt") from e


class DaliImageFolder(datasets.ImageFolder):
    """The file list and transform settings of an ImageFolder; DaliLoader does the reading.

    transform: utils.inputs.data.TrainTransform (random crop + flip) or ValTransform (resize + center crop).
    """
    backend = "dali"

    def __init__(self, root, transform, evaluate_once=False):
        super().__init__(root)
        self.transform, self.evaluate_once = transform, evaluate_once

    def make_loader(self, batch_size, workers, seed, rank=0, world_size=1, train=True, device=None):
        """Its DaliLoader (utils.inputs.data.imagenet_loader asks the dataset, so utils.inputs.data never imports this module)."""
        return DaliLoader(self, batch_size, workers, seed, rank, world_size, train=train, device=device)

    def read(self, index, seed):
        """(encoded bytes, start [x, y], shape [w, h], flip, target, skipped) of one sample, with
        the replacement logic of utils.inputs.data.SafeImageFolder."""
        skipped = []
        for k in range(MAX_BAD_IN_A_ROW + 1):
            path, target = self.samples[(index + k) % len(self.samples)]
            try:
                with open(path, "rb") as f:
                    data = f.read()
                width, height = Image.open(io.BytesIO(data)).size  # header only
            except Exception:
                skipped.append(path)
                continue
            if skipped and self.evaluate_once:
                target = UNREADABLE
            start, shape, flip = (0, 0), (width, height), False
            if isinstance(self.transform, TrainTransform):
                (top, left, h, w), flip = self.transform.params(height, width, seed)
                start, shape = (left, top), (w, h)
            return (np.frombuffer(data, dtype=np.uint8), np.array(start, np.float32), np.array(shape, np.float32),
                    np.array(int(flip), np.int32), target, tuple(skipped[:1]))
        raise UserError(f"{len(skipped)} unreadable images in a row, e.g. {skipped[0]}")


class _Source:
    """external_source's iterable: one batch of the epoch's list per call, in order; the targets
    and skipped paths go to a FIFO that DaliLoader pops as the pipeline's outputs come out. DALI
    calls it from the training process's thread, so files are read by a small thread pool (reads
    release the GIL)."""

    def __init__(self, dataset, batches, side, threads):
        self.dataset, self.batches, self.side, self.threads = dataset, batches, side, threads
        self.train = isinstance(dataset.transform, TrainTransform)

    def __iter__(self):
        with ThreadPoolExecutor(self.threads) as pool:
            for batch in self.batches:
                items = list(pool.map(lambda key: self.dataset.read(*key), batch))
                self.side.append((torch.tensor([it[4] for it in items]), [p for it in items for p in it[5]]))
                # Validation needs only the bytes: no crop window or flip.
                yield tuple([it[j] for it in items] for j in range(4 if self.train else 1))


@pipeline_def
def _pipeline(source, transform, decode_device):
    if isinstance(transform, TrainTransform):
        data, start, shape, flip = fn.external_source(source=source, num_outputs=4, batch=True, cycle="raise")
        images = fn.decoders.image_slice(data, start, shape, device=decode_device, output_type=types.RGB,
                                         normalized_anchor=False, normalized_shape=False)  # "WH" order
        images = fn.resize(images, resize_x=transform.size, resize_y=transform.size,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.crop_mirror_normalize(images, mirror=flip, dtype=types.UINT8, output_layout="CHW")
    (data,) = fn.external_source(source=source, num_outputs=1, batch=True, cycle="raise")
    images = fn.decoders.image(data, device=decode_device, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=transform.resize_size, interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop_mirror_normalize(images, crop=(transform.crop_size, transform.crop_size), crop_pos_x=0.5,
                                    crop_pos_y=0.5, dtype=types.UINT8, output_layout="CHW")


class DaliLoader:
    """EpochLoader's interface over a DALI pipeline (see the module docstring).

    `workers` sets DALI's CPU threads; on a GPU decoding runs on it ("mixed"), else on the CPU.
    A fresh pipeline per `loader(epoch, start_batch)` call: building one costs well under a second,
    against minutes per ImageNet epoch, and it leaves no prefetched state between epochs.
    """

    def __init__(self, dataset, batch_size, workers, seed, rank=0, world_size=1, train=True, device=None,
                 prefetch=2):
        if train:
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                              seed=seed, drop_last=False)
        else:
            self.sampler = ShardSampler(len(dataset), rank, world_size)
        self.dataset, self.batch_size, self.drop_last, self.seed = dataset, batch_size, train, seed
        self.threads, self.prefetch = max(1, workers), prefetch
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.device = torch.device(device)

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __call__(self, epoch=0, start_batch=0):
        batches = epoch_batches(self.sampler, self.batch_size, self.drop_last, self.seed, epoch)[start_batch:]
        return _Epoch(self, batches)


class _Epoch:
    def __init__(self, loader, batches):
        self.loader, self.batches = loader, batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        ld, side = self.loader, deque()
        if not self.batches:
            return
        gpu = ld.device.type == "cuda"
        source = _Source(ld.dataset, self.batches, side, ld.threads)
        pipe = _pipeline(source, ld.dataset.transform, "mixed" if gpu else "cpu", batch_size=ld.batch_size,
                         num_threads=ld.threads, device_id=ld.device.index if gpu else None,
                         prefetch_queue_depth=ld.prefetch, exec_dynamic=True)
        pipe.build()
        for _ in self.batches:
            (out,) = pipe.run()
            out = out.as_tensor()
            images = torch.empty(out.shape(), dtype=torch.uint8, device=ld.device)
            feed_ndarray(out, images, cuda_stream=torch.cuda.current_stream(ld.device) if gpu else None)
            targets, skipped = side.popleft()
            yield images, targets, skipped
