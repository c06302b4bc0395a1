"""The whole job around the loop: set-up, resume, train/evaluate epochs, checkpoints, metrics.

A script describes its dataset and models with a `Task` and calls `run(args, task)`; main_imagenet.py
is the example. Order of work: every cheap check (names, files, data layout) comes before the model
is built or any data is read, so bad input fails in seconds.
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import Preempted, UserError
from .lifecycle import runfolder
from . import recipe
from .args import SEED_MAX, check_number, check_recipe_args, given, parse_gpu_ids
from .lifecycle.checkpoint import (best_acc, check_class_names, check_identity, load_checkpoint, load_model_weights,
                                   load_pretrained_weights, model_state, recorded_settings, rng_state, save_atomic,
                                   set_rng_state)
from .inputs.data import EpochLoader
from .distributed import (all_reduce_sum, barrier, broadcast_buffers, broadcast_object, cleanup,
                          init_distributed, launcher_env, processes_to_start, spawn)
from .engine import NonFiniteLossError, Stepper, evaluate, train_one_epoch
from .logger import RunLogger
from .mixing import batch_mix
from .optim import ExponentialMovingAverage, make_ema, make_optimizer
from .lifecycle.preempt import StopFlags
from .lifecycle.processes import close_loaders, watch_workers, worker_start_method
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
                data on the GPU. Default: utils.inputs.data.EpochLoader.
    """
    name: str
    archs: Sequence[str]
    attentions: Sequence[str]
    classes: Callable
    datasets: Callable
    model: Callable
    collate_fn: Callable = None
    image_size: int = 224  # for the params/FLOPs line
    profile: Callable = None  # model -> utils.reporting.flops stats for that line; None: profile_model at image_size
    loader: Callable = EpochLoader  # called as EpochLoader is; main_cifar.py serves batches from the device
    schedule: Callable = schedule_from_args  # (args, iters_per_epoch) -> lr_fn(epoch, it)
    # The loop and what it reports; the defaults are the classifiers' (main_coco.py sets its own).
    train_one_epoch: Callable = train_one_epoch  # utils.engine.train_one_epoch's signature and result
    evaluate: Callable = evaluate  # utils.engine.evaluate's signature; the result has best_key, count, skipped
    val_row: Callable = None  # va -> metrics.jsonl's validation keys; None: val_loss, val_acc1, val_acc5
    summary: Callable = None  # va -> the validation part of the epoch line and of `-e`'s line
    eval_line: Callable = None  # (va, checkpoint path) -> `-e`'s result line; None: ` * {summary} (N images, path)`
    best_key: str = "acc1"  # the va entry that picks model_best (higher is better)
    best_label: str = "Acc@1"


def classification_val_row(va):
    return {"val_loss": va["loss"], "val_acc1": va["acc1"], "val_acc5": va["acc5"]}


def classification_summary(va):
    # With fewer than five classes "top-5" is top-all: the label says which k it is.
    return f"Acc@1 {va['acc1']:.3f} Acc@{va.get('top_k', 5)} {va['acc5']:.3f} Loss {va['loss']:.4f}"


def effective_param(args):
    """--attention_param, or the module's own default when not given; None without attention."""
    from networks.attentions import resolve_param
    return resolve_param(args.attention_type, args.attention_param)


def check_args(args, task):
    """Every check that needs no data and no model: names, files, numbers."""
    if args.arch not in task.archs:
        raise UserError(f"unknown arch {args.arch!r}; choose one of: {', '.join(task.archs)}")
    if args.attention_type not in task.attentions:
        raise UserError(f"unknown attention type {args.attention_type!r}; choose one of: {', '.join(task.attentions)}")
    from networks.attentions import attention_layer
    try:  # each module checks its own parameter (a reduction >= 1, a lambda > 0, ...)
        attention_layer(args.attention_type, args.attention_param)
    except ValueError as e:
        raise UserError(f"--attention_param: {e}") from None
    if args.resume and not Path(args.resume).is_file():
        raise UserError(f"--resume checkpoint not found: {args.resume}")
    if (args.evaluate or args.save_weights) and not args.resume:
        raise UserError(f"{'-e' if args.evaluate else '--save_weights'} needs --resume CHECKPOINT")
    if getattr(args, "pretrained", None):
        if args.evaluate or args.save_weights:
            raise UserError(f"--pretrained starts a new run from its weights; {'-e' if args.evaluate else '--save_weights'}"
                            f" reads --resume's: drop one of them")
        if not args.resume and not Path(args.pretrained).is_file():  # a resume takes the weights from --resume
            raise UserError(f"--pretrained checkpoint not found: {args.pretrained}")
    for flag, v in (("--epochs", args.epochs), ("-b", args.batch_size), ("-p", args.print_freq)):
        check_number(flag, v, 1)
    for flag, v in (("-j", args.workers), ("--lr", args.lr), ("--wd", args.weight_decay),
                    ("--warmup-epochs", args.warmup_epochs)):
        check_number(flag, v, 0)
    check_number("--momentum", args.momentum, 0, 1, high_open=True)  # 1 never forgets a gradient: diverges
    check_number("--label-smoothing", args.label_smoothing, 0, 1, high_open=True)
    check_number("--save-every-minutes", args.save_every_minutes, 0, low_open=True)
    check_number("--seed", args.seed, 0, SEED_MAX)
    check_number("--nproc", getattr(args, "nproc", None), 1)
    for flag in ("train_crop_size", "val_resize_size", "val_crop_size"):
        check_number(f"--{flag.replace('_', '-')}", getattr(args, flag, None), 1)
    check_recipe_args(args)


