"""The fused SimAM (networks/attentions/simam_fused.py) against the paper's formula.

Numbers only: values, gradients (analytic vs autograd of the formula, gradcheck) and the bytes autograd
keeps for backward. Speed is the benchmark's business (scripts/benchmark.py), not a test's.
The compiled kernels are built once per process (dynamic shapes); later tests reuse them.
"""
import warnings

import pytest
import torch
from torch import nn

from networks import create_net
from networks.attentions import simam_fused
from networks.attentions.simam import SimAM, simam, simam_formula

FUSED = ["eager", "compiled"]
# Odd sizes, a 1-pixel-wide map, a 1x1 map, a batch of one. Each new dtype, layout or size-1 dimension is
# a fresh compile (seconds on a cold cache), so the compiled path gets the generic shape only.
SHAPES = [("eager", (2, 3, 5, 7)), ("eager", (1, 4, 1, 6)), ("eager", (3, 2, 1, 1)), ("eager", (2, 8, 14, 14)),
          ("compiled", (2, 3, 5, 7))]


def saved_bytes(fn, *inputs):
    """Bytes of the distinct storages autograd saves for backward while fn(*inputs) runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def value_and_grad(fn, x, g):
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(g)
    return out.detach(), x.grad


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("impl,shape", SHAPES)
def test_matches_formula_and_its_autograd_float64(impl, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    g = torch.randn(shape, dtype=torch.float64)
    for lam in (1e-4, 0.1):
        out, grad = value_and_grad(lambda t: simam(t, lam, impl), x, g)
        ref_out, ref_grad = value_and_grad(lambda t: simam_formula(t, lam), x, g)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", FUSED)
def test_gradcheck(impl):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: simam(t, 1e-4, impl), (x,))
    # Double backward: under create_graph the backward runs plain ops that autograd records.
    x1 = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: simam(t, 0.1, impl), (x1,))


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_within_1e_5_of_formula(impl, channels_last):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 17, 13) * 2 + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn(x.shape).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    out, grad = value_and_grad(lambda t: simam(t, 1e-4, impl), x, g)
    # The reference in float64, so the bound measures our error and not float32 noise in the formula.
    ref_out, ref_grad = value_and_grad(lambda t: simam_formula(t, 1e-4), x.double(), g.double())
    assert out.dtype == grad.dtype == torch.float32
    assert rel_err(out, ref_out) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("impl,dtype", [("eager", torch.float16), ("eager", torch.bfloat16), ("compiled", torch.bfloat16)])
def test_half_precision_statistics_in_float32(impl, dtype):
    torch.manual_seed(0)
    # Offset and spread that overflow or wreck a half-precision variance sum.
    x = (torch.randn(2, 8, 12, 12) * 30 + 200).to(dtype)
    g = torch.randn(x.shape).to(dtype)
    out, grad = value_and_grad(lambda t: simam(t, 1e-4, impl), x, g)
    assert out.dtype == grad.dtype == dtype
    # The float32 computation on the same half-precision values, rounded once at the end.
    ref_out, ref_grad = value_and_grad(lambda t: simam_formula(t, 1e-4), x.float(), g.float())
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert rel_err(out, ref_out) < tol and rel_err(grad, ref_grad) < tol


@pytest.mark.parametrize("impl", FUSED)
def test_single_pixel_map(impl):
    x = torch.randn(4, 3, 1, 1)
    out, grad = value_and_grad(lambda t: simam(t, 1e-4, impl), x, torch.ones_like(x))
    torch.testing.assert_close(out, x * torch.sigmoid(torch.tensor(0.5)))
    torch.testing.assert_close(grad, torch.full_like(x, torch.sigmoid(torch.tensor(0.5)).item()))


@pytest.mark.parametrize("impl", FUSED)
def test_backward_keeps_only_the_input(impl):
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    assert saved_bytes(lambda t: simam(t, 1e-4, impl), x) == x.nbytes
    if impl == "eager":  # the compiled path saves the same ctx tensor; a half compile costs seconds
        h = x.detach().half().requires_grad_()
        assert saved_bytes(lambda t: simam(t, 1e-4, impl), h) == h.nbytes
    # The formula keeps several full-size tensors: the reason for the fused version.
    assert saved_bytes(lambda t: simam_formula(t, 1e-4), x) >= 3 * x.nbytes


def test_environment_switch_and_module_choice(monkeypatch):
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    monkeypatch.setenv("SIMAM_IMPL", "formula")
    assert saved_bytes(SimAM(), x) >= 3 * x.nbytes
    assert saved_bytes(SimAM(impl="eager"), x) == x.nbytes  # the module's own choice wins
    monkeypatch.setenv("SIMAM_IMPL", "eager")
    assert saved_bytes(SimAM(), x) == x.nbytes
    monkeypatch.setenv("SIMAM_IMPL", "fast")
    with pytest.raises(ValueError, match="unknown SimAM implementation 'fast'"):
        SimAM()(x)


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr(simam_fused, "_compiled", {"fwd": broken, "bwd": broken})
    monkeypatch.setattr(simam_fused, "_broken", None)
    x = torch.randn(2, 16, 32, 32)  # not below simam_fused.SMALL: "auto" would not compile it at all
    g = torch.randn_like(x)
    ref = value_and_grad(lambda t: simam_formula(t, 1e-4), x, g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = value_and_grad(lambda t: simam(t, 1e-4, "auto"), x, g)
            torch.testing.assert_close(out, ref)
    assert len(caught) == 1 and "no C++ compiler found" in str(caught[0].message)
    assert not simam_fused.compiled_available()
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):  # "compiled" insists
        simam(x, 1e-4, "compiled")


def test_inside_torch_compile_of_a_model():
    """--compile: dynamo traces the Function's plain ops (no graph break); same numbers as eager."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SimAM(8, 0.1), nn.Conv2d(8, 4, 3), SimAM(4, 1e-4))
    x = torch.randn(2, 3, 10, 10)

    def step(fn):
        model.zero_grad(set_to_none=True)
        out = fn(x)
        out.square().sum().backward()
        return [out.detach()] + [p.grad for p in model.parameters()]

    torch._dynamo.reset()
    ref = step(model)
    got = step(torch.compile(model, backend="aot_eager", fullgraph=True))  # fullgraph: a break is an error
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-5


