"""The whole job around the loop: set-up, resume, train/evaluate epochs, checkpoints, metrics.

A script describes its dataset and models with a `Task` and calls `run(args, task)`; main_imagenet.py
is the example. Order of work: every cheap check (names, files, data layout) comes before the model
is built or any data is read, so bad input fails in seconds.
"""
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import UserError
from .args import parse_gpu_ids, run_name
from .checkpoint import (best_acc, check_identity, load_checkpoint, load_model_weights, model_state,
                         rng_state, save_atomic, set_rng_state)
from .data import EpochLoader
from .distributed import all_reduce_sum, barrier, broadcast_buffers, cleanup, init_distributed
from .engine import NonFiniteLossError, evaluate, train_one_epoch
from .logger import RunLogger
from .schedule import schedule_from_args


@dataclass
class Task:
    """What differs between ImageNet and CIFAR.

    name:       run-folder prefix ("imagenet")
    archs:      accepted -a names
    attentions: accepted --attention_type names
    classes:    args -> class names; fast checks only (runs before anything heavy); may prepare data
    datasets:   (args, train: bool) -> (train_set or None, val_set)
    model:      (args, num_classes) -> nn.Module
    collate_fn: optional DataLoader collate function
    loader:     optional factory with EpochLoader's signature, (dataset, batch_size, workers, seed,
                rank, world_size, train=..., pin_memory=..., collate_fn=...) -> obj with
                obj(epoch) -> iterable of batches and len(obj); e.g. a loader that keeps the
                data on the GPU. Default: utils.data.EpochLoader.
    """
    name: str
    archs: Sequence[str]
    attentions: Sequence[str]
    classes: Callable
    datasets: Callable
    model: Callable
    collate_fn: Callable = None
    image_size: int = 224  # for the params/FLOPs line
    loader: Callable = EpochLoader  # called as EpochLoader is; main_cifar.py serves batches from the device
    schedule: Callable = schedule_from_args  # (args, iters_per_epoch) -> lr_fn(epoch, it)
    # The loop and what it reports; the defaults are the classifiers' (main_coco.py sets all of them).
    train_one_epoch: Callable = train_one_epoch  # utils.engine.train_one_epoch's signature and result
    evaluate: Callable = evaluate  # utils.engine.evaluate's signature; result has best_key, count, skipped
    val_row: Callable = None  # va -> the metrics.jsonl validation keys; None: val_loss/val_acc1/val_acc5
    summary: Callable = None  # va -> the epoch line's validation part; None: loss, Acc@1, Acc@5
    eval_line: Callable = None  # (va, checkpoint) -> the -e result line; None: ` * Acc@1 ...`
    best_key: str = "acc1"  # the va entry that picks model_best (higher is better)
    best_label: str = "Acc@1"


def classification_val_row(va):
    return {"val_loss": va["loss"], "val_acc1": va["acc1"], "val_acc5": va["acc5"]}


def classification_summary(va):
    return f"val loss {va['loss']:.4f} Acc@1 {va['acc1']:.3f} Acc@5 {va['acc5']:.3f}"


def classification_eval_line(va, checkpoint):
    return (f" * Acc@1 {va['acc1']:.3f} Acc@5 {va['acc5']:.3f} Loss {va['loss']:.4f} "
            f"({va['count']} images, {checkpoint})")


def effective_param(args):
    """--attention_param, or the module's own default when not given; None without attention."""
    from networks.attentions import resolve_param
    return resolve_param(args.attention_type, args.attention_param)


def check_names(args, task):
    if args.arch not in task.archs:
        raise UserError(f"unknown arch {args.arch!r}; choose one of: {', '.join(task.archs)}")
    if args.attention_type not in task.attentions:
        raise UserError(f"unknown attention type {args.attention_type!r}; choose one of: {', '.join(task.attentions)}")
    if args.resume and not Path(args.resume).is_file():
        raise UserError(f"--resume checkpoint not found: {args.resume}")
    if (args.evaluate or args.save_weights) and not args.resume:
        raise UserError(f"{'-e' if args.evaluate else '--save_weights'} needs --resume CHECKPOINT")
    for flag, v in (("--epochs", args.epochs), ("-b", args.batch_size), ("-p", args.print_freq)):
        if v < 1:
            raise UserError(f"{flag} must be at least 1, got {v}")
    if args.workers < 0:
        raise UserError(f"-j must be >= 0, got {args.workers}")