def num_classes_of(state_dict):
    """The classifier width: a detector's box classifier, else the first dim of the last 2-D weight
    (fc / classifier)."""
    if "roi_heads.box_predictor.cls_score.weight" in state_dict:
        return state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0]
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
        from .reporting.flops import format_summary, profile_model  # both work on a copy
        stats = task.profile(model) if task.profile else profile_model(model, image_size=task.image_size)
        for line in format_summary(args.arch, args.attention_type, stats).splitlines():
            logger.info(line)
    except Exception as e:  # thop trouble must not stop a training run
        n = sum(p.numel() for p in model.parameters())
        logger.info(f"model [{args.arch}] - params: {n / 1e6:.6f}M (FLOPs not counted: {type(e).__name__})")


def ema_weights(ckpt, path):
    """The EMA's weights in a checkpoint of a --model-ema run, keyed as the model's."""
    ema = ckpt.get("model_ema") if isinstance(ckpt, dict) else None
    if not ema:
        raise UserError(f"{path} holds no EMA weights (trained without --model-ema)")
    return {"state_dict": {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}}


# What decides the figure a run logs for its validation (beside the weights): `-e` and --save_weights
# take these from the checkpoint's record unless the command line gives them (fill_from_checkpoint).
EVAL_SETTINGS = ("arch", "attention_type", "attention_param", "data", "val_resize_size", "val_crop_size",
                 "data_backend", "amp", "channels_last", "dataset", "dataset_dir", "detector", "min_size",
                 "max_size", "model_kw")


def fill_from_checkpoint(args, say=print):
    """-e / --save_weights: every EVAL_SETTINGS flag the command line did not give comes from what the
    --resume checkpoint (or its run folder's args.json) records; a given one that differs is said in one
    line. A checkpoint that records nothing (the reference's) leaves the flags as they are."""
    # Its small fields only (mmap); one that cannot be read is refused later, after the cheaper checks.
    rec = recorded_settings(runfolder.peek(args.resume), args.resume)
    told = given(args)
    for key in EVAL_SETTINGS:
        if key not in rec or not hasattr(args, key) or rec[key] is None and key != "attention_param":
            continue
        mine, theirs = getattr(args, key), rec[key]
        if key not in told:
            setattr(args, key, theirs)
        elif not _same_setting(mine, theirs):
            flag = "DATA" if key == "data" else "--" + (key if key in ("attention_type", "attention_param", "dataset_dir")
                                                        else key.replace("_", "-"))
            say(f"note: {flag} {mine} given; {args.resume} was trained and validated with {theirs}")
    return rec


