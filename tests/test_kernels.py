"""The compiled CPU gate kernels against their PyTorch reference (moelora.layers.dense), and the fallback."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from moelora.layers import dense, dropout, kernels, routing
from moelora.layers.linear import MoELoRALinear
from moelora.optim import precondition

# Skipped only where the kernels cannot be built at all; with a compiler, a failed build fails the tests.
pytestmark = pytest.mark.skipif(kernels.compiler() is None or not kernels.wanted(),
                                reason="no C compiler to build the CPU kernels (or MOELORA_CPU_KERNELS=0)")


def test_the_kernels_build_with_this_compiler():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build warns and falls back: here that is a failure
        assert kernels.available()


@pytest.fixture
def reference(monkeypatch):
    """Route dense.py's helpers through their PyTorch ops."""
    monkeypatch.setattr(dense.kernels, "applies", lambda *tensors: False)


def _projections(tokens: int, num_experts: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, logits)`` as the layer makes them: column slices of one (T, E*r + E) projection."""
    projected = torch.randn(tokens, num_experts * rank + num_experts, generator=torch.Generator().manual_seed(seed))
    return projected[:, : num_experts * rank], projected[:, num_experts * rank :]


def _reference_route(logits, h, top_k):
    applies = dense.kernels.applies
    dense.kernels.applies = lambda *tensors: False
    try:
        return dense.route_and_gate(logits, h, top_k)
    finally:
        dense.kernels.applies = applies


@pytest.mark.parametrize("tokens", [1, 17, 100])
@pytest.mark.parametrize("num_experts,rank,top_k", [(20, 4, 10), (5, 3, 1), (7, 2, 7), (64, 8, 2), (3, 1, 2), (4, 16, 3)])
def test_route_kernel_equals_the_reference(tokens, num_experts, rank, top_k):
    h, logits = _projections(tokens, num_experts, rank)
    logits = logits * 4  # a wide spread of gates
    assert kernels.applies(logits, h)
    gates, z, stats = kernels.route(logits, h, top_k)
    want_gates, want_z, want_stats = _reference_route(logits, h, top_k)
    torch.testing.assert_close(gates, want_gates, rtol=1e-6, atol=1e-7)
    assert torch.equal(gates > 0, want_gates > 0)  # the same experts kept
    torch.testing.assert_close(z, want_z, rtol=1e-6, atol=1e-7)
    e = num_experts
    torch.testing.assert_close(stats[:e], want_stats[:e], rtol=1e-5, atol=1e-7)  # sum of squared gates
    torch.testing.assert_close(stats[e : 2 * e], want_stats[e : 2 * e], rtol=1e-6, atol=0)  # load
    torch.testing.assert_close(stats[2 * e], want_stats[2 * e], rtol=1e-5, atol=1e-6)  # mean entropy


def test_route_kernel_ties_keep_the_lower_experts_and_extreme_logits_stay_finite():
    h, _ = _projections(3, 6, 2)
    logits = torch.zeros(3, 6)
    logits[1] = torch.tensor([0.0, -float("inf"), 5.0, -1e30, 0.0, 3.0])
    logits[2] = torch.tensor([-120.0, 0.0, -90.0, -200.0, -float("inf"), -105.0])
    gates, z, stats = kernels.route(logits.contiguous(), h, 3)
    assert torch.equal(gates[0] > 0, torch.tensor([True, True, True, False, False, False]))
    torch.testing.assert_close(gates[0, :3], torch.full((3,), 1 / 3))
    assert torch.equal(gates[1] > 0, torch.tensor([True, False, True, False, False, True]))
    want = torch.softmax(torch.tensor([0.0, 5.0, 3.0]), 0)
    torch.testing.assert_close(gates[1, [0, 2, 5]], want)
    assert gates[2, 1] == 1.0 and gates[2, 2] == pytest.approx(float(torch.tensor(-90.0).exp()), rel=1e-5)
    assert torch.isfinite(gates).all() and torch.isfinite(z).all() and torch.isfinite(stats).all()
    assert stats[6:12].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("tokens", [1, 8, 40])
@pytest.mark.parametrize("num_experts,rank,top_k", [(20, 4, 10), (5, 3, 1), (64, 8, 2)])
def test_the_inference_paths_in_place_gating_equals_the_reference(tokens, num_experts, rank, top_k):
    """``gate_in_place`` on ``z = [logits | h]`` against the training path's routing reference."""
    z = torch.randn(tokens, num_experts + num_experts * rank, generator=torch.Generator().manual_seed(3))
    z[:, :num_experts] *= 4
    logits, h = z[:, :num_experts].clone(), z[:, num_experts:].clone()
    _, want_z, _ = _reference_route(logits, h, top_k)
    kernels.gate_in_place(z, num_experts, top_k)
    assert torch.equal(z[:, :num_experts], logits)  # the logits are read, not written
    torch.testing.assert_close(z[:, num_experts:], want_z, rtol=1e-6, atol=1e-7)
    kept = (want_z.view(tokens, num_experts, rank) != 0).any(-1)
    assert (kept.sum(-1) == top_k).all()


