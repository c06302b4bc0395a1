"""A run is its recipe: the settings that change what is trained, and the run folder they name.

Every flag of the training scripts is recipe except those in NOT_RECIPE (how a run is executed, logged,
saved or looked at); a new flag is recipe unless it is added there. The run folder is the readable
name (run_name, below: task, arch, attention, parameter, seed) plus, when the recipe differs from
the command's defaults (the parser's, after --config), an 8-hex digest of those differing settings:
default commands and the paper's configs keep their plain names, and a sweep over any flag gets one
folder per value. The data root is no recipe flag (a moved dataset is the same data): its real path
is recorded in args.json and checked separately (utils.trainer).
"""
import hashlib
import json
import os
from pathlib import Path

from . import UserError

# Not recipe: execution, output and look-up flags, the evaluation batch (CIFAR's), the data's location
# and the seed (in the name).
NOT_RECIPE = frozenset({
    "config", "workers", "print_freq", "resume", "evaluate", "ckpt", "gpu", "nproc", "save_every_minutes",
    "save_weights", "use_ema", "compile", "channels_last", "test_batch_size", "seed", "data", "dataset_dir"})
# Recipe already spelled in the readable name: not part of the digest.
NAMED = frozenset({"arch", "attention_type", "attention_param", "dataset", "detector"})
# What a resumed run's record fills in besides its recipe when the command does not give them.
FILLED_ON_RESUME = frozenset({"seed", "data", "dataset_dir"})
# args.json keys a replay (--config RUN/args.json) does not take: one-off actions of that command.
NOT_REPLAYED = frozenset({"config", "resume", "evaluate", "save_weights", "use_ema"})


def canonical(value):
    """A value as JSON text, so a setting from a flag, a TOML file or args.json compares equal
    (utils.args.parse_args makes a float flag's integers floats)."""
    return json.dumps(value, sort_keys=True, default=str)


def recipe(settings):
    """The recipe part of a dict of settings (vars(args), args.json, a checkpoint's "args")."""
    return {k: v for k, v in settings.items() if k not in NOT_RECIPE}


def changes(args):
    """{dest: value} of the recipe settings (outside the readable name) that differ from the command's
    defaults (the parser's after --config; args.defaults)."""
    defaults = getattr(args, "defaults", None) or {}
    return {k: v for k, v in sorted(recipe(vars(args)).items())
            if k not in NAMED and k in defaults and canonical(v) != canonical(defaults[k])}


def digest(diff):
    """8 hex digits of sha1 over the canonical JSON of `diff`; "" for no difference."""
    if not diff:
        return ""
    text = json.dumps(diff, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def describe(diff):
    """e.g. "lr=0.01 epochs=1"."""
    return " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in diff.items())


def folder_name(prefix, args):
    """The run folder's name for `args` (run_name, below plus the recipe digest before the seed)."""
    from networks.attentions import resolve_param
    return run_name(prefix, args.arch, args.attention_type, resolve_param(args.attention_type, args.attention_param),
                    args.seed, digest(changes(args)))


def recipe_defaults(args):
    """The recipe part of the command's defaults, recorded in args.json so that `--config RUN/args.json`
    measures its differences from the same defaults (and lands in a folder of the same name)."""
    return recipe(getattr(args, "defaults", None) or {})


def differences(a, b, skip=()):
    """Recipe keys whose values differ between settings `a` and `b` (dicts); a key one of them lacks
    (a flag newer than the run) is not compared."""
    ra, rb = recipe(a), recipe(b)
    return [k for k in sorted(ra) if k in rb and k not in skip and canonical(ra[k]) != canonical(rb[k])]


def list_differences(keys, ours, theirs):
    """ "lr=0.1 (the run: 0.01), weight_decay=..." for a one-line message (the settings' names are the
    config keys, as in the "recipe:" line and args.json)."""
    return ", ".join(f"{k}={json.dumps(ours.get(k), default=str)} "
                     f"(the run: {json.dumps(theirs.get(k), default=str)})" for k in keys)


def data_root(args):
    """The data's real path (ImageNet/COCO: DATA; CIFAR: --dataset_dir), or None."""
    root = getattr(args, "data", None) or getattr(args, "dataset_dir", None)
    return os.path.realpath(root) if root else None


def recorded_settings(ckpt):
    """The settings a checkpoint of ours records ("args"), or None (foreign or older checkpoints)."""
    rec = ckpt.get("args") if isinstance(ckpt, dict) else None
    return rec if isinstance(rec, dict) and "arch" in rec else None


def fill_from_record(args, record, source):
    """--resume: the resumed run's recorded settings fill every recipe setting (and the seed and data
    location) the command line did not give; a given recipe setting that differs is refused, except
    --epochs raised above the run's (the run trains on). The command's own --config does not count as
    given: the run's record wins over it."""
    from networks.attentions import resolve_param
    given = getattr(args, "given", None) or frozenset()
    ours = vars(args)
    try:  # SimAM's 0.1 is its None: the same run
        same_param = resolve_param(ours["attention_type"], ours["attention_param"]) == \
            resolve_param(record.get("attention_type", "none"), record.get("attention_param"))
    except (KeyError, ValueError):  # an unknown type: named by check_args or by the difference below
        same_param = False
    differ = [k for k in differences(ours, record) if k in given
              and not (k == "epochs" and int(ours[k]) > int(record[k]))
              and not (k == "attention_param" and same_param)]
    if differ:
        raise UserError(f"--resume {source} continues a run of other settings: "
                        f"{list_differences(differ, ours, record)}; "
                        f"resume without them (the run's own are used), or start a new run without --resume")
    for k, v in record.items():
        if k in ours and k not in given and (k in FILLED_ON_RESUME or k not in NOT_RECIPE):
            setattr(args, k, v)


def read_json_config(path):
    """`--config RUN/args.json`: (flags, recipe defaults or None) of a run's recorded settings."""
    try:
        rec = json.loads(Path(path).read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"config file {path} is not valid JSON (a run's args.json): {e}") from None
    if not isinstance(rec, dict) or "arch" not in rec:
        raise UserError(f"config file {path} is not a run's args.json (no 'arch' key)")
    base = rec.get("recipe_defaults")
    return rec, (base if isinstance(base, dict) else None)


def run_name(prefix, arch, attention_type, attention_param, seed, digest=""):
    """The reference's run-folder name: <prefix>-<arch>[-<attention>-param<p>][-<digest>][-seed<s>].
    digest: utils.recipe's 8 hex digits of the recipe's non-default settings ("" for none), before
    the seed so that one recipe's seeds share a prefix."""
    name = f"{prefix}-{arch}"
    if attention_type != "none":  # parameter-free modules (srm, triplet, adaptive eca) have no -param part
        name += f"-{attention_type}" + ("" if attention_param is None else f"-param{float(attention_param)}")
    if digest:
        name += f"-{digest}"
    if seed is not None:
        name += f"-seed{seed}"
    return name
