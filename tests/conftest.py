"""Shared test helpers: tiny generated ImageFolder data and a CLI runner for main_imagenet.py."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REFERENCE_LAYOUTS = Path(__file__).resolve().parent / "data" / "official_state_dicts.json.gz"


def reference_layouts():
    """The reference code's state_dict layouts (a vendored copy, so a lone clone of the repository can run the suite)."""
    import gzip
    import json
    return json.loads(gzip.decompress(REFERENCE_LAYOUTS.read_bytes()))

# SimAM's compiled kernels cost every new process seconds of compilation; the end-to-end tests (and
# the processes they start) run the eager fused path, and test_simam.py tests the compiled one itself.
os.environ.setdefault("SIMAM_IMPL", "eager")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Every seed a training test uses goes through `seed()`: SIMAM_TEST_SEED_OFFSET=N shifts them all, so
# a run of the suite trains other weights and meets other outcomes (which epoch is best, the losses),
# which no test may depend on (docs/testing.md: the machine-independence check).
SEED_OFFSET = int(os.environ.get("SIMAM_TEST_SEED_OFFSET", "0"))


def seed(n=0):
    """The training seed `n` of a test, shifted by SIMAM_TEST_SEED_OFFSET."""
    return n + SEED_OFFSET


# Intra-op threads of every training process a test starts (and of in-process training): 1 unless
# OMP_NUM_THREADS says otherwise, so the suite can be run with 2 to check no result depends on it.
THREADS = os.environ.get("OMP_NUM_THREADS", "1")


# Small crops keep a ResNet-18 step in the tens of milliseconds on a CPU.
TINY = ["-a", "resnet18", "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32",
        "-p", "100"]


def make_tiny_data(out, train_per_class=8, val_per_class=3):
    """3 classes of 40 px pattern images (the demo generator, scaled down)."""
    from utils.inputs.demo_data import make_demo_dataset
    return make_demo_dataset(out, classes=("h_stripes", "v_stripes", "disc"), train_per_class=train_per_class,
                             val_per_class=val_per_class, sizes=(40, 40))


def assert_same_weights(a, b, momentum=False):
    """Two checkpoints hold equal weights (and, with momentum=True, equal SGD momentum buffers)."""
    import torch
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    if momentum:
        for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert torch.equal(s_a["momentum_buffer"], s_b["momentum_buffer"])


@pytest.fixture
def one_thread():
    """One intra-op thread (OMP_NUM_THREADS when set) for in-process training: tiny models gain nothing
    from threads, and on a shared 2-core machine threads fighting other processes cost seconds a step."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(int(THREADS))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def recipe_data(tmp_path_factory):
    """258 training images: --ra-reps (torchvision's RASampler) keeps 256 an epoch; -b 16 gives 16 steps."""
    return make_tiny_data(tmp_path_factory.mktemp("recipes") / "data", train_per_class=86, val_per_class=2)


def run_dir(args, script="main_imagenet.py"):
    """The run folder `python SCRIPT ARGS` trains in: the trainer's own naming (utils.recipe.folder_name:
    the readable name plus the digest of the settings that differ from the defaults) under its --ckpt."""
    import importlib
    from utils.args import parse_args
    from utils.recipe import folder_name
    main = importlib.import_module(Path(script).stem)
    parsed = parse_args(main.get_args_parser(), [str(a) for a in args], resolve=getattr(main, "resolve_defaults", None))
    return Path(parsed.ckpt) / folder_name(main.make_task(parsed).name, parsed)


def run_cli(args, timeout=180, launcher=None, cwd=ROOT, script="main_imagenet.py"):
    """Run `python SCRIPT ARGS` (or `torchrun ... SCRIPT ARGS`); returns CompletedProcess."""
    cmd = (launcher or [sys.executable]) + [str(ROOT / script)] + [str(a) for a in args]
    # One intra-op thread: on a busy 2-core machine, 2-thread OpenMP steps run 10x slower, not 2x.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=THREADS)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_in_process(args, script="main_imagenet.py"):
    """run_cli's result (returncode, stdout, stderr) from the script's main(args) called in this process:
    no interpreter start nor imports of torch and torchvision (~5 s a command here). For commands that
    need no process of their own: no signal, no launcher, no process group (those use run_cli)."""
    import contextlib
    import importlib
    import io
    import torch
    path = ROOT / script  # a main script, or one of scripts/
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module = importlib.import_module(path.stem)
    argv = [str(a) for a in args]
    assert "--nproc" not in argv, "ranks of their own print to the real stdout: use run_cli"
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(int(THREADS))  # as run_cli's OMP_NUM_THREADS: runs compared bit for bit agree
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        finally:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def start_cli(cmd, env=None):
    """Popen of a command line in its own process group (signals sent to the group reach only its
    processes), stdout and stderr as text pipes, one intra-op thread (as run_cli)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=THREADS, **(env or {}))
    return subprocess.Popen([str(a) for a in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def read_until(proc, marker, timeout=300):
    """The stdout lines of a start_cli process up to the first holding `marker`; the test fails (and the
    process group is killed) if the output ends or `timeout` passes first."""
    import time
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines
        if time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"{marker!r} never printed:\n{''.join(lines)[-2000:]}\n{proc.stderr.read()[-3000:]}")


def finish(proc, timeout=300):
    """(stdout, stderr) once a start_cli process returned; no process of its group (ranks, fork servers,
    loader workers, multiprocessing's resource tracker) may outlive it by 10 s."""
    import time
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"never returned:\n{out[-2000:]}\n{err[-3000:]}")
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return out, err
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"a process of the run outlived it by 10 s\n{err[-3000:]}")


def descendants(pid):
    """pid and every process below it (children of any of its threads, in any session), read from /proc."""
    family, i = [pid], 0
    while i < len(family):
        tasks = Path(f"/proc/{family[i]}/task")
        for task in (tasks.iterdir() if tasks.is_dir() else []):
            try:
                family += [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    return family


def started(pid):
    """A process's start time (/proc/PID/stat field 22), None when it is gone or a zombie: with the pid, it
    names the process (a pid may be reused)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def still_running(processes, within=10):
    """Of {pid: start time} (recorded with `started`), the ones still running after `within` seconds."""
    import time
    deadline = time.time() + within
    while True:
        left = {p: t for p, t in processes.items() if t is not None and started(p) == t}
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


def kill_tree(pid):
    """SIGKILL a process and every descendant, those in sessions of their own too (torchrun starts its
    ranks so): a rank left running would hold the output pipes open, and the test would wait for ever."""
    for p in descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def pytest_configure(config):
    # torchvision 0.29 deprecates its image decoders (utils.inputs.data.tensor_loader uses decode_jpeg): one
    # warning per image otherwise.
    config.addinivalue_line("filterwarnings", "ignore:The image decoding and encoding capabilities:DeprecationWarning")


def main_in_process(argv, code):
    """main_imagenet.main(argv) in this process, expecting exit `code`: (stdout, the stderr lines)."""
    proc = run_in_process(argv)
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc.stdout, proc.stderr.strip().splitlines()