@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("num_experts,rank,top_k", [(20, 4, 10), (5, 3, 1), (7, 2, 7), (64, 8, 2)])
def test_the_decode_kernel_equals_the_fused_gemm_path(tokens, num_experts, rank, top_k):
    """``decode`` (kept experts' rows only) against ``y + s * gate(x @ W_cat^T) @ B_cat^T``."""
    g = torch.Generator().manual_seed(4)
    d_in, d_out, scaling = 48, 40, 2.0
    x = torch.randn(tokens, d_in, generator=g)
    w_cat = torch.randn(num_experts + num_experts * rank, d_in, generator=g) * 0.3
    b_cat_t = torch.randn(num_experts * rank, d_out, generator=g)
    base = torch.randn(tokens, d_out, generator=g)
    z = x @ w_cat.t()
    _, gated, _ = _reference_route(z[:, :num_experts], z[:, num_experts:], top_k)
    want = base + scaling * gated @ b_cat_t
    got = base.clone()
    assert kernels.decode_applies(x, got, w_cat, b_cat_t, num_experts)
    kernels.decode(x, got, w_cat, b_cat_t, num_experts, top_k, scaling)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 0.1


def test_the_decode_kernel_keeps_the_lower_experts_on_ties_and_is_refused_beyond_its_limits():
    x = torch.randn(2, 8)
    w_cat = torch.zeros(4 + 4 * 2, 8)  # a zero router: all logits tied
    w_cat[4:] = torch.randn(8, 8)
    b_cat_t = torch.randn(8, 6)
    got = torch.zeros(2, 6)
    kernels.decode(x, got, w_cat, b_cat_t, 4, 2, 1.0)
    h = (x @ w_cat[4:].t()).view(2, 4, 2)
    want = 0.5 * h[:, :2].reshape(2, 4) @ b_cat_t[:4]  # experts 0 and 1, gate 1/2 each
    torch.testing.assert_close(got, want)
    many = torch.randn(kernels.DECODE_MAX_TOKENS + 1, 8)
    assert not kernels.decode_applies(many, torch.zeros(len(many), 6), w_cat, b_cat_t, 4)
    assert not kernels.decode_applies(x.double(), got.double(), w_cat.double(), b_cat_t.double(), 4)


