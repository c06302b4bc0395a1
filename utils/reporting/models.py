"""A model from a checkpoint, ours or the reference's: find the file, tell what it is, build it, load it.

Shared by scripts/eval_checkpoints.py and scripts/gradcam.py. Our checkpoints record arch, attention
type and parameter. The reference's record only `arch`, so the attention type is found from the
state_dict's layout; SimAM's lambda leaves no trace in the weights, so it is given, else the value
the reference trained with (0.1 on ImageNet, 1e-4 on CIFAR).
"""
import json
import sys
from pathlib import Path

from .. import UserError
from ..lifecycle.checkpoint import check_identity, load_checkpoint, load_model_weights, model_state, recorded_settings
from ..trainer import num_classes_of

SIMAM_LAMBDA = {"imagenet": 0.1, "cifar": 1e-4}  # the reference's runs, for checkpoints that do not record it


def checkpoint_file(path):
    """A .pth.tar file, or a run folder's model_best.pth.tar (else its checkpoint.pth.tar)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model_best.pth.tar", "checkpoint.pth.tar"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"no model_best.pth.tar or checkpoint.pth.tar in {path}")
    return path


def fits(model, sd):
    own = model.state_dict()
    return own.keys() == sd.keys() and all(own[k].shape == sd[k].shape for k in own)


def identify(ckpt, path, arch=None, attention_type=None, attention_param=None, archs=None):
    """(arch, attention_type, attention_param) of a checkpoint: recorded, given, or inferred.

    Given values must agree with recorded ones (utils.lifecycle.checkpoint.check_identity); `archs` limits
    the architectures accepted (default: every registered one).
    """
    from networks import ATTENTION_CHOICES, MODELS, create_net
    from networks.attentions import resolve_param
    archs = tuple(MODELS) if archs is None else tuple(archs)
    sd = model_state(ckpt)
    rec = ckpt if isinstance(ckpt, dict) else {}
    if any(k.startswith("roi_heads.") for k in sd):
        raise UserError(f"{path} is a COCO detector's checkpoint, not a classifier's: evaluate it with "
                        f"main_coco.py DATA -e --resume {path}")
    found_arch = rec.get("arch") or arch
    if found_arch is None:
        raise UserError(f"{path} does not record its architecture: pass -a ARCH")
    if found_arch not in archs:
        raise UserError(f"{path}: unknown arch {found_arch!r}; choose one of: {', '.join(archs)}")
    att = rec.get("attention_type") or attention_type
    if att is None:  # the reference's checkpoints: the layout tells the module apart
        n = num_classes_of(sd)
        att = next((t for t in ATTENTION_CHOICES if fits(create_net(found_arch, t, None, num_classes=n), sd)), None)
        if att is None:
            raise UserError(f"{path} fits no {found_arch} with attention {', '.join(ATTENTION_CHOICES)}")
    param = rec.get("attention_param", attention_param)
    if attention_param is not None and param is not None and float(param) != float(attention_param):
        # Evaluating another parameter on purpose (SimAM's lambda leaves the weights as they are): said, then used.
        print(f"note: {path}: --attention_param {attention_param} given; it was trained with {param}", file=sys.stderr)
        param = attention_param
    if param is None and att == "simam":
        param = SIMAM_LAMBDA[MODELS[found_arch][1]]
        print(f"note: {path} does not record SimAM's lambda; using {param} (override: --attention_param)",
              file=sys.stderr)
    try:
        param = resolve_param(att, param)
    except ValueError as e:  # a given --attention_param the module cannot take
        raise UserError(f"{path}: --attention_param: {e}") from None
    check_identity(ckpt, path, found_arch if arch is None else arch,
                   att if attention_type is None else attention_type, param, check_param=False)
    return found_arch, att, param


def run_args(path):
    """The args.json of the run folder that holds checkpoint `path` (or is `path`), else None."""
    path = Path(path)
    for d in (path, path.parent):
        if (d / "args.json").is_file():
            try:
                return json.loads((d / "args.json").read_text())
            except json.JSONDecodeError:
                raise UserError(f"{d / 'args.json'} is not JSON") from None
    return None


def load_model(path, arch=None, attention_type=None, attention_param=None, archs=None):
    """(model in eval mode, info) for a checkpoint file or run folder.

    info: path (the file read), arch, attention_type, attention_param, dataset ("imagenet" or
    "cifar": the registry's family of the arch), num_classes, args (the run's args.json or None).
    """
    from networks import MODELS, create_net
    file = checkpoint_file(path)
    ckpt = load_checkpoint(file)
    arch, att, param = identify(ckpt, file, arch, attention_type, attention_param, archs)
    n = num_classes_of(model_state(ckpt))
    model = create_net(arch, att, param, num_classes=n)
    load_model_weights(model, ckpt, file)
    info = {"path": file, "arch": arch, "attention_type": att, "attention_param": param,
            "dataset": MODELS[arch][1], "num_classes": n, "args": recorded_settings(ckpt, file) or run_args(path)}
    return model.eval(), info
