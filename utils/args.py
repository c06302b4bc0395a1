"""Command-line flags shared by the training scripts, and `--config FILE` (TOML) support.

The flag names and defaults follow the reference's main_imagenet.py, so its README commands run as
written. A config file's keys are argparse dest names (arch, batch_size, weight_decay, cos_lr, ...);
its values become parser defaults, so flags given on the command line still win.
"""
import argparse
import copy
import math
import sys
import tomllib
from pathlib import Path

from . import UserError


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter with list defaults shown as on the command line (`81 122`, not `[81, 122]`),
    so every help text can say `%(default)s` and never drift from the value."""

    def _expand_help(self, action):
        if isinstance(action.default, (list, tuple)):
            action = copy.copy(action)
            action.default = " ".join(map(str, action.default))
        return super()._expand_help(action)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage dump) and exits with 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def set_help(parser, **helps):
    """Replace the help text of the parser's flags, by dest (a script's own wording of a shared flag)."""
    actions = {a.dest: a for a in parser._actions}
    for dest, text in helps.items():
        actions[dest].help = text


def attention_help():
    """--attention_type's choices and each module's default parameter, read from the registry when the
    parser is built, so a module added to networks/attentions/ATTENTIONS shows in --help unedited."""
    from networks.attentions import ATTENTIONS
    defaults = ", ".join(f"{name} {'adaptive' if name == 'eca' else f'{cls.default_param:g}'}"
                         for name, cls in ATTENTIONS.items() if cls.default_param is not None or name == "eca")
    return "none | " + " | ".join(ATTENTIONS), defaults


# The classifiers' loss and schedule flags, off: a detector (main_coco.py) is not offered them.
CLASSIFIER_ONLY = {"cos_lr": False, "cos_ref_shift": False, "warmup_epochs": 0.0, "label_smoothing": 0.0}


def get_args_parser(description="Train or evaluate an image classifier", add_help=True, archs=None, classifier=True):
    """The flags every training script has; scripts add their own (data, crop sizes...) to it and set
    their own defaults (set_defaults: the help texts say %(default)s). archs: the -a names listed in
    --help (default: the ImageNet models of networks' registry). classifier=False leaves out the
    classifiers' loss and schedule flags (CLASSIFIER_ONLY: a detector has its own schedule and losses);
    their dests keep their off values, so the trainer reads them as for any run."""
    if archs is None:
        from networks import model_names
        archs = model_names("imagenet")
    attentions, param_defaults = attention_help()
    p = Parser(description=description, add_help=add_help)
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML file of defaults (keys are the dest names of these flags); flags override it")
    p.add_argument("-a", "--arch", metavar="ARCH", default="resnet18",
                   help=f"model architecture: {' | '.join(archs)} (default: %(default)s)")
    p.add_argument("--attention_type", metavar="TYPE", default="none",
                   help=f"attention module in every block: {attentions} (default: %(default)s)")
    p.add_argument("--attention_param", type=float, default=None, metavar="P",
                   help="the module's parameter: SE/CBAM/GC/CoordAtt reduction, SimAM lambda, ECA kernel size "
                        f"(default: the module's own: {param_defaults})")
    p.add_argument("--epochs", default=90, type=int, metavar="N", help="total epochs (default: %(default)s)")
    p.add_argument("-b", "--batch-size", default=256, type=int, metavar="N", dest="batch_size",
                   help="total batch size over all processes (default: %(default)s)")
    p.add_argument("--lr", "--learning-rate", default=0.1, type=float, metavar="LR", dest="lr",
                   help="initial learning rate (default: %(default)s)")
    p.add_argument("--momentum", default=0.9, type=float, metavar="M", help="SGD momentum (default: %(default)s)")
    p.add_argument("--wd", "--weight-decay", default=1e-4, type=float, metavar="W", dest="weight_decay",
                   help="weight decay (default: %(default)s)")
    if classifier:
        p.add_argument("--cos_lr", action="store_true",
                       help="cosine learning rate, updated every iteration (default: off, x0.1 every 30 epochs)")
        p.add_argument("--cos-ref-shift", action="store_true", dest="cos_ref_shift",
                       help="with --cos_lr: the reference's per-epoch cosine, shifted by one epoch")
        p.add_argument("--warmup-epochs", default=0.0, type=float, dest="warmup_epochs", metavar="E",
                       help="linear warm-up length in epochs, fractions allowed (default: %(default)s)")
        p.add_argument("--label-smoothing", default=0.0, type=float, dest="label_smoothing", metavar="S",
                       help="cross-entropy label smoothing of the training loss (default: %(default)s)")
    else:
        p.set_defaults(**CLASSIFIER_ONLY)
    p.add_argument("-j", "--workers", default=4, type=int, metavar="N",
                   help="data loading workers per node, shared by its processes (default: %(default)s)")
    p.add_argument("-p", "--print-freq", default=10, type=int, metavar="N", dest="print_freq",
                   help="print (or log, under a progress bar) every N iterations (default: %(default)s)")
    p.add_argument("--seed", default=None, type=int, metavar="S",
                   help="seed for initialisation, shuffling and augmentation; adds -seedS to the run folder "
                        "(default: none, one is drawn)")
    p.add_argument("--resume", default="", type=str, metavar="PATH", help="checkpoint to continue from")
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate the --resume checkpoint and exit")
    p.add_argument("--ckpt", default="checkpoints", metavar="DIR",
                   help="folder of run folders (default: %(default)s)")
    p.add_argument("--gpu", default=None, metavar="IDS",
                   help="GPU ids, e.g. 0 or 0,1,2,3: one DDP process per listed GPU, started by this command "
                        "(under torchrun: local rank i uses the i-th); -1: CPU "
                        "(default: cuda:LOCAL_RANK; the CPU without CUDA)")
    p.add_argument("--nproc", default=None, type=int, metavar="N",
                   help="start N DDP processes on this machine (torch.multiprocessing; gloo on the CPU, the "
                        "first N GPUs of --gpu otherwise); -b stays the total batch")
    p.add_argument("--save-every-minutes", default=None, type=float, metavar="M", dest="save_every_minutes",
                   help="also write the checkpoint every M minutes inside an epoch (default: off)")
    p.add_argument("--save_weights", default=None, metavar="PATH",
                   help="write the --resume checkpoint's weights as a plain state_dict and exit")
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                   help="mixed precision: autocast; fp16 adds a GradScaler (default: %(default)s)")
    p.add_argument("--channels-last", action="store_true", dest="channels_last",
                   help="channels_last (NHWC) memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p


AUTO_AUGMENT_POLICIES = ("ta_wide", "ra", "augmix", "imagenet", "cifar10")


def add_recipe_args(p):
    """Modern-recipe flags of the classifiers (ImageNet, CIFAR), named as torchvision's classification
    reference names them; the defaults switch every feature off, so the paper's recipe is unchanged.
    Also --pretrained (fine-tuning), the classifiers' own (main_coco.py has --pretrained-backbone)."""
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="start a new run from these weights (a checkpoint or state_dict of the same arch and "
                        "attention; a classifier of another class count is left out): fine-tuning")
    g = p.add_argument_group("modern training recipe (torchvision reference's flags; all off by default)")
    g.add_argument("--mixup-alpha", default=0.0, type=float, dest="mixup_alpha", metavar="A",
                   help="MixUp with Beta(A, A) mixing (0: off); with --cutmix-alpha one of the two per batch "
                        "(default: %(default)s)")
    g.add_argument("--cutmix-alpha", default=0.0, type=float, dest="cutmix_alpha", metavar="A",
                   help="CutMix alpha (0: off; default: %(default)s)")
    g.add_argument("--auto-augment", default=None, choices=AUTO_AUGMENT_POLICIES, dest="auto_augment", metavar="POLICY",
                   help="augmentation policy after the crop and flip: %(choices)s (default: none)")
    g.add_argument("--ra-magnitude", default=9, type=int, dest="ra_magnitude", metavar="M",
                   help="RandAugment magnitude (--auto-augment ra; default: %(default)s)")
    g.add_argument("--augmix-severity", default=3, type=int, dest="augmix_severity", metavar="S",
                   help="AugMix severity (--auto-augment augmix; default: %(default)s)")
    g.add_argument("--random-erase", default=0.0, type=float, dest="random_erase", metavar="P",
                   help="RandomErasing probability (default: %(default)s)")
    g.add_argument("--ra-reps", default=1, type=int, dest="ra_reps", metavar="N",
                   help="repeated augmentation: each image N times an epoch (torchvision's RASampler; 1: off; "
                        "default: %(default)s)")
    g.add_argument("--model-ema", action="store_true", dest="model_ema",
                   help="keep an exponential moving average of the weights and evaluate it too")
    g.add_argument("--model-ema-steps", default=32, type=int, dest="model_ema_steps", metavar="S",
                   help="update the EMA every S optimizer steps (default: %(default)s)")
    g.add_argument("--model-ema-decay", default=0.99998, type=float, dest="model_ema_decay", metavar="D",
                   help="EMA decay, adjusted for batch and epochs as torchvision's reference (default: %(default)s)")
    g.add_argument("--use-ema", action="store_true", dest="use_ema",
                   help="with --save_weights: export the EMA weights")
    g.add_argument("--norm-weight-decay", default=None, type=float, dest="norm_weight_decay", metavar="W",
                   help="weight decay of normalization layers' parameters (default: --wd)")
    g.add_argument("--bias-weight-decay", default=None, type=float, dest="bias_weight_decay", metavar="W",
                   help="weight decay of biases (default: --wd)")
    g.add_argument("--clip-grad-norm", default=None, type=float, dest="clip_grad_norm", metavar="X",
                   help="clip the gradients' total norm to X (default: off)")
    g.add_argument("--sync-bn", action="store_true", dest="sync_bn", help="SyncBatchNorm under DDP")
    g.add_argument("--grad-accum-steps", default=1, type=int, dest="grad_accum_steps", metavar="N",
                   help="one optimizer step every N batches (default: %(default)s)")
    g.add_argument("--lr-warmup-method", default="linear", choices=("linear", "constant"), dest="lr_warmup_method",
                   help="warm-up shape during --warmup-epochs (default: %(default)s)")
    g.add_argument("--lr-warmup-decay", default=None, type=float, dest="lr_warmup_decay", metavar="F",
                   help="warm-up start factor (default: the linear ramp from lr / warm-up iterations; "
                        "with --lr-scheduler or --lr-warmup-method constant torchvision's 0.01)")
    g.add_argument("--lr-scheduler", default=None, choices=("cosineannealinglr",), dest="lr_scheduler",
                   help="torchvision's per-epoch schedule: cosine from the end of --warmup-epochs (whole epochs) "
                        "to --lr-min, the lr constant within an epoch (default: the trainer's step or --cos_lr)")
    g.add_argument("--lr-min", default=0.0, type=float, dest="lr_min", metavar="LR",
                   help="with --lr-scheduler cosineannealinglr: the final lr (eta_min; default: %(default)s)")
    return p


