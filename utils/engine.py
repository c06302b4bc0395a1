"""The training loop's parts: one training epoch and one evaluation, for any classifier and dataset.

How to reuse (e.g. main_cifar.py):

    from utils.args import get_args_parser, parse_args       # common flags; add your own to the parser
    from utils.inputs.data import EpochLoader                        # any Dataset returning (image, target)
    from utils.engine import train_one_epoch, evaluate
    from utils.schedule import schedule_from_args             # or your own lr_fn(epoch, it)

    train_loader = EpochLoader(train_set, per_rank_batch, workers, seed, rank, world_size, train=True)
    val_loader = EpochLoader(val_set, per_rank_batch, workers, seed, rank, world_size, train=False)
    lr_fn = schedule_from_args(args, len(train_loader))  # or lr_at(..., milestones=(81, 122))
    for epoch in range(start_epoch, args.epochs):
        tr = train_one_epoch(model, train_loader(epoch), criterion, optimizer, lr_fn, epoch, device)
        va = evaluate(eval_model, val_loader(), device)       # eval_model: the module without DDP

The rest of the job (DDP set-up, checkpoints, resume, metrics, run folder) is utils/trainer.py's
`run(args, task)`: a script describes its data and models with a `Task` and calls it, as
main_imagenet.py does, instead of copying this loop.

Batches may be (images, targets) or (images, targets, skipped_paths) (see utils/inputs/data.py).
Under DDP both functions all-reduce their sums, so every rank returns the global figures.
"""
import math
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from . import UserError
from .inputs.data import UNREADABLE, normalize_uint8
from .distributed import all_reduce_sum
from .lifecycle.processes import LoaderCut
from .logger import RunLogger


class NonFiniteLossError(UserError):
    pass


def _autocast(device, amp_dtype):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def _unpack(batch, device, channels_last, amp_dtype=None):
    """The one place batches move to the device. uint8 image batches (utils.inputs.data) become
    normalized floats there (in amp_dtype when given); float batches pass through as they are.
    Rows whose target is utils.inputs.data.UNREADABLE (validation's replacements of unreadable images)
    are dropped first, on the CPU."""
    images, target = batch[0], batch[1]
    skipped = batch[2] if len(batch) > 2 else []
    if target.device.type == "cpu":
        keep = target != UNREADABLE
        if not bool(keep.all()):
            images, target = images[keep], target[keep]
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize_uint8(images, amp_dtype or torch.float32, channels_last)
    elif channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device, non_blocking=True), skipped


def _topk_correct(output, target, ks):
    if target.dim() > 1:  # probability targets (MixUp/CutMix): their argmax, as torchvision's utils.accuracy
        target = target.argmax(dim=1)
    pred = output.topk(max(ks), dim=1).indices
    hit = pred.eq(target[:, None])
    return [hit[:, :k].any(dim=1).sum() for k in ks]