def _same_setting(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if a is None or b is None:
        return a is b
    return a == b or str(a) == str(b)


def refuse_overwriting_a_checkpoint(args):
    """--save_weights never replaces a training checkpoint (the --resume file itself, or any other) by bare weights."""
    from .lifecycle.runfolder import peek
    out = Path(args.save_weights)
    if not out.exists():
        return
    if os.path.samefile(out, args.resume):
        raise UserError(f"--save_weights {out} is the --resume checkpoint itself: bare weights would replace it; "
                        f"write them to another file")
    held = peek(out)
    if isinstance(held, dict) and any(k in held for k in ("state_dict", "optimizer", "epoch")):
        raise UserError(f"--save_weights {out} is a training checkpoint: bare weights never replace one; "
                        f"write them to another file")


def save_weights(args, task):
    refuse_overwriting_a_checkpoint(args)
    ckpt = load_checkpoint(args.resume)
    sd = model_state(ckpt)
    model = task.model(args, num_classes_of(sd))
    check_identity(ckpt, args.resume, args.arch, args.attention_type, effective_param(args), check_param=False)
    use_ema = getattr(args, "use_ema", False)
    load_model_weights(model, ema_weights(ckpt, args.resume) if use_ema else ckpt, args.resume)
    Path(args.save_weights).parent.mkdir(parents=True, exist_ok=True)
    save_atomic(model.state_dict(), args.save_weights)
    print(f"=> wrote plain state_dict of {args.resume}{' (its EMA weights)' if use_ema else ''} to {args.save_weights}")


def check_device(args, gpu_ids):
    """Say so when the device asked for is not there; refuse what cannot work on it."""
    cuda = torch.cuda.is_available()
    if gpu_ids and not cuda:
        print(f"warning: --gpu {args.gpu}: CUDA is not available on this machine; running on the CPU",
              file=sys.stderr, flush=True)
    if gpu_ids and cuda and max(gpu_ids) >= torch.cuda.device_count():
        raise UserError(f"--gpu {args.gpu}: this machine has {torch.cuda.device_count()} GPUs (ids 0.."
                        f"{torch.cuda.device_count() - 1})")
    if args.amp == "fp16" and (not cuda or gpu_ids == []):
        raise UserError("--amp fp16 needs a GPU (on the CPU it is many times slower and overflows to NaN); "
                        "use --amp bf16 there")


def run(args, task):
    if args.resume and (args.evaluate or args.save_weights) and Path(args.resume).is_file():
        is_main = int(os.environ.get("RANK", 0)) == 0  # under torchrun each rank fills in; rank 0 speaks
        fill_from_checkpoint(args, say=lambda line: print(line, flush=True) if is_main else None)
    check_args(args, task)
    if args.save_weights:
        return save_weights(args, task)
    gpu_ids = parse_gpu_ids(args.gpu)
    check_device(args, gpu_ids)
    nproc = processes_to_start(getattr(args, "nproc", None), gpu_ids)
    if args.batch_size % nproc:  # before any process starts (set_up checks each torchrun rank again)
        raise UserError(f"-b {args.batch_size} (the total batch) is not divisible by {nproc} processes")
    if nproc > 1:  # --nproc N / --gpu 0,1,2,3 without torchrun: this command starts the ranks itself
        return spawn(nproc, run_rank, args, task, gpu_ids)
    return run_rank(args, task, gpu_ids)


def run_rank(args, task, gpu_ids, store=None):
    """One rank of the run (the only one without DDP); store: utils.distributed.spawn's rendezvous."""
    if args.workers and (store is not None or launcher_env(rendezvous=False)["WORLD_SIZE"] > 1):
        worker_start_method(args.workers, process_group=True)  # the fork server, if any, starts importing now
    info = init_distributed(gpu_ids, store)
    result = _run(args, task, info)
    # Only on success: after an error on one rank, destroy_process_group could wait forever for
    # the others; exiting non-zero instead lets torchrun stop the whole job.
    cleanup()
    return result


def _run(args, task, info):
    """One rank's run, in phases that read top to bottom. Every cheap check comes before the model is
    built or any data is read, so bad input fails in seconds."""
    job = set_up(args, task, info)  # checks, classes, checkpoint, seed, run folder
    if job.finished is not None:
        return job.finished
    nets = build_model(args, task, info, job)  # the net (checkpoint weights), SyncBN, EMA, compile, DDP
    train_set, val_set = task.datasets(args, train=not args.evaluate)
    loaders = [make_loader(task, val_set, job, info, train=False)]
    try:
        if args.evaluate:
            return evaluate_checkpoint(args, task, job, nets, loaders[0])
        loaders.append(make_loader(task, train_set, job, info, train=True))
        val_loader, train_loader = loaders
        if len(train_loader) == 0:
            raise UserError(f"{len(train_set)} training images give no full batch of {job.batch} per process; lower -b")
        opt = build_optimization(args, task, job, nets, len(train_loader))  # optimizer, scaler, stepper, lr
        progress = resume_progress(args, task, info, job, opt)
        train_epochs(args, task, info, job, nets, opt, progress, train_loader, val_loader)
        return report(task, job, progress)
    finally:
        close_loaders(loaders)


@dataclass
class Job:
    """What set_up decided for this rank."""
    device: torch.device
    logger: RunLogger
    batch: int  # per rank
    workers: int  # per rank
    classes: list
    ckpt: dict  # the --resume checkpoint, or None (dropped once resumed)
    seed: int
    mix: Callable  # MixUp/CutMix of each training batch, or None
    amp_dtype: torch.dtype
    run_dir: Path = None  # None under -e
    folder_lock: object = None  # rank 0's lock of run_dir
    finished: dict = None  # the result when the run folder is already finished
    pretrained: dict = None  # --pretrained's checkpoint for a new run (fine-tuning), dropped once loaded


@dataclass
class Nets:
    raw: nn.Module  # the module whose state_dict is saved (no DDP / compile prefixes)
    eval_model: nn.Module  # raw, compiled with --compile
    train_model: nn.Module  # eval_model, in DDP when distributed
    ema: nn.Module = None  # --model-ema's average (utils.optim.ExponentialMovingAverage)


@dataclass
class Optimization:
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object  # the fp16 GradScaler, or None
    stepper: Stepper
    lr_fn: Callable  # (epoch, optimizer step) -> lr
    loop_kwargs: dict  # what the classifiers' loop takes beyond utils.engine's common arguments


@dataclass
class Progress:
    """Where the run is; a checkpoint carries all of it."""
    start_epoch: int = 0
    start_iter: int = 0  # batches of start_epoch already done (a mid-epoch checkpoint)
    sums: dict = None  # that epoch's running sums over all ranks (rank 0 carries them on)
    best: float = 0.0
    best_epoch: int = None
    best_of: str = None  # "model" or "ema" on EMA runs
    rows: list = None  # metrics.jsonl's rows


def set_up(args, task, info):
    device = info.device
    logger = RunLogger(enabled=info.is_main)
    if args.batch_size % info.world_size:
        raise UserError(f"-b {args.batch_size} (the total batch) is not divisible by {info.world_size} processes")

    # Cheap checks and data preparation first (rank 0 may generate the demo data; others wait).
    classes = task.classes(args) if info.is_main else None
    barrier()
    if not info.is_main:
        classes = task.classes(args)
    logger.info(f"data: {getattr(args, 'data', None) or task.name} ({len(classes)} classes)")

    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        check_identity(ckpt, args.resume, args.arch, args.attention_type, effective_param(args),
                       check_param=not args.evaluate)  # -e with another parameter given: said by fill_from_checkpoint
        check_checkpoint_fits(args, ckpt, classes)
    pretrained = None
    if ckpt is None and getattr(args, "pretrained", None) and not args.evaluate:  # read and checked before any build
        pretrained = load_checkpoint(args.pretrained)
        try:
            check_identity(pretrained, args.pretrained, args.arch, args.attention_type, effective_param(args))
        except UserError as e:
            raise UserError(f"--pretrained: {e}") from None
    seed = choose_seed(args, ckpt, device, info)
    seed_everything(seed)
    mix = None if args.evaluate else batch_mix(args, len(classes), seed, info.rank)  # MixUp/CutMix, or None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = args.seed is not None
    job = Job(device, logger, args.batch_size // info.world_size, math.ceil(args.workers / info.local_world_size),
              classes, ckpt, seed, mix, {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp],
              pretrained=pretrained)
    if not args.evaluate:
        open_run(args, task, info, job)
    return job


def run_folder(args, task):
    """Where this command's run lives: a resumed checkpoint's own run folder when it lies in one (and no
    other --ckpt is given), so a resume continues that run whatever the name; else --ckpt/<name>, the
    name of the recipe (utils.recipe.folder_name)."""
    if args.resume:
        own = Path(args.resume).parent
        if runfolder.is_run_folder(own) and ("ckpt" not in given(args) or
                                              own.resolve().parent == Path(args.ckpt).resolve()):
            args.ckpt = str(own.parent)  # what args.json records
            return own
    return Path(args.ckpt) / recipe.folder_name(task.name, args)


def check_checkpoint_fits(args, ckpt, classes):
    """Before anything is built: the --resume checkpoint's classes are the data's, and a mid-epoch one
    continues with the batch size that cut the epoch."""
    data = getattr(args, "data", None) or "the data"
    if args.evaluate:
        n = num_classes_of(model_state(ckpt))
        if n != len(classes):
            raise UserError(f"{args.resume} classifies {n} classes, but {data} has {len(classes)}")
    check_class_names(ckpt, args.resume, classes, data)
    epoch, iteration = runfolder.progress(ckpt) if isinstance(ckpt, dict) else (0, 0)
    trained_b = (ckpt.get("args") or {}).get("batch_size") if isinstance(ckpt, dict) else None
    if not args.evaluate and iteration and trained_b is not None and trained_b != args.batch_size:
        raise UserError(f"{args.resume} was saved inside epoch {epoch + 1} (iteration {iteration}) with -b {trained_b}: "
                        f"resume with -b {trained_b} (another -b would train some of that epoch's images twice "
                        f"and others never)")


def open_run(args, task, info, job):
    """The run folder: locked, checked (the same recipe and data), decided (new, resume or finished),
    args.json, and the logger that writes log.txt."""
    job.run_dir = run_folder(args, task)
    state, job.folder_lock, notes = open_run_folder(job.run_dir, args, job.ckpt, info, job.logger)
    if state == "finished":  # the usual last line too: launchers and sweeps read it
        best = state_best(job.run_dir)
        job.logger.info(f"done: best {task.best_label} {best:.3f}; run folder: {job.run_dir}")
        job.finished = {"best_acc1": best, "run_dir": job.run_dir, "finished": True}
        return
    if info.is_main:
        settings = dict(vars(args), seed_used=job.seed, world_size=info.world_size, classes=len(job.classes),
                        data_realpath=recipe.data_root(args),
                        recipe_defaults=notes.get("recipe_defaults") or recipe.recipe_defaults(args),
                        class_names=list(job.classes))
        runfolder.write_text_atomic(job.run_dir / "args.json", json.dumps(settings, indent=2, default=str) + "\n")
    job.logger = RunLogger(job.run_dir, enabled=info.is_main)
    job.logger.info(f"run folder: {job.run_dir}")
    diff = recipe.changes(args)
    if diff:
        job.logger.info(f"recipe: {recipe.describe(diff)} (settings that differ from the defaults; "
                        f"digest {recipe.digest(diff)})")
    for line in notes.get("lines", ()):
        job.logger.info(line)
    job.logger.file(f"settings: {json.dumps(dict(vars(args), seed_used=job.seed), default=str)}")
    if len(job.classes) == 1:
        job.logger.info("warning: the data has 1 class: every accuracy will be 100%")


def check_recipe(run_dir, args):
    """A run folder that holds a run is continued or reported only for the same recipe and data.
    Returns (note lines, the run's recorded recipe defaults or None); UserError naming what differs."""
    if not runfolder.holds_run(run_dir):
        return [], None
    rec = runfolder.read_settings(run_dir)
    if rec is None:  # a run older than recorded settings: as before
        return [], None
    notes = []
    raised = args.resume and int(args.epochs) >= int(rec.get("epochs", 0))  # --resume may train on
    diff = recipe.differences(vars(args), rec, skip=recipe.NAMED | ({"epochs"} if raised else set()))
    if diff:
        raise UserError(f"run folder {run_dir} holds a run of other settings: "
                        f"{recipe.list_differences(diff, vars(args), rec)}; give the run's settings to continue or "
                        f"report it, or pass another --ckpt (or --seed) for a new run")
    if raised and int(args.epochs) > int(rec.get("epochs", 0)):
        notes.append(f"note: --epochs {args.epochs}: training on in {run_dir} (the run had {rec['epochs']} epochs)")
    theirs, ours = rec.get("data_realpath"), recipe.data_root(args)
    if theirs and ours and theirs != ours:
        if not args.resume:
            raise UserError(f"run folder {run_dir} was trained on the data at {theirs}, this command's is {ours}: "
                            f"pass that data, or another --ckpt for a new run (--resume of its checkpoint continues "
                            f"it on moved data)")
        notes.append(f"note: the run was trained on the data at {theirs}; it continues on {ours} (--resume)")
    return notes, rec.get("recipe_defaults")


def build_model(args, task, info, job):
    device, logger = job.device, job.logger
    model = task.model(args, len(job.classes))
    print_model_summary(model, args, task, logger)
    if job.ckpt is not None:
        load_model_weights(model, job.ckpt, args.resume)
    elif job.pretrained is not None:  # fine-tuning: a new run from these weights
        load_pretrained(args, model, job.pretrained, logger)
        job.pretrained = None
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if getattr(args, "sync_bn", False) and not args.evaluate:
        if not info.distributed:
            logger.info("note: --sync-bn does nothing in a single process (it syncs BatchNorm across DDP processes)")
        elif device.type != "cuda":
            raise UserError("--sync-bn needs GPUs: torch's SyncBatchNorm does not run on the CPU")
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state_dict keys as BatchNorm
    ema = ema_from(args, model, job.ckpt, info.world_size, job.batch, device, logger)
    eval_model = torch.compile(model) if args.compile else model
    train_model = eval_model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(eval_model, device_ids=[device] if device.type == "cuda" else None)
    return Nets(model, eval_model, train_model, ema)


def load_pretrained(args, model, ckpt, logger):
    """--pretrained: the weights of a checkpoint or state_dict of the same arch and attention, but for
    a classifier of another class count (left as initialised); no optimizer, epoch or RNG state."""
    try:
        skipped = load_pretrained_weights(model, ckpt, args.pretrained)
    except UserError as e:
        raise UserError(f"--pretrained: {e}") from None
    n_own = len(model.state_dict())
    if skipped:
        theirs = model_state(ckpt)[skipped[0]].shape[0]
        logger.info(f"=> weights from --pretrained {args.pretrained}: {n_own - len(skipped)} of {n_own} tensors; "
                    f"not loaded: {', '.join(skipped)} ({theirs} classes there, {model.state_dict()[skipped[0]].shape[0]} "
                    f"here: trained from scratch)")
    else:
        logger.info(f"=> weights from --pretrained {args.pretrained}: all {n_own} tensors")


def make_loader(task, dataset, job, info, train):
    return task.loader(dataset, job.batch, job.workers, job.seed, info.rank, info.world_size, train=train,
                       pin_memory=job.device.type == "cuda", collate_fn=task.collate_fn)


def validate(args, task, job, model, loader, desc=None):
    return task.evaluate(model, watch_workers(loader), job.device, amp_dtype=job.amp_dtype, channels_last=args.channels_last,
                         logger=job.logger, **({"desc": desc} if desc else {}))


def evaluate_checkpoint(args, task, job, nets, val_loader):
    """-e: the checkpoint's model, and its EMA when it holds one."""
    summary, logger = task.summary or classification_summary, job.logger
    va = validate(args, task, job, nets.eval_model, val_loader(0))
    logger.info(task.eval_line(va, args.resume) if task.eval_line else
                f" * {summary(va)} ({va['count']} images, {args.resume})")
    if va["skipped"]:
        logger.info(f"   {va['skipped']} unreadable images were skipped")
    if nets.ema is not None:
        va["ema"] = validate(args, task, job, nets.ema.module, val_loader(0), "val EMA")
        logger.info(f" * EMA {summary(va['ema'])} ({va['ema']['count']} images, {args.resume})")
    return va


def build_optimization(args, task, job, nets, iters_per_epoch):
    optimizer = make_optimizer(nets.raw, args)
    scaler = torch.amp.GradScaler(job.device.type) if args.amp == "fp16" else None
    stepper = Stepper(optimizer, scaler, getattr(args, "grad_accum_steps", 1), getattr(args, "clip_grad_norm", None),
                      nets.ema, getattr(args, "model_ema_steps", 1), args.warmup_epochs)
    lr_fn = task.schedule(args, stepper.steps(iters_per_epoch))  # the schedule counts optimizer steps
    # The classifiers' loop takes the recipe's stepper and MixUp/CutMix; main_coco's loop has its own.
    loop_kwargs = {"stepper": stepper, "mix": job.mix} if hasattr(args, "grad_accum_steps") else {}
    return Optimization(nn.CrossEntropyLoss(label_smoothing=args.label_smoothing), optimizer, scaler, stepper,
                        lr_fn, loop_kwargs)


def resume_progress(args, task, info, job, opt):
    """The checkpoint's progress, optimizer, scaler and RNG states; then the checkpoint is let go."""
    ckpt, progress = job.ckpt, Progress(rows=[])
    job.ckpt = None
    if ckpt is None:
        return progress
    (progress.start_epoch, progress.start_iter), progress.best = runfolder.progress(ckpt), best_acc(ckpt)
    progress.best_epoch, progress.best_of = ckpt.get("best_epoch"), ckpt.get("best_of")
    progress.rows = list(ckpt.get("metrics", []))
    if progress.start_iter % opt.stepper.accum:
        raise UserError(f"{args.resume} was saved inside a group of gradient accumulation (iteration "
                        f"{progress.start_iter}): resume with the --grad-accum-steps it was trained with")
    if progress.start_iter and info.is_main:  # the epoch's running sums were saved over all ranks
        progress.sums = ckpt.get("epoch_sums")
    if "optimizer" in ckpt:
        try:
            opt.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"optimizer state in {args.resume} does not fit: {e}") from None
    if opt.scaler is not None and ckpt.get("scaler"):
        opt.scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    job.logger.info(f"=> resumed from {args.resume} ({runfolder.describe((progress.start_epoch, progress.start_iter), args.epochs)}, "
                    f"best {task.best_label} {progress.best:.3f})")
    if not progress.rows and info.is_main:  # older checkpoints carry no rows: keep the file's
        progress.rows = runfolder.read_rows(job.run_dir / runfolder.METRICS)
    return progress