def num_classes_of(state_dict):
    """The classifier width: the first dim of the last 2-D weight (fc / classifier)."""
    mats = [v for v in state_dict.values() if v.dim() == 2]
    if not mats:
        raise UserError("cannot tell the number of classes from the checkpoint")
    return mats[-1].shape[0]


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def print_model_summary(model, args, task, logger):
    """Params and FLOPs (thop, as the reference prints them), rank 0 only; never fatal."""
    if not logger.enabled:
        return
    try:
        from .flops import format_summary, profile_model
        stats = profile_model(model, image_size=task.image_size)  # profiles a copy
        for line in format_summary(args.arch, args.attention_type, stats).splitlines():
            logger.info(line)
    except Exception as e:  # thop trouble must not stop a training run
        n = sum(p.numel() for p in model.parameters())
        logger.info(f"model [{args.arch}] - params: {n / 1e6:.6f}M (FLOPs not counted: {type(e).__name__})")


def save_weights(args, task):
    ckpt = load_checkpoint(args.resume)
    sd = model_state(ckpt)
    model = task.model(args, num_classes_of(sd))
    check_identity(ckpt, args.resume, args.arch, args.attention_type, effective_param(args))
    load_model_weights(model, ckpt, args.resume)
    Path(args.save_weights).parent.mkdir(parents=True, exist_ok=True)
    save_atomic(model.state_dict(), args.save_weights)
    print(f"=> wrote plain state_dict of {args.resume} to {args.save_weights}")


def run(args, task):
    check_names(args, task)
    if args.save_weights:
        return save_weights(args, task)
    gpu_ids = parse_gpu_ids(args.gpu)
    info = init_distributed(gpu_ids)
    result = _run(args, task, info, gpu_ids)
    # Only on success: after an error on one rank, destroy_process_group could wait forever for
    # the others; exiting non-zero instead lets torchrun stop the whole job.
    cleanup()
    return result