@pytest.mark.parametrize("power", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("num_experts,rank,top_k", [(20, 4, 10), (5, 3, 2), (7, 2, 3), (9, 8, 2), (3, 1, 2), (4, 16, 3)])
def test_gate_backward_kernel_equals_the_reference(power, num_experts, rank, top_k, reference):
    tokens = 33
    h, logits = _projections(tokens, num_experts, rank, seed=1)
    gates = dense.route_and_gate(logits, h, top_k)[0]
    scaled_dz = torch.randn(tokens, num_experts * rank, generator=torch.Generator().manual_seed(2))
    buffers = [torch.full((tokens, num_experts * rank + num_experts), float("nan")) for _ in range(2)]
    outputs = []
    for buffer, use_kernel in zip(buffers, (True, False)):
        grad_h, grad_logits = buffer[:, : num_experts * rank], buffer[:, num_experts * rank :]
        if use_kernel:
            h_gp = kernels.gate_backward(scaled_dz, h, gates, power, grad_h, grad_logits)
        else:
            h_gp = dense.gate_products(scaled_dz, h, gates, power, grad_h, grad_logits)
        outputs.append((buffer, h_gp))
    (got_buffer, got_h_gp), (want_buffer, want_h_gp) = outputs
    torch.testing.assert_close(got_buffer, want_buffer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h_gp, want_h_gp, rtol=1e-6, atol=1e-7)
    assert want_buffer[:, num_experts * rank :].abs().max() > 1e-3


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_float32_layer_gives_the_same_outputs_and_gradients_with_and_without_the_kernels(dropout, monkeypatch):
    torch.manual_seed(0)
    layer = MoELoRALinear(torch.nn.Linear(24, 16), num_experts=6, top_k=3, rank=4, alpha=8.0, dropout=dropout,
                          gate_backward_power=0.5)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.1)
    x = torch.randn(50, 24)
    upstream = torch.randn(50, 16)
    results = []
    for use_kernels in (True, False):
        if not use_kernels:  # every kernel off: routing, gate products and the dropout mask
            monkeypatch.setattr(kernels, "_load", lambda: None)
            assert not kernels.available()
        layer.zero_grad()
        layer.reset_gate_stats()
        inputs = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # the same dropout mask
        out = layer(inputs)
        (out * upstream).sum().backward()
        results.append([out.detach(), inputs.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad,
                        layer.gate_sq_sum.clone(), layer.expert_load.clone(), layer.gate_entropy.clone()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accumulate, overwrite", [(True, True), (True, False), (False, True), (False, False)])
def test_the_routing_record_kernel_equals_the_torch_ops(accumulate, overwrite, monkeypatch):
    num_experts = 7
    initial = [torch.rand(num_experts), torch.tensor(3.0), torch.rand(num_experts), torch.tensor(0.5)]
    passes = [(torch.rand(2 * num_experts + 1), tokens) for tokens in (11, 5)]  # the sums accumulate over both
    results = []
    assert kernels.available()  # the first pass takes the compiled call
    for use_kernels in (True, False):
        if not use_kernels:
            monkeypatch.setattr(kernels, "_load", lambda: None)
        sq_sum, count, load, entropy = buffers = [t.clone() for t in initial]
        versions = [t._version for t in buffers]
        for stats, tokens in passes:
            routing.record_statistics_(stats, tokens, sq_sum if accumulate else None, count if accumulate else None,
                                       load if overwrite else None, entropy if overwrite else None)
        written = [accumulate, accumulate, overwrite, overwrite]
        assert [t._version > v for t, v in zip(buffers, versions)] == written  # in-place writes are seen as such
        results.append(buffers)
    for got, want, before, was_written in zip(*results, initial, written):
        assert torch.equal(got, want)
        assert torch.equal(got, before) != was_written


def test_the_routing_record_kernel_refuses_what_it_cannot_serve():
    stats, buffers = torch.rand(5), [torch.zeros(2), torch.zeros(()), torch.zeros(2), torch.zeros(())]
    assert not kernels.record_routing(stats.double(), *buffers, 4)  # float64: the torch ops serve
    strided = torch.zeros(4)[::2]
    assert not kernels.record_routing(stats, strided, *buffers[1:], 4)  # not contiguous
    assert torch.equal(strided, torch.zeros(2)) and torch.equal(buffers[1], torch.zeros(()))
    with pytest.raises(ValueError, match="sq_sum with count"):
        kernels.record_routing(stats, buffers[0], None, None, None, 4)


def test_without_a_compiler_the_layer_warns_once_and_uses_the_pytorch_ops(tmp_path):
    """A compiler that fails (CC=false) and MOELORA_CPU_KERNELS=0: no kernels, the same layer output."""
    script = (
        "import warnings, torch\n"
        "from moelora.layers import kernels\n"
        "from moelora.layers.linear import MoELoRALinear\n"
        "torch.manual_seed(0)\n"
        "layer = MoELoRALinear(torch.nn.Linear(8, 8), num_experts=4, top_k=2, rank=2, alpha=4.0)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    out = layer(torch.randn(5, 8))\n"
        "    layer(torch.randn(5, 8))\n"
        "print(kernels.available(), sum('CPU kernels' in str(w.message) or 'C compiler' in str(w.message) for w in caught))\n"
    )
    base_env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    failing = subprocess.run([sys.executable, "-c", script], env={**base_env, "CC": "false"},
                             capture_output=True, text=True, check=True)
    assert failing.stdout.split() == ["False", "1"], failing.stdout + failing.stderr
    off = subprocess.run([sys.executable, "-c", script], env={**base_env, "MOELORA_CPU_KERNELS": "0"},
                         capture_output=True, text=True, check=True)
    assert off.stdout.split() == ["False", "0"], off.stdout + off.stderr
    assert not list(tmp_path.glob("moelora/*.so"))  # nothing half-built left behind


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (40, 64)])
def test_dropout_kernel_draws_the_reference_mask_bit_for_bit(shape):
    """The compiled mask equals hashed_lanes' (the PyTorch reference) for seeds across the int64 range,
    and applying it equals multiplying by it."""
    for seed in (0, 1, 2**31 + 5, 2**62 + 12345):
        threshold = dropout._keep_threshold(0.3)
        count = math.prod(shape)
        got = kernels.keep_mask(count, seed, threshold)
        assert got is not None and torch.equal(got, dropout.hashed_lanes(seed, count) < threshold)
        mask = dropout.DropoutMask(shape, 0.3, torch.device("cpu"), seed)
        if len(shape) == 2:
            x = torch.randn(*shape)
            assert torch.equal(mask.apply(x), x * mask.materialize())
            y = x.clone()
            assert mask.apply(y, inplace=True) is y and torch.equal(y, x * mask.materialize())


