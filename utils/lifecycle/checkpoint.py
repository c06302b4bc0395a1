"""Checkpoints: atomic writes, weights-only reads, strict and explained loading, RNG states.

Our checkpoints: {epoch (completed), arch, attention_type, attention_param, state_dict (no `module.`),
best_acc1, optimizer, scaler, rng, args}. The reference code's: {epoch, arch, state_dict with
`module.` keys, best_acc (a tensor), optimizer}. Both load here; nothing is ever unpickled as code.
"""
import os
import random
from pathlib import Path

import numpy as np
import torch

from .. import UserError
from .preempt import deferred_signals


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, flush + fsync, then rename over `path`.

    rename is atomic on POSIX, so a kill at any moment leaves either the old or the new file.
    Ctrl-C and the stop signals are held until the file is in place (then delivered).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = None
    with deferred_signals():
        try:
            with open(tmp, "wb") as f:
                writer = _Writer(f)
                torch.save(obj, writer)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise write_error(path, e) from None
            if writer is not None and writer.error is not None:  # torch's zip writer turned the disk's OSError into a RuntimeError
                raise write_error(path, writer.error) from None
            raise
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class _Writer:
    """The file torch.save writes to, keeping the OSError of a failed write (a full disk): torch's
    zip writer swallows it and raises RuntimeError("... unexpected pos ...") instead."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def _size(n):
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def write_error(path, e):
    """The UserError for a failed write of `path` (its temporary file already removed): the reason,
    the free space of its folder, and whether the previous file is still there."""
    import errno
    import shutil
    path = Path(path)
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}.get(
        e.errno, e.strerror or str(e))
    try:
        where = f"{_size(shutil.disk_usage(path.parent).free)} free in {path.parent}"
    except OSError:
        where = f"free space in {path.parent} unknown"
    kept = f"; the previous {path.name} is intact" if path.exists() and path.name != ".lock" else ""
    return UserError(f"cannot write {path}: {reason} ({where}){kept}")


def load_checkpoint(path):
    """Read a checkpoint with torch.load(weights_only=True); anything else is refused unexecuted."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code-carrying pickles, others for garbage
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"refusing to load {path}: not a plain weights file ({reason[:120]})") from None


def model_state(ckpt):
    """The model's state_dict from either format: a checkpoint dict or a bare state_dict."""
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError("checkpoint holds no state_dict of tensors")
    # DataParallel / DDP (the reference) and torch.compile add prefixes; the weights are the same.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def check_identity(ckpt, path, arch, attention_type, attention_param, check_param=True):
    """Name the first of arch / attention type / parameter that differs from this run's.
    check_param=False: evaluation with another parameter given on purpose (said by the caller)."""
    if not isinstance(ckpt, dict):
        return
    for key, want in (("arch", arch), ("attention_type", attention_type), ("attention_param", attention_param)):
        have = ckpt.get(key)
        if have is None or (key == "attention_param" and not check_param):  # the reference stored only `arch`
            continue
        if key == "attention_param" and want is not None and float(have) == float(want):
            continue
        if have != want:
            raise UserError(f"checkpoint {path} is for {key}={have!r}, but this run has {key}={want!r}")


def recorded_settings(ckpt, path):
    """What a checkpoint says about the run that wrote it: its flags (the checkpoint's "args", else the
    args.json of the run folder it sits in), with its own arch / attention_type / attention_param /
    classes on top. {} for a foreign checkpoint that records nothing (the reference's: `arch` at most)."""
    import json
    rec = dict(ckpt.get("args") or {}) if isinstance(ckpt, dict) else {}
    if not rec:
        run_args = Path(path).parent / "args.json"
        try:
            rec = json.loads(run_args.read_text()) if run_args.is_file() else {}
        except (OSError, ValueError):
            rec = {}
        rec = rec if isinstance(rec, dict) else {}
    if isinstance(ckpt, dict):
        for key in ("arch", "attention_type", "attention_param"):
            if ckpt.get(key) is not None:
                rec[key] = ckpt[key]
        if isinstance(ckpt.get("classes"), list):
            rec["class_names"] = ckpt["classes"]
    return rec


def check_class_names(ckpt, path, classes, data):
    """The class names `ckpt` was trained on (recorded since they are) against the data's: a renamed,
    added or removed class folder shifts every label after it, so any difference is refused."""
    recorded = ckpt.get("classes") if isinstance(ckpt, dict) else None
    if not isinstance(recorded, list):
        return  # older checkpoints and foreign ones record no names
    classes = list(classes)
    if recorded == classes:
        return
    if len(recorded) != len(classes):
        raise UserError(f"{path} was trained on {len(recorded)} classes, but {data} has {len(classes)}")
    i = next(i for i, (a, b) in enumerate(zip(recorded, classes)) if a != b)
    raise UserError(f"the classes of {data} differ from those {path} was trained on: class {i} is {classes[i]!r} "
                    f"there, {recorded[i]!r} in the checkpoint (a renamed class folder shifts the labels)")


def load_model_weights(model, ckpt, path):
    """Strict load with a one-line explanation of any mismatch (missing, unexpected, shapes)."""
    sd = model_state(ckpt)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
              for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise UserError(f"checkpoint {path} does not fit this model (another arch or attention type?): "
                        + "; ".join(parts))
    check_finite(sd, path)
    model.load_state_dict(sd, strict=True)


def classifier_keys(model):
    """The state_dict keys of the model's classifier: the module of its last 2-D weight (fc, classifier.1)."""
    own = model.state_dict()
    last = [k for k, v in own.items() if v.dim() == 2 and k.endswith(".weight")][-1]
    prefix = last.rsplit(".", 1)[0] + "."
    return [k for k in own if k.startswith(prefix)]


def load_pretrained_weights(model, ckpt, path):
    """Fine-tuning's start (--pretrained): every weight of `ckpt` into `model`, except a classifier that
    has another class count (its keys are returned, left as initialised). Anything else that does not
    fit is load_model_weights' one-line UserError."""
    sd = model_state(ckpt)
    own = model.state_dict()
    head = classifier_keys(model)
    other_count = all(k in sd for k in head) and any(sd[k].shape != own[k].shape for k in head) and \
        all(sd[k].shape[1:] == own[k].shape[1:] for k in head)
    if not other_count:
        load_model_weights(model, ckpt, path)
        return []
    load_model_weights(model, {"state_dict": {**sd, **{k: own[k] for k in head}}}, path)
    return head


def check_finite(state_dict, path):
    """Refuse weights holding NaN or infinity: they would evaluate to a plausible-looking number."""
    for k, v in state_dict.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"checkpoint {path} holds non-finite values (NaN or inf) in {k}: refusing to use it")


def best_acc(ckpt):
    v = ckpt.get("best_acc1", ckpt.get("best_acc", 0.0)) if isinstance(ckpt, dict) else 0.0
    return float(v)


def rng_state():
    """Every RNG a run draws from, as tensors and plain Python values (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