def optimizer_step(loss, optimizer, scaler=None):
    """Backward and one optimizer step (through the fp16 GradScaler when there is one)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


class Stepper:
    """Backward and optimizer steps with the recipe's options; Stepper(optimizer, scaler) alone is
    optimizer_step on every batch.

    accum_steps N: one optimizer step every N batches (the epoch's last group may be shorter), on the
        mean of the group's losses; under DDP the gradients are all-reduced on a group's last batch only.
        The lr schedule's `it` counts optimizer steps: index(batch), steps(batches).
    clip_grad_norm: torch.nn.utils.clip_grad_norm_ before the step (after unscaling under fp16).
    ema (utils.optim.ExponentialMovingAverage): updated after optimizer steps 0, S, 2S... of each epoch
        (torchvision's `i % model_ema_steps == 0`); during the warm-up epochs it keeps copying the weights.
    """

    def __init__(self, optimizer, scaler=None, accum_steps=1, clip_grad_norm=None, ema=None, ema_steps=1,
                 warmup_epochs=0.0):
        self.optimizer, self.scaler, self.accum = optimizer, scaler, accum_steps
        self.clip, self.ema, self.ema_steps, self.warmup_epochs = clip_grad_norm, ema, ema_steps, warmup_epochs

    def steps(self, batches):
        return math.ceil(batches / self.accum)

    def index(self, it):
        """The optimizer step batch `it` of the epoch belongs to."""
        return it // self.accum

    def ends_step(self, it, n_iter):
        return (it + 1) % self.accum == 0 or it + 1 == n_iter

    def sync(self, model, it, n_iter):
        """DDP's no_sync for a group's batches before its last (the forward decides it)."""
        if self.ends_step(it, n_iter) or not hasattr(model, "no_sync"):
            return nullcontext()
        return model.no_sync()

    def __call__(self, loss, model, epoch, it, n_iter):
        if self.accum == 1:
            if self.clip is None:
                optimizer_step(loss, self.optimizer, self.scaler)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                self._backward(loss)
                self._step(model)
        else:
            first = it - it % self.accum
            if it == first:
                self.optimizer.zero_grad(set_to_none=True)
            self._backward(loss / min(self.accum, n_iter - first))  # the group's mean loss
            if self.ends_step(it, n_iter):
                self._step(model)
        if self.ema is not None and self.ends_step(it, n_iter) and self.index(it) % self.ema_steps == 0:
            self.ema.update_parameters(model)
            if epoch < self.warmup_epochs:  # torchvision: keep copying the weights during warm-up
                self.ema.n_averaged.fill_(0)

    def _backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _step(self, model):
        if self.clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()


def progress_line(logger, bar, line, postfix):
    """A training progress line: into log.txt under a progress bar (which shows `postfix`), else printed."""
    if bar is not None:
        bar.set_postfix_str(postfix)
        logger.file(line)
    else:
        logger.info(line)


def train_one_epoch(model, loader, criterion, optimizer, lr_fn, epoch, device, *, scaler=None,
                    amp_dtype=None, channels_last=False, print_freq=10, logger=None,
                    start_iter=0, sums=None, boundary=None, stepper=None, mix=None):
    """One pass over `loader`; sets the lr from lr_fn(epoch, step) before every optimizer step.
    stepper: a Stepper (gradient accumulation, clipping, EMA); default Stepper(optimizer, scaler).
    mix: utils.mixing.BatchMix (MixUp/CutMix of each device batch), or None.

    Mid-epoch resume: `loader` yields the epoch's batches from `start_iter` on, and `sums` are the
    running sums an interrupted call returned. `boundary(done, get_sums)` is called after every step
    (done: batches of this epoch finished; with gradient accumulation only after a group's last batch,
    so a stop never splits a group); when it returns True the epoch stops there.

    Returns {loss, acc1, images, skipped, time, lr, interrupted, iteration, sums}, the figures summed
    over ranks (an interrupted call returns only `interrupted`, `iteration` and this rank's `sums`).
    Raises NonFiniteLossError (checked every print_freq iterations and at the end, without a
    per-step host sync).
    """
    logger = logger or RunLogger()
    model.train()
    n_iter = len(loader) + start_iter  # the loader serves the batches still to do
    sums = dict({"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0, "time": 0.0}, **(sums or {}))
    loss_sum = torch.tensor(sums["loss"], dtype=torch.float64, device=device)
    correct = torch.tensor(sums["correct"], dtype=torch.int64, device=device)
    seen, skipped = sums["seen"], []
    bar = logger.progress(n_iter, f"epoch {epoch + 1}", initial=start_iter)
    start = time.time()

    def current_sums():  # this rank's running sums (syncs with the device)
        return {"loss": loss_sum.item(), "correct": int(correct.item()), "seen": seen,
                "skipped": sums["skipped"] + len(skipped), "time": sums["time"] + time.time() - start}

    step = stepper or Stepper(optimizer, scaler)
    lr = lr_fn(epoch, step.index(start_iter))
    for it, batch in enumerate(loader, start=start_iter):
        if isinstance(batch, LoaderCut):  # the loader cannot give this batch: stop before it, as on a signal
            if boundary is None or it == start_iter or not step.ends_step(it - 1, n_iter) or not boundary(it, current_sums):
                raise batch.error
            logger.end_progress()
            return {"interrupted": True, "iteration": it, "sums": current_sums(), "lr": lr}
        images, target, bad = _unpack(batch, device, channels_last, amp_dtype)
        if mix is not None:
            images, target = mix(images, target, epoch, it)
        skipped += bad
        lr = lr_fn(epoch, step.index(it))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device, amp_dtype), step.sync(model, it, n_iter):
            output = model(images)
            loss = criterion(output, target)
        step(loss, model, epoch, it, n_iter)

        n = images.shape[0]
        seen += n
        loss_sum += loss.detach().double() * n
        correct += _topk_correct(output.detach(), target, (1,))[0]
        if it % print_freq == 0 or it == n_iter - 1:
            avg = loss_sum.item() / seen
            if not math.isfinite(avg):
                raise NonFiniteLossError(f"loss is {avg} at epoch {epoch + 1}, iteration {it}: stopping")
            line = (f"Epoch: [{epoch + 1}][{it:>{len(str(n_iter))}}/{n_iter}]  lr {lr:.5f}  "
                    f"loss {avg:.4f}  acc@1 {100 * correct.item() / seen:6.2f}")
            progress_line(logger, bar, line, f"lr {lr:.4f} loss {avg:.4f}")
        if bar is not None:
            bar.update(1)
        if boundary is not None and it + 1 < n_iter and step.ends_step(it, n_iter) and boundary(it + 1, current_sums):
            logger.end_progress()
            return {"interrupted": True, "iteration": it + 1, "sums": current_sums(), "lr": lr}
    logger.end_progress()
    for p in skipped[:5]:
        logger.info(f"skipped unreadable image: {p}")
    total = current_sums()
    loss_total, correct_total, count, skipped_total = all_reduce_sum(
        [total["loss"], total["correct"], total["seen"], total["skipped"]], device)
    if count == 0:
        raise UserError("the training loader yielded no batches (fewer images than the batch size?)")
    avg = loss_total / count
    if not math.isfinite(avg):
        raise NonFiniteLossError(f"loss is {avg} at epoch {epoch + 1}: stopping")
    return {"loss": avg, "acc1": 100 * correct_total / count, "images": int(count),
            "skipped": int(skipped_total), "time": total["time"], "lr": lr,
            "interrupted": False, "iteration": n_iter, "sums": total}


@torch.no_grad()
def evaluate(model, loader, device, *, amp_dtype=None, channels_last=False, logger=None, desc="val"):
    """Top-1/top-5 accuracy (%) and mean cross-entropy over every image of `loader`.

    Sums are int64/float64 and all-reduced, so with utils.inputs.data.ShardSampler the result equals a
    single-process evaluation. Pass the model without its DDP wrapper (ranks may see different
    batch counts; DDP's forward would wait on the others).
    """
    logger = logger or RunLogger()
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    c1 = torch.zeros((), dtype=torch.int64, device=device)
    c5 = torch.zeros((), dtype=torch.int64, device=device)
    seen, skipped, top_k = 0, [], 5
    bar = logger.progress(len(loader), desc)
    for batch in loader:
        images, target, bad = _unpack(batch, device, channels_last, amp_dtype)
        skipped += bad
        with _autocast(device, amp_dtype):
            output = model(images)
        if output.dtype in (torch.float16, torch.bfloat16):  # autocast's half logits; float64 stays float64
            output = output.float()
        loss_sum += F.cross_entropy(output, target, reduction="none").double().sum()
        top_k = min(5, output.shape[1])  # fewer than 5 classes: top-all, and labelled so
        k1, k5 = _topk_correct(output, target, (1, top_k))
        c1 += k1
        c5 += k5
        seen += images.shape[0]
        if bar is not None:
            bar.update(1)
    logger.end_progress()
    for p in skipped[:5]:
        logger.info(f"skipped unreadable image: {p}")
    loss, n1, n5, count, n_skipped = all_reduce_sum(
        [loss_sum.item(), c1.item(), c5.item(), seen, len(skipped)], device)
    if count == 0:
        raise UserError("the validation set yielded no images")
    return {"loss": loss / count, "acc1": 100 * n1 / count, "acc5": 100 * n5 / count, "top_k": top_k,
            "count": int(count), "skipped": int(n_skipped)}
