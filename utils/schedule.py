"""Learning-rate schedules as pure functions of (epoch, iteration): nothing to save or replay.

step:   lr * gamma ** (epoch // step_size), constant within an epoch (the reference's schedule);
        with `milestones` (e.g. CIFAR's (81, 122)): lr * gamma ** (number of milestones <= epoch).
cosine: lr * (1 + cos(pi * t / epochs)) / 2 with t = epoch + it / iters, updated every iteration.
cosine, ref_shift=True: the reference's cosine, constant within an epoch and shifted by one epoch
        (it called CosineAnnealingLR.step() *before* each epoch, so epoch e trained at t = e + 1:
        the first epoch already below lr and the last at 0).
warm-up: the first `warmup_epochs` ramp linearly from lr / (warmup iterations) to the schedule.
"""
import math


def lr_at(epoch, it, iters_per_epoch, base_lr, epochs, cos=False, warmup_epochs=0.0,
          step_size=30, gamma=0.1, milestones=None, ref_shift=False):
    if cos and ref_shift:
        lr = base_lr * (1 + math.cos(math.pi * min(epoch + 1, epochs) / epochs)) / 2
    elif cos:
        t = epoch + it / iters_per_epoch
        lr = base_lr * (1 + math.cos(math.pi * t / epochs)) / 2
    else:
        drops = epoch // step_size if milestones is None else sum(epoch >= m for m in milestones)
        lr = base_lr * gamma ** drops
    warmup_iters = warmup_epochs * iters_per_epoch
    done = epoch * iters_per_epoch + it + 1
    if done < warmup_iters:
        lr *= done / warmup_iters
    return lr


def schedule_from_args(args, iters_per_epoch):
    """lr_fn(epoch, it) for the common flags (--lr, --epochs, --cos_lr, --warmup-epochs, --cos-ref-shift)."""
    def lr_fn(epoch, it):
        return lr_at(epoch, it, iters_per_epoch, args.lr, args.epochs, cos=args.cos_lr,
                     warmup_epochs=args.warmup_epochs, ref_shift=args.cos_ref_shift)
    return lr_fn
