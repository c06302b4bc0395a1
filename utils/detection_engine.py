"""The detection loop's parts (main_coco.py's Task): one training epoch, COCO evaluation, and
initialising a detector's backbone from one of our ImageNet checkpoints.

train_one_epoch takes utils.engine.train_one_epoch's arguments, mid-epoch resume ones included
(start_iter, sums, boundary); the model returns its loss dict (criterion is unused). Batches are
(images list, targets list, skipped paths) from utils.inputs.coco.CocoLoader.
"""
import math
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from . import UserError
from .lifecycle.checkpoint import load_checkpoint, model_state
from .inputs.coco import coco_eval, detections_to_coco, metrics_line
from .distributed import all_reduce_sum
from .engine import NonFiniteLossError, optimizer_step, progress_line
from .lifecycle.processes import LoaderCut
from .logger import RunLogger

def _autocast(device, amp_dtype):
    return nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype)


def _to(targets, device):
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def train_one_epoch(model, loader, criterion, optimizer, lr_fn, epoch, device, *, scaler=None, amp_dtype=None,
                    channels_last=False, print_freq=10, logger=None, start_iter=0, sums=None, boundary=None):
    """One pass over `loader` (that epoch's batches from `start_iter` on); lr = lr_fn(epoch, it) with
    `it` the batch's index in the whole epoch. The contract is utils.engine.train_one_epoch's:

    sums: the running sums an interrupted call returned ({"loss", "images", "skipped", "time",
    "loss_<part>"...}); None for a fresh epoch. boundary(done, get_sums) is called after every step;
    when it returns True the epoch stops there and only `interrupted`, `iteration`, `lr` and this
    rank's `sums` come back. Otherwise returns {loss (mean per image), loss_<part>..., images,
    skipped, time, lr, interrupted, iteration, sums}, summed over ranks.
    """
    logger = logger or RunLogger()
    model.train()
    n_iter = start_iter + len(loader)
    local = {"loss": 0.0, "images": 0, "skipped": 0, "time": 0.0, **(sums or {})}
    bar = logger.progress(n_iter, f"epoch {epoch + 1}", initial=start_iter)
    start, lr = time.time(), lr_fn(epoch, start_iter)

    def current_sums():
        return {**local, "time": local["time"] + time.time() - start}

    for it, batch in enumerate(loader, start_iter):
        if isinstance(batch, LoaderCut):  # the loader cannot give this batch: stop before it, as on a signal
            if boundary is None or it == start_iter or not boundary(it, current_sums):
                raise batch.error
            logger.end_progress()
            return {"interrupted": True, "iteration": it, "sums": current_sums(), "lr": lr}
        images, targets, bad = batch
        local["skipped"] += len(bad)
        for p in bad[:5]:
            logger.info(f"skipped unreadable image: {p}")
        images = [im.to(device, non_blocking=True) for im in images]
        targets = _to(targets, device)
        lr = lr_fn(epoch, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device, amp_dtype):
            parts = model(images, targets)
            loss = sum(parts.values())
        optimizer_step(loss, optimizer, scaler)

        # Detection steps are long and their losses few: one host sync per step costs nothing.
        n = len(images)
        values = torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).double().cpu().tolist()
        if not math.isfinite(values[0]):
            raise NonFiniteLossError(f"loss is {values[0]} at epoch {epoch + 1}, iteration {it}: stopping")
        local["images"] += n
        local["loss"] += values[0] * n
        for k, v in zip(parts, values[1:]):
            local[k] = local.get(k, 0.0) + v * n
        if it % print_freq == 0 or it == n_iter - 1:
            line = (f"Epoch: [{epoch + 1}][{it:>{len(str(n_iter))}}/{n_iter}]  lr {lr:.5f}  "
                    f"loss {local['loss'] / local['images']:.4f}  "
                    + "  ".join(f"{k} {v:.4f}" for k, v in zip(parts, values[1:])))
            progress_line(logger, bar, line, f"lr {lr:.4f} loss {values[0]:.4f}")
        if bar is not None:
            bar.update(1)
        if boundary is not None and it + 1 < n_iter and boundary(it + 1, current_sums):
            logger.end_progress()
            return {"interrupted": True, "iteration": it + 1, "sums": current_sums(), "lr": lr}
    logger.end_progress()
    total = current_sums()
    keys = sorted(k for k in total if k != "time")  # the same loss parts on every rank
    total.update(zip(keys, all_reduce_sum([total[k] for k in keys], device)))
    if total["images"] == 0:
        raise UserError("the training loader yielded no batches (fewer images than the batch size?)")
    out = {k: v / total["images"] for k, v in total.items() if k.startswith("loss")}
    return {**out, "images": int(total["images"]), "skipped": int(total["skipped"]), "time": total["time"],
            "lr": lr, "interrupted": False, "iteration": n_iter, "sums": total}