def checkpoint_state(args, job, nets, opt, progress, epoch, iteration=0, epoch_sums=None):
    return {"epoch": epoch, "iteration": iteration, "arch": args.arch, "attention_type": args.attention_type,
            "attention_param": effective_param(args), "num_classes": len(job.classes), "seed": job.seed,
            "state_dict": nets.raw.state_dict(), "best_acc1": progress.best, "best_epoch": progress.best_epoch,
            "best_of": progress.best_of, "model_ema": nets.ema.state_dict() if nets.ema is not None else None,
            "optimizer": opt.optimizer.state_dict(),
            "scaler": opt.scaler.state_dict() if opt.scaler is not None else None,
            "rng": rng_state(), "metrics": progress.rows, "epoch_sums": epoch_sums, "classes": list(job.classes),
            "args": json.loads(json.dumps(vars(args), default=str))}


def train_epochs(args, task, info, job, nets, opt, progress, train_loader, val_loader):
    """The epochs: train, validate (model and EMA), save, log; a stop signal saves and raises Preempted."""
    device, logger, run_dir = job.device, job.logger, job.run_dir
    # Stops and saves fall on optimizer steps (every `accum` batches): the ranks agree every print_freq of them.
    flags = StopFlags(device, info.distributed, agree_every=args.print_freq * opt.stepper.accum,
                      save_every_minutes=args.save_every_minutes, is_main=info.is_main).install()

    def boundary(epoch):
        def at(done, get_sums):
            stop, save = flags.poll(done)
            if stop or save:
                # The checkpoint holds the sums over all ranks; a resumed rank 0 carries them on.
                s = get_sums()
                keys = sorted(k for k in s if k != "time")  # counts add up over ranks; the clock does not
                totals = dict(zip(keys, all_reduce_sum([s[k] for k in keys], device)), time=s["time"])
                if info.is_main:
                    save_atomic(checkpoint_state(args, job, nets, opt, progress, epoch, done, totals),
                                run_dir / runfolder.CHECKPOINT)
                flags.saved()
                barrier()
                if not stop:
                    logger.info(f"saved {run_dir / runfolder.CHECKPOINT} at epoch {epoch + 1}, iteration "
                                f"{done}/{len(train_loader)} (--save-every-minutes)")
            return stop
        return at

    try:
        for epoch in range(progress.start_epoch, args.epochs):
            first = epoch == progress.start_epoch
            try:
                skip = progress.start_iter if first else 0  # a mid-epoch checkpoint's batches already done
                batches = watch_workers(train_loader(epoch, skip), None if info.distributed else flags)
                tr = task.train_one_epoch(nets.train_model, batches, opt.criterion, opt.optimizer,
                                          opt.lr_fn, epoch, device, scaler=opt.scaler, amp_dtype=job.amp_dtype,
                                          channels_last=args.channels_last, print_freq=args.print_freq, logger=logger,
                                          start_iter=skip, sums=progress.sums if first else None,
                                          boundary=boundary(epoch), **opt.loop_kwargs)
            except NonFiniteLossError as e:
                raise UserError(f"{e}; last good checkpoint kept: {last_good(run_dir)}") from None
            except ValueError as e:
                if "Expected more than 1 value per channel" not in str(e):
                    raise
                raise UserError(f"-b {args.batch_size}: {job.batch} image(s) per process meet a 1x1 feature map, where "
                                f"BatchNorm needs more than one value per channel; raise -b or the crop size") from None
            if tr["interrupted"] and flags.fault and not flags.signum:  # a loader worker died or stopped
                raise UserError(f"{flags.fault}; stopped {saved_at(epoch, tr['iteration'], len(train_loader), run_dir)}")
            if tr["interrupted"]:
                raise stopped(flags.signum, epoch, tr["iteration"], len(train_loader), run_dir, logger)
            end_epoch(args, task, info, job, nets, opt, progress, epoch, tr, val_loader)
            flags.saved()
            barrier()  # no rank starts the next epoch before rank 0 has its checkpoint on disk
            if epoch + 1 < args.epochs and flags.poll(0, force=True)[0]:
                raise stopped(flags.signum, epoch + 1, 0, len(train_loader), run_dir, logger)
    finally:
        flags.uninstall()