# The policies' own limits (torchvision.transforms.v2): RandAugment indexes num_magnitude_bins=31 magnitudes
# with --ra-magnitude, AugMix refuses a severity outside 1..10 (its _PARAMETER_MAX).
RA_MAGNITUDE_MAX = 30
AUGMIX_SEVERITY_MAX = 10
# --seed: numpy seeds take 32 bits, and every consumer adds at most the epoch (sampler seed + epoch) to it.
SEED_MAX = 2**32 - 1


def check_number(flag, value, low=None, high=None, low_open=False, high_open=False):
    """UserError (one line) unless `value` is a finite number within the bounds (None: unbounded; low_open /
    high_open: the bound itself is excluded). None values (an optional flag left off) pass."""
    if value is None:
        return
    finite = isinstance(value, int) or math.isfinite(value)  # int: math.isfinite overflows on huge ints
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    if finite and above and below:
        return
    if low is not None and high is not None:
        want = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif isinstance(value, int) and not low_open:
        want = f"at least {low}"
    else:
        want = f"a finite number {'>' if low_open else '>='} {low}"
    raise UserError(f"{flag} must be {want}, got {value}")


def check_recipe_args(args):
    """The recipe flags' ranges, checked before anything is built (no-op for scripts without them)."""
    if not hasattr(args, "mixup_alpha"):
        return
    for flag, v in (("--mixup-alpha", args.mixup_alpha), ("--cutmix-alpha", args.cutmix_alpha),
                    ("--norm-weight-decay", args.norm_weight_decay), ("--bias-weight-decay", args.bias_weight_decay),
                    ("--lr-min", args.lr_min)):
        check_number(flag, v, 0)
    for flag, v in (("--random-erase", args.random_erase), ("--model-ema-decay", args.model_ema_decay)):
        check_number(flag, v, 0, 1)
    check_number("--lr-warmup-decay", args.lr_warmup_decay, 0, 1, low_open=True)
    for flag, v in (("--ra-reps", args.ra_reps), ("--grad-accum-steps", args.grad_accum_steps),
                    ("--model-ema-steps", args.model_ema_steps)):
        check_number(flag, v, 1)
    check_number("--ra-magnitude", args.ra_magnitude, 0, RA_MAGNITUDE_MAX)
    check_number("--augmix-severity", args.augmix_severity, 1, AUGMIX_SEVERITY_MAX)
    check_number("--clip-grad-norm", args.clip_grad_norm, 0, low_open=True)  # 0 would zero every gradient
    if args.lr_scheduler is None and args.lr_min:
        raise UserError("--lr-min goes with --lr-scheduler cosineannealinglr")
    if args.lr_scheduler is not None:
        if args.cos_lr:
            raise UserError(f"--lr-scheduler {args.lr_scheduler} and --cos_lr are two schedules: choose one")
        if args.warmup_epochs != int(args.warmup_epochs):
            raise UserError(f"--lr-scheduler {args.lr_scheduler} steps once per epoch: --warmup-epochs must be "
                            f"a whole number, got {args.warmup_epochs}")
    if args.use_ema and not args.save_weights:
        raise UserError("--use-ema goes with --save_weights (it exports the EMA weights)")


