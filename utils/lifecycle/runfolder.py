"""A run folder's safety rules: one writer at a time, never started over implicitly, repaired on start.

Rank 0 alone touches the folder; it decides what to do and every rank follows (see trainer.py).

- `lock(run_dir)`: an exclusive flock on `<run>/.lock`, held for the life of the process and released
  by the OS when it dies, so a second run into the same folder stops at once.
- `decide(...)`: "fresh", "resume" or "finished" for this command, or a UserError naming the folder,
  its progress and the ways on. A folder that holds a run is never started over; a checkpoint
  older than the folder's own is never resumed into it (it would overwrite the newer run).
- `repair(...)`: what a kill between the three writes of an epoch can leave behind (checkpoint, then
  model_best, then the metrics row) is made whole from the checkpoint, which carries the rows.
"""
import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import torch

from .. import UserError
from .checkpoint import write_error

CHECKPOINT = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"
METRICS = "metrics.jsonl"


def lock(run_dir):
    """Create the folder and take its writer lock; returns the open lock file (keep it open)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / ".lock", "a+")
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise write_error(run_dir / ".lock", e) from None
        raise UserError(f"cannot write the run folder {run_dir}: {e.strerror or e} (check --ckpt)") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise UserError(f"run folder {run_dir} is in use by {owner}: one run writes a folder at a time "
                        f"(wait for it, or pass another --ckpt)") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
    except OSError as e:  # a full disk: the owner line cannot be written
        with contextlib.suppress(OSError):  # closing flushes the same bytes again
            f.close()
        raise write_error(run_dir / ".lock", e) from None
    return f


def remove_stale_temporaries(run_dir, log):
    """Temporary files of a killed save (`.<name>.<pid>.tmp`); safe to delete while we hold the lock."""
    for p in sorted(Path(run_dir).glob("*.tmp")) + sorted(Path(run_dir).glob(".*.tmp")):
        p.unlink(missing_ok=True)
        log(f"removed a stale temporary file of a killed save: {p}")


def is_run_folder(path):
    """A folder the trainer made (its args.json or metrics.jsonl is there)."""
    return (Path(path) / "args.json").is_file() or (Path(path) / METRICS).is_file()


def holds_run(run_dir):
    """The folder holds a run to protect: a checkpoint or a metrics row."""
    return (Path(run_dir) / CHECKPOINT).is_file() or bool(read_rows(Path(run_dir) / METRICS))


def read_settings(run_dir):
    """The settings the run recorded: args.json, else its checkpoint's "args"; None when neither says."""
    try:
        rec = json.loads((Path(run_dir) / "args.json").read_bytes().decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        rec = None
    if isinstance(rec, dict) and "arch" in rec:
        return rec
    ck = peek(Path(run_dir) / CHECKPOINT) if (Path(run_dir) / CHECKPOINT).is_file() else None
    rec = ck.get("args") if ck else None
    return rec if isinstance(rec, dict) and "arch" in rec else None


def progress(ckpt):
    """(completed epochs, batches done in the next one) of a checkpoint dict."""
    return int(ckpt.get("epoch", 0)), int(ckpt.get("iteration", 0))


def peek(path):
    """A checkpoint's small fields without reading its tensors into memory (mmap), or None."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return ck if isinstance(ck, dict) else None


def describe(prog, epochs):
    epoch, it = prog
    return f"epoch {epoch}/{epochs}" + (f" + {it} iterations" if it else "")


def decide(run_dir, resume, resume_ckpt, epochs):
    """What this command may do with `run_dir`: "fresh", "resume" or "finished" (else UserError)."""
    run_dir = Path(run_dir)
    own_path = run_dir / CHECKPOINT
    own = peek(own_path) if own_path.is_file() else None
    if own_path.is_file() and own is None:
        raise UserError(f"run folder {run_dir} holds an unreadable {CHECKPOINT}: move it away or pass another --ckpt")
    if not resume:
        if own is None:
            rows = read_rows(run_dir / METRICS)
            if rows:
                raise UserError(f"run folder {run_dir} holds metrics of {len(rows)} epochs but no {CHECKPOINT}, so "
                                f"it cannot be continued: move it away or pass another --ckpt")
            return "fresh"
        prog = progress(own)
        if prog[0] >= epochs and prog[1] == 0:
            return "finished"
        raise UserError(f"run folder {run_dir} already holds a run at {describe(prog, epochs)}: continue it with "
                        f"--resume {own_path}, or start another run with another --ckpt (or --seed)")
    if own is not None and os.path.samefile(resume, own_path):
        return "resume"
    if own is not None and progress(own) > progress(resume_ckpt):
        raise UserError(f"--resume {resume} is at {describe(progress(resume_ckpt), epochs)}, older than the run "
                        f"folder's own {own_path} ({describe(progress(own), epochs)}); resuming would overwrite the "
                        f"newer run: resume {own_path}, or pass another --ckpt to branch off")
    return "resume"


def read_rows(path, log=None):
    """metrics.jsonl rows; a half-written last line (a crash mid-write) is dropped (and logged)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise UserError(f"{path} line {i + 1} is not JSON: the file is damaged") from None
            if log is not None:
                log(f"warning: {path}: dropped a half-written last line (a crash mid-write)")
    return rows


def write_text_atomic(path, text):
    """Write a text file atomically (temporary file, fsync, rename): readers see the old or the new
    file, never a torn one. A failed write (a full disk) removes the temporary file: UserError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None


def write_rows(path, rows):
    """Rewrite metrics.jsonl atomically."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_row(path, row):
    """A half-written row (a kill, a full disk) is dropped by read_rows; the checkpoint carries it."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(path, e) from None


def copy_atomic(src, dst):
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except OSError as e:  # a full disk mid-copy: no half-copied temporary file left behind
        tmp.unlink(missing_ok=True)
        raise write_error(dst, e) from None


def repair(run_dir, ckpt, own, log):
    """Make metrics.jsonl and model_best agree with the checkpoint a run continues from.

    own: the checkpoint is the folder's own checkpoint.pth.tar (not one brought in from elsewhere).
    """
    run_dir = Path(run_dir)
    done = progress(ckpt)[0]
    if "metrics" in ckpt:  # ours: the checkpoint carries every completed epoch's row
        rows = list(ckpt["metrics"])
    else:  # older or foreign checkpoints: keep what the file has up to the checkpoint's epoch
        rows = [r for r in read_rows(run_dir / METRICS, log) if r.get("epoch", 0) <= done]
    before = read_rows(run_dir / METRICS, log if "metrics" in ckpt else None)
    if before != rows:
        have, want = len(before), len(rows)
        log(f"metrics.jsonl: {have} rows on disk, {want} in the checkpoint (epoch {done}): rewritten to match"
            if "metrics" in ckpt else f"metrics.jsonl: kept the {want} rows up to epoch {done}")
    write_rows(run_dir / METRICS, rows)
    best_epoch = ckpt.get("best_epoch")
    if not own or best_epoch is None:
        return
    best = peek(run_dir / BEST) if (run_dir / BEST).is_file() else None
    at = progress(ckpt)
    if best_epoch == done and at[1] == 0:
        if best is None or progress(best)[0] != best_epoch:
            copy_atomic(run_dir / CHECKPOINT, run_dir / BEST)
            log(f"{BEST} was behind the checkpoint (a kill or a full disk between the two writes): copied epoch {done}")
    elif best is None:  # its weights are in no other file: say so once, train on
        log(f"warning: {run_dir / BEST} is missing and cannot be restored (best epoch {best_epoch}, the checkpoint "
            f"is at epoch {done}{f' + {at[1]} iterations' if at[1] else ''}): the next better epoch writes it again")