def test_the_hashed_mask_keeps_at_its_rate_per_lane_and_independently():
    """Both 16-bit lanes of a word keep with probability q, neighbours and rows independently."""
    p, rows, cols = 0.05, 500, 800
    q = dropout.keep_probability(p)
    keep = dropout.hashed_keep_mask((rows, cols), p, seed=1234).float()
    n = rows * cols
    se = math.sqrt(q * (1 - q) / (n / 2))
    for lane in range(2):
        assert abs(keep.view(-1)[lane::2].mean().item() - q) < 5 * se, lane
    for pair in (keep[:, :-1] * keep[:, 1:], keep[:-1] * keep[1:]):  # neighbours across columns and rows
        assert abs(pair.mean().item() - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / pair.numel())
    other = dropout.hashed_keep_mask((rows, cols), p, seed=1235).float()  # another seed: independent
    assert abs((keep * other).mean().item() - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n)


def test_applying_a_mask_under_autograd_passes_the_masked_gradient():
    mask = dropout.DropoutMask((6, 10), 0.4, torch.device("cpu"), seed=99)
    x = torch.randn(6, 10, requires_grad=True)
    upstream = torch.randn(6, 10)
    (mask.apply(x) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream * mask.materialize())


@pytest.mark.parametrize("experts,rank,width", [(20, 4, 576), (3, 1, 7), (5, 8, 33), (2, 16, 16), (4, 4, 37), (2, 4, 5)])
def test_batched_kernels_equal_bmm(experts, rank, width):
    """The optimizers' per-expert products against torch.bmm."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(experts, rank, width, generator=g)
    b = torch.randn(experts, width, rank, generator=g)
    p = torch.randn(experts, rank, rank, generator=g)
    assert kernels.batched_applies(a, b, p)
    torch.testing.assert_close(kernels.gram_rows(a), torch.bmm(a, a.mT), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernels.gram_cols(b), torch.bmm(b.mT, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernels.left_mul(p, a), torch.bmm(p, a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.right_mul(b, p), torch.bmm(b, p), rtol=1e-5, atol=1e-5)
    assert not kernels.batched_applies(a.double()) and not kernels.batched_applies(a[:, :, ::2])


def test_the_grams_of_many_layers_in_one_call_equal_bmm():
    g = torch.Generator().manual_seed(3)
    partners = [torch.randn(5, 40, 4, generator=g), torch.randn(3, 4, 24, generator=g),
                torch.randn(2, 19, 4, generator=g), torch.randn(4, 4, 7, generator=g)]
    of_a = [True, False, True, False]  # an A-factor's partner is its B (E, d_out, r), a B-factor's its A
    want = torch.cat([torch.bmm(p.mT, p) if a else torch.bmm(p, p.mT) for p, a in zip(partners, of_a)])
    torch.testing.assert_close(kernels.grams(partners, of_a, 4), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 2, 4, 7, 16])
def test_the_inverse_kernel_equals_torchs_cholesky_and_reports_the_same_failures(rank, monkeypatch):
    g = torch.Generator().manual_seed(rank)
    factors = torch.randn(12, rank, rank + 3, generator=g)
    systems = factors @ factors.mT + 0.1 * torch.eye(rank)
    systems[1] = -torch.eye(rank)  # not positive definite
    systems[2, 0, 0] = float("nan")  # neither
    # Subnormal pivots: the kernel keeps them and the inverse overflows (non-finite); MKL may flush them to
    # zero (not positive definite). A failure either way.
    systems[3] = torch.eye(rank) * 1e-39
    systems[4, rank - 1, rank - 1] = -1.0  # fails at the last pivot
    systems[5] = torch.zeros(rank, rank)  # B = 0 before the first step, undamped
    got, not_pd, non_finite = precondition.damped_inverse(systems)
    monkeypatch.setattr(kernels, "_load", lambda: None)  # torch's cholesky_ex and cholesky_inverse
    want, want_not_pd, want_non_finite = precondition.damped_inverse(systems)
    assert (not_pd | non_finite).tolist() == (want_not_pd | want_non_finite).tolist()
    keep = [i for i in range(12) if i != 3]
    assert not_pd[keep].tolist() == want_not_pd[keep].tolist() and not non_finite[keep].any()
    assert not_pd[[1, 2, 4, 5]].all() and non_finite[3] and not (not_pd | non_finite)[6:].any()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[1:6], torch.zeros(5, rank, rank)) and got[0].abs().sum() > 0


@pytest.mark.parametrize("rank,widths", [(4, (576, 192)), (1, (9, 5)), (3, (2100, 700)), (8, (33, 300)), (16, (3, 16))])
def test_the_fused_preconditioned_adamw_gives_the_floats_of_preconditioning_then_adamw(rank, widths):
    """Bit for bit: the products of left_mul / right_mul, the scale, then the AdamW loop; A-rows wider than
    the kernel's block and B-factors of more rows than one block included."""
    g = torch.Generator().manual_seed(rank)
    d_in, d_out = widths
    shapes = [(3, rank, d_in), (3, d_out, rank), (2, rank, d_out), (2, d_in, rank)]
    of_a = [True, False, True, False]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    exp_avgs = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    exp_avg_sqs = [torch.rand(s, generator=g) * 0.01 for s in shapes]
    inverses = [torch.randn(s[0], rank, rank, generator=g) for s in shapes]
    scales, steps, bc2 = [1.0, 0.25, 0.5, 1.0], [1e-3, 2e-3, 1e-3, 5e-4], [0.1, 0.2, 0.3, 1.0]
    hyper = dict(lr=1e-3, weight_decay=0.01, beta1=0.9, beta2=0.999, eps=1e-8)
    want = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs)]
    preconditioned = [(kernels.left_mul(p, gr) if a else kernels.right_mul(gr, p)) * s
                      for p, gr, a, s in zip(inverses, grads, of_a, scales)]
    kernels.adamw(want[0], preconditioned, want[1], want[2], steps, bc2, **hyper)
    assert kernels.precondition_adamw_applies(params, of_a, inverses, grads, exp_avgs, exp_avg_sqs)
    kernels.precondition_adamw(params, of_a, inverses, scales, grads, exp_avgs, exp_avg_sqs, steps, bc2, **hyper)
    for got_list, want_list in zip((params, exp_avgs, exp_avg_sqs), want):
        for got, expected in zip(got_list, want_list):
            assert torch.equal(got, expected)
    assert all(p._version == 1 for p in params)