def _gather(obj):
    """Every rank's list, concatenated on rank 0 (rank order); [] elsewhere."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return [x for p in parts for x in p] if parts is not None else []


def _broadcast(obj):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def evaluate(model, loader, device, *, amp_dtype=None, channels_last=False, logger=None, desc="val"):
    """COCOeval (bbox, and segm when the model predicts masks) of every image of `loader`.

    Each rank runs its shard; detections are gathered to rank 0, which evaluates against the split's
    annotation file, prints pycocotools' summary and one `bbox: AP ...` line per type, and shares
    the figures. Returns {bbox_AP, ..., [segm_AP, ...], count, detections, skipped}, the same on every rank.
    Pass the model without its DDP wrapper.
    """
    logger = logger or RunLogger()
    model.eval()
    split = loader.dataset.split
    with_masks = getattr(model, "roi_heads", None) is not None and model.roi_heads.has_mask()
    bbox, segm, img_ids, skipped = [], [], [], []
    bar = logger.progress(len(loader), desc)
    for images, targets, bad in loader:
        skipped += bad
        # An unreadable image comes as None (utils.inputs.coco.CocoDetection): dropped, counted, not evaluated.
        kept = [(im, t) for im, t in zip(images, targets) if im is not None]
        if not kept:
            if bar is not None:
                bar.update(1)
            continue
        images, targets = (list(v) for v in zip(*kept))
        with _autocast(device, amp_dtype):
            outputs = model([im.to(device, non_blocking=True) for im in images])
        for t, o in zip(targets, outputs):
            b, s = detections_to_coco(t["image_id"], o, with_masks)
            bbox += b
            segm += s
            img_ids.append(t["image_id"])
        if bar is not None:
            bar.update(1)
    logger.end_progress()
    for p in skipped[:5]:
        logger.info(f"skipped unreadable image: {p}")
    bbox, segm, img_ids, n_skipped = _gather(bbox), _gather(segm), _gather(img_ids), _gather([len(skipped)])
    metrics = None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        if not img_ids:
            raise UserError("the validation set yielded no images" + (
                f" ({sum(n_skipped)} unreadable, e.g. {skipped[0]})" if skipped else ""))
        gt, metrics = split.coco(), {}
        for iou_type, results in (("bbox", bbox), ("segm", segm))[:1 + with_masks]:
            m, text = coco_eval(gt, results, iou_type, img_ids)
            logger.info(f"IoU metric: {iou_type}")
            for line in text.rstrip().splitlines():
                logger.info(line)
            metrics.update(m)
        for iou_type in ("bbox", "segm")[:1 + with_masks]:
            logger.info(metrics_line(iou_type, metrics))
        metrics.update(count=len(img_ids), detections=len(bbox), skipped=sum(n_skipped))
    return _broadcast(metrics)


def load_pretrained_backbone(model, path, logger=None):
    """Initialise model.backbone.body from an ImageNet checkpoint of ours, a --save_weights file or
    the reference's (`module.` keys). Only the classifier (fc.*) may be left over; anything else
    missing, unexpected or of another shape is a UserError. Returns the keys not loaded."""
    logger = logger or RunLogger()
    sd = model_state(load_checkpoint(path))
    body = model.backbone.body
    own = body.state_dict()
    # FrozenBatchNorm2d has no num_batches_tracked: a BatchNorm counter, not a weight.
    unused = sorted(k for k in sd if k not in own)
    missing = [k for k in own if k not in sd]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    unexpected = [k for k in unused if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if v]
        raise UserError(f"--pretrained-backbone {path} does not fit this backbone (another arch or attention "
                        f"type?): " + "; ".join(parts))
    body.load_state_dict({k: sd[k] for k in own}, strict=True)
    not_loaded = [k for k in unused if not k.endswith("num_batches_tracked")]
    logger.info(f"=> backbone initialised from {path} ({len(own)} tensors); not loaded: "
                + (", ".join(not_loaded) if not_loaded else "nothing"))
    return not_loaded