def _run(args, task, info, gpu_ids):
    device = info.device
    logger = RunLogger(enabled=info.is_main)
    if args.batch_size % info.world_size:
        raise UserError(f"-b {args.batch_size} (the total batch) is not divisible by {info.world_size} processes")
    if gpu_ids and len(gpu_ids) > 1 and not info.distributed and device.type == "cuda":
        logger.info(f"note: --gpu {args.gpu}: one process trains on one GPU ({device}); for all "
                    f"{len(gpu_ids)} run `torchrun --nproc_per_node={len(gpu_ids)} {Path(sys.argv[0]).name} ...`")
    batch = args.batch_size // info.world_size
    workers = math.ceil(args.workers / info.local_world_size)

    # Cheap checks and data preparation first (rank 0 may generate the demo data; others wait).
    classes = task.classes(args) if info.is_main else None
    barrier()
    if not info.is_main:
        classes = task.classes(args)
    logger.info(f"data: {getattr(args, 'data', None) or task.name} ({len(classes)} classes)")

    # One seed for all ranks: the sampler's shuffle must agree across ranks.
    if args.seed is None:
        seed = int.from_bytes(os.urandom(4), "little") >> 1 if info.is_main else 0
        seed = int(all_reduce_sum([seed], device)[0])
    else:
        seed = args.seed
    seed_everything(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = args.seed is not None

    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        check_identity(ckpt, args.resume, args.arch, args.attention_type, effective_param(args))

    run_dir = None
    if not args.evaluate:
        run_dir = Path(args.ckpt) / run_name(task.name, args.arch, args.attention_type,
                                              effective_param(args), args.seed)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            settings = dict(vars(args), seed_used=seed, world_size=info.world_size, classes=len(classes))
            (run_dir / "args.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
        logger = RunLogger(run_dir, enabled=info.is_main)
        logger.info(f"run folder: {run_dir}")
        logger.file(f"settings: {json.dumps(dict(vars(args), seed_used=seed), default=str)}")

    model = task.model(args, len(classes))
    print_model_summary(model, args, task, logger)
    if ckpt is not None:
        load_model_weights(model, ckpt, args.resume)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    raw = model  # the module whose state_dict is saved (no DDP / compile prefixes)
    eval_model = torch.compile(raw) if args.compile else raw
    train_model = eval_model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(eval_model, device_ids=[device] if device.type == "cuda" else None)

    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    train_set, val_set = task.datasets(args, train=not args.evaluate)
    pin = device.type == "cuda"
    val_loader = task.loader(val_set, batch, workers, seed, info.rank, info.world_size, train=False,
                             pin_memory=pin, collate_fn=task.collate_fn)

    if args.evaluate:
        va = task.evaluate(eval_model, val_loader(0), device, amp_dtype=amp_dtype,
                           channels_last=args.channels_last, logger=logger)
        logger.info((task.eval_line or classification_eval_line)(va, args.resume))
        if va["skipped"]:
            logger.info(f"   {va['skipped']} unreadable images were skipped")
        return va

    train_loader = task.loader(train_set, batch, workers, seed, info.rank, info.world_size, train=True,
                               pin_memory=pin, collate_fn=task.collate_fn)
    if len(train_loader) == 0:
        raise UserError(f"{len(train_set)} training images give no full batch of {batch} per process; lower -b")
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = torch.optim.SGD(raw.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    lr_fn = task.schedule(args, len(train_loader))

    start_epoch, best_acc1 = 0, 0.0
    if ckpt is not None:
        start_epoch, best_acc1 = int(ckpt.get("epoch", 0)), best_acc(ckpt)
        if "optimizer" in ckpt:
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as e:
                raise UserError(f"optimizer state in {args.resume} does not fit: {e}") from None
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        logger.info(f"=> resumed from {args.resume} (epoch {start_epoch}, best {task.best_label} {best_acc1:.3f})")
    logger.truncate_metrics(start_epoch)  # a fresh run starts an empty metrics.jsonl
    del ckpt

    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        try:
            tr = task.train_one_epoch(train_model, train_loader(epoch), criterion, optimizer, lr_fn, epoch, device,
                                      scaler=scaler, amp_dtype=amp_dtype, channels_last=args.channels_last,
                                      print_freq=args.print_freq, logger=logger)
        except NonFiniteLossError as e:
            kept = run_dir / "checkpoint.pth.tar"
            raise UserError(f"{e}; last good checkpoint kept: "
                            f"{kept if kept.exists() else 'none yet'}") from None
        broadcast_buffers(raw)  # every rank evaluates exactly the weights rank 0 saves
        va = task.evaluate(eval_model, val_loader(epoch), device, amp_dtype=amp_dtype,
                           channels_last=args.channels_last, logger=logger)
        is_best = va[task.best_key] > best_acc1
        best_acc1 = max(best_acc1, va[task.best_key])
        if info.is_main:
            state = {"epoch": epoch + 1, "arch": args.arch, "attention_type": args.attention_type,
                     "attention_param": effective_param(args), "num_classes": len(classes),
                     "state_dict": raw.state_dict(), "best_acc1": best_acc1,
                     "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "rng": rng_state(), "args": json.loads(json.dumps(vars(args), default=str))}
            save_atomic(state, run_dir / "checkpoint.pth.tar")
            if is_best:
                tmp = run_dir / "model_best.pth.tar.tmp"
                shutil.copyfile(run_dir / "checkpoint.pth.tar", tmp)
                os.replace(tmp, run_dir / "model_best.pth.tar")
        row = {"epoch": epoch + 1, "lr": lr_fn(epoch, 0), "train_loss": tr["loss"],
               **({"train_acc1": tr["acc1"]} if "acc1" in tr else {}),
               **(task.val_row or classification_val_row)(va),
               "epoch_time": time.time() - t0, "images_per_sec": tr["images"] / tr["time"],
               "skipped_images": tr["skipped"] + va["skipped"]}
        logger.metrics(row)
        logger.info(f"Epoch {epoch + 1}/{args.epochs}: train loss {tr['loss']:.4f}"
                    + (f" acc@1 {tr['acc1']:.2f}" if "acc1" in tr else "") + " | "
                    f"{(task.summary or classification_summary)(va)} | "
                    f"best {best_acc1:.3f} | {row['epoch_time']:.1f}s, {row['images_per_sec']:.1f} img/s"
                    + (f" | skipped {row['skipped_images']} unreadable images" if row["skipped_images"] else ""))
        barrier()  # no rank starts the next epoch before rank 0 has its checkpoint on disk
    logger.info(f"done: best {task.best_label} {best_acc1:.3f}; run folder: {run_dir}")
    return {"best_acc1": best_acc1, "run_dir": run_dir}
