"""Learning-rate schedules as pure functions of (epoch, iteration): nothing to save or replay.

step:   lr * gamma ** (epoch // step_size), constant within an epoch (the reference's schedule);
        with `milestones` (e.g. CIFAR's (81, 122)): lr * gamma ** (number of milestones <= epoch).
cosine: lr * (1 + cos(pi * t / epochs)) / 2 with t = epoch + it / iters, updated every iteration.
cosine, ref_shift=True: the reference's cosine, constant within an epoch and shifted by one epoch
        (it called CosineAnnealingLR.step() *before* each epoch, so epoch e trained at t = e + 1:
        the first epoch already below lr and the last at 0).
warm-up: the first `warmup_epochs` ramp linearly from lr / (warmup iterations) to the schedule;
        with warmup_decay d (torchvision's --lr-warmup-decay, the start factor) the factor goes from d
        linearly to 1 (LinearLR), or stays d (method "constant", ConstantLR), per iteration.
torchvision (per_epoch_lr, --lr-scheduler cosineannealinglr): the reference's per-EPOCH schedule,
        SequentialLR([LinearLR or ConstantLR over warmup_epochs, CosineAnnealingLR(T_max=epochs -
        warmup_epochs, eta_min=lr_min)]) in closed form, constant within an epoch.

`it` counts optimizer steps (with gradient accumulation, iters_per_epoch is the steps per epoch).
"""
import math

TORCHVISION_WARMUP_DECAY = 0.01  # torchvision's --lr-warmup-decay default


def lr_at(epoch, it, iters_per_epoch, base_lr, epochs, cos=False, warmup_epochs=0.0,
          step_size=30, gamma=0.1, milestones=None, ref_shift=False, warmup_method="linear", warmup_decay=None):
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
    if warmup_method == "linear" and warmup_decay is None:
        if done < warmup_iters:
            lr *= done / warmup_iters  # the trainer's original ramp
    elif done - 1 < warmup_iters:  # torchvision's factors, stepped per iteration: step t = done - 1
        lr *= warmup_factor(done - 1, warmup_iters, warmup_method, warmup_decay)
    return lr


def warmup_factor(t, total, method, decay):
    """LinearLR(start_factor=decay) / ConstantLR(factor=decay) after t of `total` steps (t < total)."""
    decay = TORCHVISION_WARMUP_DECAY if decay is None else decay
    return decay + (1 - decay) * t / total if method == "linear" else decay


def per_epoch_lr(epoch, base_lr, epochs, warmup_epochs=0, warmup_method="linear", warmup_decay=None, lr_min=0.0):
    """torchvision reference's --lr-scheduler cosineannealinglr with its warm-up (schedulers stepped once per epoch)."""
    if epoch < warmup_epochs:
        return base_lr * warmup_factor(epoch, warmup_epochs, warmup_method, warmup_decay)
    t, t_max = epoch - warmup_epochs, epochs - warmup_epochs
    return lr_min + (base_lr - lr_min) * (1 + math.cos(math.pi * t / t_max)) / 2


def schedule_from_args(args, iters_per_epoch):
    """lr_fn(epoch, it) for the common flags (--lr, --epochs, --cos_lr, --warmup-epochs, --cos-ref-shift,
    and the recipe's --lr-scheduler, --lr-min, --lr-warmup-method, --lr-warmup-decay where the script has them)."""
    method, decay = getattr(args, "lr_warmup_method", "linear"), getattr(args, "lr_warmup_decay", None)
    if getattr(args, "lr_scheduler", None) == "cosineannealinglr":
        def lr_fn(epoch, it):
            return per_epoch_lr(epoch, args.lr, args.epochs, int(args.warmup_epochs), method, decay, args.lr_min)
        return lr_fn

    def lr_fn(epoch, it):
        return lr_at(epoch, it, iters_per_epoch, args.lr, args.epochs, cos=args.cos_lr,
                     warmup_epochs=args.warmup_epochs, ref_shift=args.cos_ref_shift, warmup_method=method,
                     warmup_decay=decay)
    return lr_fn