def test_resnet18_default_path_matches_formula(monkeypatch):
    monkeypatch.setenv("SIMAM_IMPL", "auto")  # whatever the suite's environment says
    torch.manual_seed(0)
    net = create_net("resnet18", "simam", 0.1, num_classes=10)

    def step(x):
        net.zero_grad(set_to_none=True)
        out = net(x)
        out.square().sum().backward()
        return [out.detach()] + [p.grad.clone() for p in net.parameters()]

    # Eval at 32x32 (layer4 sees 1x1 maps) and train at 64x64. Not train at 32x32 with a small batch:
    # batch-norm over two 1x1 values amplifies float32 rounding a thousandfold, whatever the SimAM.
    for train, x in ((False, torch.randn(2, 3, 32, 32)), (True, torch.randn(4, 3, 64, 64))):
        net.train(train)
        monkeypatch.setenv("SIMAM_IMPL", "auto")
        got = step(x)
        monkeypatch.setenv("SIMAM_IMPL", "formula")
        ref = step(x)
        for a, b in zip(got, ref):
            assert rel_err(a, b) < 1e-5
    monkeypatch.setenv("SIMAM_IMPL", "auto")
    # 224x224: every block's map size on the default path.
    net.train()
    out = net(torch.randn(1, 3, 224, 224))
    out.sum().backward()
    assert out.shape == (1, 10) and all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_under_ddp(tmp_path):
    """One-process gloo DDP: SimAM has no parameters and modifies nothing in place."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), SimAM(8, 0.1), nn.Flatten(), nn.LazyLinear(2))
        x = torch.randn(2, 3, 9, 9)
        model(x)  # materialise the lazy layer before wrapping
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp(x).sum().backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        for m in model.modules():
            if isinstance(m, SimAM):
                m.impl = "formula"
        model(x).sum().backward()
        for a, b in zip(got, [p.grad for p in model.parameters()]):
            assert rel_err(a, b) < 1e-5
    finally:
        dist.destroy_process_group()