class Args(argparse.Namespace):
    """The parsed flags. `given` (a slot, so vars(args), args.json and the checkpoint hold the flags
    only) is the set of dests set on the command line itself, not by a default or --config: what a
    run or a checkpoint records fills in the rest (utils.args.given). `defaults` (a slot) is the
    parser's defaults after --config: the run folder's digest names the recipe's differences from
    them (utils.recipe)."""
    __slots__ = ("given", "defaults")


def given(args):
    """The dests the command line set itself; empty for a Namespace built elsewhere."""
    return getattr(args, "given", None) or frozenset()


def given_dests(parser, argv):
    """Which dests `argv` sets explicitly: argv parsed by a copy of the parser that has no defaults."""
    bare = copy.deepcopy(parser)
    bare._defaults = {}
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(bare.parse_args(argv)))


def parse_args(parser, argv=None, resolve=None):
    """parse_args with `--config FILE` defaults applied first; unknown keys are an error.
    The result's `.given` names the flags the command line set itself, `.defaults` the parser's
    defaults after the config. `--config RUN/args.json` replays a run's recorded flags. With
    `--resume` of a checkpoint that records its run's settings, those fill what the command line
    does not give (utils.recipe.fill_from_record). resolve: args -> args, the script's own completion
    of its defaults (main_coco.py's), applied before a resumed run's settings are compared."""
    from . import recipe
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    base = None
    if known.config and str(known.config).endswith(".json"):
        cfg, base = load_run_settings(parser, known.config)
        parser.set_defaults(**cfg)
    elif known.config:
        parser.set_defaults(**load_config(parser, known.config))
    args = parser.parse_args(argv, namespace=Args())
    args.given = given_dests(parser, argv)
    defaults = {a.dest: parser.get_default(a.dest) for a in parser._actions if a.dest not in ("help",)}
    if base is not None:  # the replayed run's own defaults, so its folder name comes out the same
        defaults.update({k: v for k, v in base.items() if k in defaults})
    args.defaults = defaults
    _floats(parser, args, defaults)
    if resolve is not None:
        args = resolve(args)
    if getattr(args, "resume", "") and not args.evaluate and not args.save_weights and Path(args.resume).is_file():
        from .lifecycle.runfolder import peek
        record = recipe.recorded_settings(peek(args.resume))
        if record is not None:
            recipe.fill_from_record(args, record, args.resume)
    return args


