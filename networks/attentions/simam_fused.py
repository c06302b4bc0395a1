"""Fused SimAM: an autograd Function that keeps only its input for backward.

The plain formula (simam.simam_formula) runs about eight element-wise kernels forward, more
backward, and autograd keeps four or five full-size tensors per module. Here the forward and the
analytic backward are each one function of x (and the incoming gradient); backward recomputes the
per-(N, C) statistics from x, so x is the only tensor saved. Compiled by torch.compile (inductor:
C++/OpenMP on the CPU, Triton on CUDA) each becomes one or two fused kernels.

Backward, per (N, C) map of M = H*W values, n = max(M - 1, 1), with
    xm = x - mean(x),  d = xm^2,  s = 4 (sum(d)/n + lambda),  sig = sigmoid(d/s + 0.5),  out = x sig
and g = dL/dout, a = g x sig (1 - sig) (= dL/dy for y = d/s + 0.5):
    dL/dx = g sig + 2 xm (a/s - 4 A / (n s^2)) - 2 B / (M s),   A = sum(a d),  B = sum(a xm)
(the first term through sig's factor x, the second through d, the last through the mean).

Which path runs (per call; SIMAM_IMPL in the environment, or SimAM(impl=...)):
    auto      compiled kernels, or the eager analytic Function where compiling is unavailable and for
              maps under 32768 values on the CPU (default)
    compiled  compiled kernels; a compile failure raises instead of falling back
    eager     the analytic Function in plain PyTorch ops (saves only x, no compiler needed)
    formula   the paper's formula, autograd does the rest (the reference)
Inside torch.compile of a whole model the Function runs plain ops, so dynamo traces and fuses them
with the rest of the graph.
"""
import logging
import os
import warnings

import torch

IMPLS = ("auto", "compiled", "eager", "formula")
# On the CPU, "auto" runs maps smaller than this eagerly: ATen keeps such ops on one thread, while a
# compiled kernel always opens an OpenMP parallel region, whose barrier alone costs more (and much
# more when other jobs load the cores), and each new tiny shape would be one more compile.
SMALL = 32768


def _stats(x: torch.Tensor, e_lambda: float):
    """float32 (or float64) view of x, xm = x - mean, d = xm^2, s = 4 (var + lambda), per (N, C)."""
    hw = x.shape[-2] * x.shape[-1]
    n = max(hw - 1, 1)  # a 1x1 map has no variance: v = 0 (see simam.py), never 0/0
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xm = xf - xf.mean(dim=(2, 3), keepdim=True)
    d = xm * xm
    s = 4 * (d.sum(dim=(2, 3), keepdim=True) / n + e_lambda)
    return xf, xm, d, s, n, hw


def simam_forward(x: torch.Tensor, e_lambda: float) -> torch.Tensor:
    xf, _, d, s, _, _ = _stats(x, e_lambda)
    return (xf * torch.sigmoid(d / s + 0.5)).to(x.dtype)


def simam_backward(x: torch.Tensor, grad: torch.Tensor, e_lambda: float) -> torch.Tensor:
    xf, xm, d, s, n, hw = _stats(x, e_lambda)
    g = grad.to(xf.dtype)
    sig = torch.sigmoid(d / s + 0.5)
    a = g * xf * sig * (1 - sig)
    big_a = (a * d).sum(dim=(2, 3), keepdim=True)
    big_b = (a * xm).sum(dim=(2, 3), keepdim=True)
    dx = g * sig + 2 * xm * (a / s - 4 * big_a / (n * s * s)) - 2 * big_b / (hw * s)
    return dx.to(x.dtype)


# ---- compiled kernels: built lazily, once per process; any failure -> one warning, eager from then on
_compiled = {}
_broken = None  # the reason compiling failed, once it has


def _compile_kernels():
    if not _compiled:
        # A CUDA build of torch on a machine without CUDA logs "No CUDA runtime is found" when inductor
        # loads its C++ toolchain; it is noise for a CPU kernel, so keep it off the user's console.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        # dynamic=True: one kernel serves every block's (N, C, H, W) instead of one compile per shape.
        _compiled["fwd"] = torch.compile(simam_forward, dynamic=True, fullgraph=True)
        _compiled["bwd"] = torch.compile(simam_backward, dynamic=True, fullgraph=True)
    return _compiled


def _run(name: str, eager_fn, strict: bool, *args):
    global _broken
    if _broken is None or strict:
        try:
            # One compiled variant per dtype, memory format and size-1 specialisation: more than
            # dynamo's default 8 per function when a process mixes them (AMP, eval at batch 1, ...).
            with torch._dynamo.config.patch(recompile_limit=64):
                return _compile_kernels()[name](*args)
        except Exception as e:  # no C++ compiler / Triton, unsupported platform or Python, ...
            if strict:
                raise
            _broken = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(f"SimAM: compiled kernels unavailable ({_broken}); using the eager analytic "
                          "version (same numbers, slower). Set SIMAM_IMPL=eager to silence this.",
                          RuntimeWarning, stacklevel=2)
    return eager_fn(*args)


def compiled_available() -> bool:
    """False once a compile has failed in this process (the auto path then runs eager)."""
    return _broken is None


class SimAMFunction(torch.autograd.Function):
    """out = simam(x); saves x alone and recomputes the statistics in backward."""

    @staticmethod
    def forward(ctx, x, e_lambda: float, mode: str):
        ctx.save_for_backward(x)
        ctx.e_lambda, ctx.mode = e_lambda, mode
        if mode == "eager" or (mode == "auto" and x.device.type == "cpu" and x.numel() < SMALL):
            ctx.mode = "eager"
            return simam_forward(x, e_lambda)
        return _run("fwd", simam_forward, mode == "compiled", x, e_lambda)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # Under create_graph (double backward) run plain ops so autograd can record them.
        if ctx.mode == "eager" or torch.is_grad_enabled():
            return simam_backward(x, grad, ctx.e_lambda), None, None
        return _run("bwd", simam_backward, ctx.mode == "compiled", x, grad, ctx.e_lambda), None, None


def simam_fused(x: torch.Tensor, e_lambda: float = 1e-4, impl: str = "auto") -> torch.Tensor:
    """SimAM through the fused Function; impl is one of "auto", "compiled", "eager"."""
    if torch.compiler.is_compiling():
        impl = "eager"  # plain ops: the outer torch.compile traces them and fuses them itself
    return SimAMFunction.apply(x, float(e_lambda), impl)


def resolve_impl(impl=None) -> str:
    """impl, else $SIMAM_IMPL, else "auto"; an unknown name is a clear error."""
    impl = impl or os.environ.get("SIMAM_IMPL") or "auto"
    if impl not in IMPLS:
        raise ValueError(f"unknown SimAM implementation {impl!r} (SIMAM_IMPL); choose one of: {', '.join(IMPLS)}")
    return impl