def end_epoch(args, task, info, job, nets, opt, progress, epoch, tr, val_loader):
    """Validate the model (and its EMA), pick model_best, save the checkpoint, the row and the line."""
    summary, val_row = task.summary or classification_summary, task.val_row or classification_val_row
    run_dir = job.run_dir
    broadcast_buffers(nets.raw)  # every rank evaluates exactly the weights rank 0 saves
    t_val = time.time()
    va = validate(args, task, job, nets.eval_model, val_loader(epoch))
    val = val_row(va)
    va_ema = None
    if nets.ema is not None:
        # The EMA's averaged BatchNorm statistics come from each rank's own: rank 0's count.
        broadcast_buffers(nets.ema)
        va_ema = validate(args, task, job, nets.ema.module, val_loader(epoch), "val EMA")
        val.update({f"val_ema_{k.removeprefix('val_')}": v for k, v in val_row(va_ema).items()})
    bad = [k for k, v in val.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise UserError(f"validation {bad[0].removeprefix('val_').replace('_', ' ')} is {val[bad[0]]} at "
                        f"epoch {epoch + 1}: stopping; last good checkpoint kept: {last_good(run_dir)}")
    # model_best: the better of the model and its EMA (the model on a tie), and it says which.
    score, source = va[task.best_key], "model"
    if va_ema is not None and va_ema[task.best_key] > score:
        score, source = va_ema[task.best_key], "ema"
    is_best = score > progress.best or (progress.best_epoch is None and progress.best == 0)  # a fresh run's first epoch
    if is_best:
        progress.best, progress.best_epoch = score, epoch + 1
        progress.best_of = source if nets.ema is not None else None
    row = {"epoch": epoch + 1, "lr": opt.lr_fn(epoch, 0), "train_loss": tr["loss"],
           **({"train_acc1": tr["acc1"]} if "acc1" in tr else {}), **val,
           "epoch_time": tr["time"] + time.time() - t_val,
           "images_per_sec": tr["images"] / tr["time"], "skipped_images": tr["skipped"] + va["skipped"]}
    progress.rows.append(row)
    if info.is_main:
        # Order matters for a kill in between: the checkpoint carries every row and the best
        # epoch, so a resume rewrites metrics.jsonl and model_best from it (runfolder.repair).
        save_atomic(checkpoint_state(args, job, nets, opt, progress, epoch + 1), run_dir / runfolder.CHECKPOINT)
        if is_best:
            runfolder.copy_atomic(run_dir / runfolder.CHECKPOINT, run_dir / runfolder.BEST)
        runfolder.append_row(run_dir / runfolder.METRICS, row)
    job.logger.info(f"Epoch {epoch + 1}/{args.epochs}: train loss {tr['loss']:.4f}"
                    + (f" acc@1 {tr['acc1']:.2f}" if "acc1" in tr else "") + f" | val {summary(va)} | "
                    + (f"EMA {summary(va_ema)} | " if va_ema is not None else "")
                    + f"best {progress.best:.3f}" + (f" ({progress.best_of})" if progress.best_of else "")
                    + f" | {row['epoch_time']:.1f}s, {row['images_per_sec']:.1f} img/s"
                    + (f" | skipped {row['skipped_images']} unreadable images" if row["skipped_images"] else ""))


def report(task, job, progress):
    job.logger.info(f"done: best {task.best_label} {progress.best:.3f}; run folder: {job.run_dir}")
    if job.folder_lock is not None:  # rank 0's
        job.folder_lock.close()
    return {"best_acc1": progress.best, "run_dir": job.run_dir}


def ema_from(args, model, ckpt, world_size, per_rank_batch, device, logger):
    """--model-ema's average of `model` (None without it); a checkpoint's EMA state when it has one.
    `-e` evaluates the checkpoint's EMA whenever it holds one."""
    saved = ckpt.get("model_ema") if isinstance(ckpt, dict) else None
    if args.evaluate:
        if not saved:
            return None
        ema = ExponentialMovingAverage(model, 0.0, device=device)
    elif not getattr(args, "model_ema", False):
        if saved:
            logger.info(f"note: {args.resume} holds an EMA; this run has no --model-ema and drops it")
        return None
    else:
        ema = make_ema(model, args, world_size, per_rank_batch, device)
        if ckpt is not None and not saved:
            logger.info(f"note: {args.resume} holds no EMA: the EMA starts from its weights")
    if saved:
        try:
            ema.load_state_dict(saved)
        except RuntimeError as e:
            raise UserError(f"EMA state in {args.resume} does not fit this model: {str(e).splitlines()[0]}") from None
    return ema


def choose_seed(args, ckpt, device, info):
    """--seed, else the seed the resumed run used, else a fresh one; the same on every rank."""
    recorded = ckpt.get("seed") if isinstance(ckpt, dict) else None
    if recorded is not None:  # an older version took any integer: the samplers failed at the next epoch
        check_number(f"the seed recorded in {args.resume}", int(recorded), 0, SEED_MAX)
    if args.seed is not None:
        if recorded is not None and int(recorded) != args.seed:
            raise UserError(f"--seed {args.seed}, but {args.resume} was trained with seed {recorded}: "
                            f"resume without --seed (or with --seed {recorded})")
        return args.seed
    if recorded is not None:
        return int(recorded)
    seed = int.from_bytes(os.urandom(4), "little") >> 1 if info.is_main else 0
    return int(all_reduce_sum([seed], device)[0])  # rank 0's: the sampler's shuffle must agree across ranks


def open_run_folder(run_dir, args, ckpt, info, logger):
    """Rank 0 locks the folder, decides (runfolder.decide) and repairs it; every rank gets the decision.

    Returns (state, lock file or None, notes: {"lines": [...], "recipe_defaults": ...}); raises the same
    UserError on every rank when refused.
    """
    lock, decision, notes = None, None, {}
    if info.is_main:
        try:
            lock = runfolder.lock(run_dir)
            runfolder.remove_stale_temporaries(run_dir, logger.info)
            notes["lines"], notes["recipe_defaults"] = check_recipe(run_dir, args)
            state = runfolder.decide(run_dir, args.resume, ckpt, args.epochs)
            if state == "finished":
                logger.info(f"run {run_dir} is already finished ({args.epochs}/{args.epochs} epochs, best "
                            f"{state_best(run_dir):.3f}): nothing to do (--resume its checkpoint with a higher "
                            f"--epochs to train on)")
            elif state == "resume":
                own = (run_dir / runfolder.CHECKPOINT).is_file() and \
                    os.path.samefile(args.resume, run_dir / runfolder.CHECKPOINT)
                runfolder.repair(run_dir, ckpt, own, logger.info)
            else:
                runfolder.write_rows(run_dir / runfolder.METRICS, [])  # a fresh run: no rows yet
            decision = ("ok", state)
        except UserError as e:
            decision = ("error", str(e))
    decision = broadcast_object(decision)
    if decision[0] == "error":
        if lock is not None:
            lock.close()
        raise UserError(decision[1])
    return decision[1], lock, notes


def state_best(run_dir):
    ck = runfolder.peek(run_dir / runfolder.CHECKPOINT)
    return best_acc(ck) if ck else 0.0


def last_good(run_dir):
    kept = run_dir / runfolder.CHECKPOINT
    return kept if kept.exists() else "none yet"


def stopped(signum, epoch, iteration, iterations, run_dir, logger):
    """The one line a stop by signal prints, and the exception that exits with 128 + signum."""
    import signal
    name = signal.Signals(signum).name if signum else "a signal"
    msg = f"stopped by {name} {saved_at(epoch, iteration, iterations, run_dir)}"
    logger.info(msg)
    return Preempted(signum or 15, msg)


def saved_at(epoch, iteration, iterations, run_dir):
    where = f"epoch {epoch + 1}, iteration {iteration}/{iterations}" if iteration else f"the end of epoch {epoch}"
    return f"at {where}: checkpoint saved; continue with --resume {run_dir / runfolder.CHECKPOINT}"