def _floats(parser, args, defaults):
    """A float flag's integer (`lr = 1` in a config) as a float, so equal settings compare and hash equal."""
    def as_float(v):
        if isinstance(v, list):
            return [as_float(x) for x in v]
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v
    for a in parser._actions:
        if a.type is float:
            if hasattr(args, a.dest):
                setattr(args, a.dest, as_float(getattr(args, a.dest)))
            if a.dest in defaults:
                defaults[a.dest] = as_float(defaults[a.dest])


def load_run_settings(parser, path):
    """`--config RUN/args.json`: the recorded flags (not its other keys, nor one-off actions such as
    --resume), and the recipe defaults the run measured its folder name against."""
    from .recipe import NOT_REPLAYED, read_json_config
    if not Path(path).is_file():
        raise UserError(f"config file not found: {path}")
    rec, base = read_json_config(path)
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    return {k: v for k, v in rec.items() if k in dests and k not in NOT_REPLAYED}, base


def load_config(parser, path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        cfg = tomllib.loads(path.read_bytes().decode("utf-8"))  # TOML is UTF-8, whatever the locale
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not a text (UTF-8 TOML) file: byte {e.start} is "
                        f"0x{e.object[e.start]:02x} (a binary file, e.g. a checkpoint, passed as --config?)") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    for key, value in cfg.items():
        if key not in actions:
            raise UserError(f"unknown key {key!r} in config file {path}")
        expected = _expected_type(actions[key])
        if not _is_a(value, expected):
            raise UserError(f"config file {path}: {key} = {value!r} is {_toml_kind(value)}, "
                            f"expected {_describe(expected)}")
        choices = actions[key].choices
        if choices is not None and value not in choices:
            raise UserError(f"config file {path}: {key} = {value!r}, expected one of {', '.join(map(str, choices))}")
    return cfg


_KINDS = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}


def _expected_type(action):
    """(type, is_list) a config key must have: what its command-line flag parses to."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return bool, False
    return (action.type if action.type in (int, float) else str), action.nargs in ("+", "*")


def _describe(expected):
    kind, is_list = expected
    return f"a list of {_KINDS[kind].split(' ')[1]}s" if is_list else _KINDS[kind]


def _is_a(value, expected):
    kind, is_list = expected
    if is_list:
        return isinstance(value, list) and all(_is_a(v, (kind, False)) for v in value)
    if isinstance(value, bool) or kind is bool:  # TOML's true is not the number 1, nor "false" a boolean
        return isinstance(value, bool) and kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _toml_kind(value):
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def parse_gpu_ids(text):
    """The reference's --gpu syntax: "0,1,2,3" -> [0, 1, 2, 3]; negative ids -> [] (CPU); None -> None."""
    if text is None:
        return None
    try:
        ids = [int(g) for g in str(text).split(",") if g.strip()]
    except ValueError:
        raise UserError(f"--gpu expects comma-separated integers, got {text!r}") from None
    return [g for g in ids if g >= 0]