def test_the_fused_preconditioned_adamw_refuses_what_it_cannot_serve():
    a, b = torch.zeros(2, 4, 6), torch.zeros(2, 6, 4)
    inverses = [torch.zeros(2, 4, 4)] * 2
    assert kernels.precondition_adamw_applies([a, b], [True, False], inverses, [a, b])
    assert not kernels.precondition_adamw_applies([a, b], [False, True], inverses, [a, b])  # sides swapped
    assert not kernels.precondition_adamw_applies([a.double(), b], [True, False], inverses, [a, b])
    assert not kernels.precondition_adamw_applies([a, b], [True, False], inverses, [a, b.mT.contiguous().mT])
    assert not kernels.precondition_adamw_applies([a, b], [True, False], [torch.zeros(2, 3, 3)] * 2, [a, b])
    wide = torch.zeros(1, 17, 2)
    assert not kernels.precondition_adamw_applies([wide], [False], [torch.zeros(1, 17, 17)], [wide])  # r > 16
    assert not kernels.precondition_adamw_applies([], [], [], [])


@pytest.mark.parametrize("options", [dict(max_grad_norm=0.01), dict(b_from_updated_a=True),
                                     dict(preconditioner="gate_rescaled", weight_decay=0.0)])
def test_the_fused_optimizer_step_equals_torchs_kernels_on_the_preconditioned_gradients(options, monkeypatch):
    """RiemannianAdamW's compiled step (preconditioners in one pass, update fused with them) against the
    same optimizer on torch's fused AdamW kernel and torch's linear algebra, over three steps."""
    from moelora.optim import RiemannianAdamW

    results, fused_calls = [], []
    fused = kernels.precondition_adamw
    monkeypatch.setattr(kernels, "precondition_adamw", lambda *args, **kw: fused_calls.append(1) or fused(*args, **kw))
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(kernels, "_load", lambda: None)
        torch.manual_seed(0)
        layers = torch.nn.ModuleList([MoELoRALinear(torch.nn.Linear(24, 16), num_experts=6, top_k=3, rank=4, alpha=8.0),
                                      MoELoRALinear(torch.nn.Linear(16, 40), num_experts=3, top_k=2, rank=2, alpha=4.0)])
        with torch.no_grad():
            for layer in layers:
                layer.lora_B.normal_(0.0, 0.1)
        optimizer = RiemannianAdamW(layers.parameters(), lr=1e-2, fused=None if compiled else True,
                                    **{"preconditioner": "riemannian", **options})
        for step in range(3):
            x = torch.randn(40, 24, generator=torch.Generator().manual_seed(step))
            (layers[1](layers[0](x)) ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach().clone() for p in layers.parameters()])
        if compiled:  # one call per rank (4 and 2) and step, or per side too with b_from_updated_a
            assert len(fused_calls) == 3 * 2 * (2 if options.get("b_from_updated_a") else 1)
    assert len(fused_calls) == 3 * 2 * (2 if options.get("b_from_updated_a") else 1)  # none without the kernels
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_optimizer_step_is_the_same_with_and_without_the_kernels(monkeypatch):
    """One RiemannianAdamW step (riemannian and gate-rescaled) of a float32 layer, kernels on and off."""
    from moelora.optim import RiemannianAdamW

    results = []
    for use_kernels in (True, False):
        if not use_kernels:
            monkeypatch.setattr(kernels, "_load", lambda: None)
        for preconditioner in ("riemannian", "gate_rescaled"):
            torch.manual_seed(0)
            layer = MoELoRALinear(torch.nn.Linear(24, 16), num_experts=6, top_k=3, rank=4, alpha=8.0)
            with torch.no_grad():
                layer.lora_B.normal_(0.0, 0.1)
            optimizer = RiemannianAdamW(layer.parameters(), lr=1e-2, preconditioner=preconditioner)
            (layer(torch.randn(40, 24)) ** 2).sum().backward()
            optimizer.step()
            results.append([layer.lora_A.detach().clone(), layer.lora_B.detach().clone()])
    half = len(results) // 2
    for got, want in zip(results[:half], results[half:]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta1,weight_decay", [(0.9, 0.0), (0.9, 0.1), (0.3, 0.05)])  # beta1 < 0.5: lerp's other form
def test_the_adamw_loop_equals_torchs_fused_kernel(beta1, weight_decay):
    g = torch.Generator().manual_seed(4)
    shapes, steps = [(20, 4, 576), (3, 7), (1,), (5, 16, 2)], [1.0, 2.0, 7.0, 3.0]  # each tensor its own step
    tensors = [[torch.randn(s, generator=g) * scale for s in shapes] for scale in (1.0, 1.0, 0.1, 0.01)]
    tensors[3] = [t.abs() for t in tensors[3]]  # exp_avg_sq >= 0
    want = [[t.clone() for t in group] for group in tensors]
    lr, beta2, eps = 0.01, 0.99, 1e-7
    torch._fused_adamw_(*want, [], [torch.tensor(t) for t in steps], amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, maximize=False)
    params, grads, exp_avgs, exp_avg_sqs = tensors
    assert kernels.adamw_applies(params, grads, exp_avgs, exp_avg_sqs)
    kernels.adamw(params, grads, exp_avgs, exp_avg_sqs, [lr / (1 - beta1**t) for t in steps],
                  [math.sqrt(1 - beta2**t) for t in steps], lr, weight_decay, beta1, beta2, eps)
    for got_group, want_group in zip(tensors, want):
        for got, expected in zip(got_group, want_group):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert all(p._version == 1 for p in params)


def test_the_adamw_loop_leaves_large_or_unfit_tensors_to_torch():
    small = [torch.zeros(100)]
    assert kernels.adamw_applies(small, small)
    assert not kernels.adamw_applies([torch.zeros(kernels.ADAMW_MAX_MEAN_NUMEL + 1)])
    assert not kernels.adamw_applies([torch.zeros(100, dtype=torch.float64)])
    assert not kernels.adamw_applies([torch.zeros(10, 10).t()])  # not contiguous
    assert not kernels.adamw_applies([])
