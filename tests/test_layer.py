import math

import pytest
import torch
from torch import nn

from moelora import MoELoRALinear
from moelora.layers.dropout import DropoutMask, keep_mask, keep_probability
from moelora.layers.linear import layer_of
from reference import reference_forward, reference_gates


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:g} x {scale:.3e}"


class SeparateLinear(nn.Linear):
    """An ``nn.Linear`` subclass: the layer calls it as a module instead of fusing its GEMM."""


def make_layer(d_in=12, d_out=10, num_experts=5, top_k=3, rank=2, alpha=6.0, power=1.0, bias=True, seed=0,
               separate_base=False):
    torch.manual_seed(seed)
    base = (SeparateLinear if separate_base else nn.Linear)(d_in, d_out, bias=bias)
    layer = MoELoRALinear(base, num_experts, top_k, rank, alpha, gate_backward_power=power)
    with torch.no_grad():  # B = 0 at init would hide most gradients
        layer.lora_B.normal_(0.0, 0.5)
        layer.router.weight.normal_(0.0, 1.0)
    return layer


def layer_grads(layer, x):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    upstream = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    (out * upstream).sum().backward()
    return out.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad, upstream


def reference_grads(layer, x, upstream):
    x = x.clone().requires_grad_(True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    R = layer.router.weight.detach().clone().requires_grad_(True)
    base = layer.base_layer
    out = reference_forward(
        x, base.weight.detach(), None if base.bias is None else base.bias.detach(), A, B, R,
        layer.top_k, layer.scaling, layer.gate_backward_power,
    )
    (out * upstream).sum().backward()
    return out.detach(), x.grad, A.grad, B.grad, R.grad


@pytest.mark.parametrize("power", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("shape", [(7,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("fused_base", [True, False], ids=["fused-base", "separate-base"])
def test_forward_and_all_gradients_match_per_expert_loop(power, shape, fused_base):
    layer = make_layer(power=power, separate_base=not fused_base)
    x = torch.randn(*shape, layer.in_features, generator=torch.Generator().manual_seed(1))
    out, gx, gA, gB, gR, upstream = layer_grads(layer, x)
    r_out, r_gx, r_gA, r_gB, r_gR = reference_grads(layer, x, upstream)
    for name, got, want in [("out", out, r_out), ("x", gx, r_gx), ("A", gA, r_gA), ("B", gB, r_gB), ("router", gR, r_gR)]:
        assert got.shape == want.shape, name
        assert_rel_close(got, want)


@pytest.mark.parametrize("power", [1.0, 0.5])
@pytest.mark.parametrize("fused_base", [True, False], ids=["fused-base", "separate-base"])
def test_dropout_applies_to_experts_only(power, fused_base):
    layer = make_layer(power=power, separate_base=not fused_base)
    layer.dropout = 0.3
    x = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    out, gx, gA, gB, gR, upstream = layer_grads(layer, x)
    torch.manual_seed(11)  # the layer's keep-mask (its seed) is the first random draw of its forward
    keep = DropoutMask.draw((12, 12), 0.3, "cpu").materialize()
    assert not keep.all() and keep.any()
    xr = x.clone().requires_grad_(True)
    A, B, R = (t.detach().clone().requires_grad_(True) for t in (layer.lora_A, layer.lora_B, layer.router.weight))
    ref = reference_forward(
        xr, layer.base_layer.weight, layer.base_layer.bias, A, B, R, layer.top_k, layer.scaling, power,
        expert_input=xr.reshape(-1, 12) * keep / keep_probability(0.3),
    )
    (ref * upstream).sum().backward()
    for got, want in [(out, ref.detach()), (gx, xr.grad), (gA, A.grad), (gB, B.grad), (gR, R.grad)]:
        assert_rel_close(got, want)
    layer.eval()  # no dropout in eval: the fused router/expert projection gives the plain forward
    with torch.no_grad():
        plain = reference_forward(x, layer.base_layer.weight, layer.base_layer.bias, A, B, R, layer.top_k, layer.scaling, power)
        assert_rel_close(layer(x), plain)


def test_keep_mask_rate_and_lanes():
    """Each of the four 16-bit lanes of a 64-bit word keeps with probability q (the top lane too), and
    neighbours independently: rates within 5 standard errors."""
    p, n = 0.05, 400_000
    q = keep_probability(p)
    assert q == round(0.95 * 2**16) / 2**16 and keep_probability(p, "meta") == pytest.approx(0.95)
    torch.manual_seed(0)
    keep = keep_mask((n,), p).float()
    se = math.sqrt(q * (1 - q) / (n / 4))
    for lane in range(4):
        assert abs(keep[lane::4].mean().item() - q) < 5 * se, lane
    both = (keep[:-1] * keep[1:]).mean().item()  # neighbours independent: P(both kept) = q^2
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n)
    # Extreme rates stay strictly inside (0, 1), so 1 / q is finite and a tiny p still drops sometimes.
    assert keep_probability(0.999999) == 2**-16 and keep_probability(1e-9) == 1 - 2**-16
    assert keep_mask((3, 5), 0.999999).dtype == torch.bool
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            keep_probability(bad)


def test_gate_power_changes_expert_gradients_but_not_router_or_forward():
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(3))
    plain = layer_grads(make_layer(power=1.0), x)
    strategy = layer_grads(make_layer(power=0.5), x)
    assert_rel_close(strategy[0], plain[0])  # forward value
    assert_rel_close(strategy[4], plain[4])  # router gradient is the exact one in both
    assert (strategy[3] - plain[3]).abs().max() > 1e-3  # experts see sqrt(g) instead of g


def test_gate_power_zero_does_not_wake_unselected_experts():
    layer = make_layer(num_experts=6, top_k=1, power=0.0)
    x = torch.randn(1, 12, generator=torch.Generator().manual_seed(4))
    layer(x).sum().backward()
    selected = reference_gates(x, layer.router.weight.detach(), 1)[0] > 0
    per_expert = layer.lora_B.grad.abs().sum(dim=(1, 2))
    assert (per_expert[~selected] == 0).all()
    assert (per_expert[selected] > 0).all()


def test_single_expert_is_plain_lora():
    layer = make_layer(num_experts=1, top_k=1, rank=3)
    x = torch.randn(4, 6, 12, generator=torch.Generator().manual_seed(5))
    base = layer.base_layer
    expected = base(x) + layer.scaling * (x @ layer.lora_A[0].t()) @ layer.lora_B[0].t()
    assert_rel_close(layer(x), expected)


def test_single_expert_matches_peft_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    d_in, d_out, rank, alpha = 12, 10, 3, 7.0
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(d_in, d_out))
    ours = MoELoRALinear(nn.Linear(d_in, d_out), 1, 1, rank, alpha)
    with torch.no_grad():
        ours.base_layer.load_state_dict(base.proj.state_dict())
        ours.lora_B.normal_()
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"])
    )
    lora = peft_model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(ours.lora_A[0])
        lora.lora_B["default"].weight.copy_(ours.lora_B[0])
    x = torch.randn(3, 4, d_in)
    assert_rel_close(ours(x), peft_model(x))


def test_lora_init():
    layer = MoELoRALinear(nn.Linear(64, 8), num_experts=4, top_k=2, rank=3, alpha=3)
    assert layer.lora_A.shape == (4, 3, 64) and layer.lora_B.shape == (4, 8, 3)
    assert layer.router.weight.shape == (4, 64) and layer.router.bias is None
    assert (layer.lora_B == 0).all()
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on each (r, d_in) expert
    assert layer.lora_A.abs().max() <= bound
    assert not torch.equal(layer.lora_A[0], layer.lora_A[1])  # experts drawn independently
    assert layer.scaling == 1.0


def test_conv1d_is_wrapped_like_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(10, 12)  # nf=d_out=10, nx=d_in=12
    layer = MoELoRALinear(conv, 4, 2, 2, 4.0)
    assert (layer.in_features, layer.out_features) == (12, 10)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12)
    linear_base = nn.Linear(12, 10)
    with torch.no_grad():
        linear_base.weight.copy_(conv.weight.t())
        linear_base.bias.copy_(conv.bias)
    expected = reference_forward(
        x, linear_base.weight, linear_base.bias, layer.lora_A, layer.lora_B, layer.router.weight, 2, layer.scaling, 1.0
    )
    assert_rel_close(layer(x), expected)


def test_gate_statistics_sum_over_micro_batches_and_skip_eval():
    layer = make_layer()
    batches = [torch.randn(n, 12, generator=torch.Generator().manual_seed(n)) for n in (3, 8, 5)]
    for x in batches:
        layer(x)
    layer.eval()
    layer(torch.randn(4, 12))
    layer.train()
    with torch.no_grad():
        layer(torch.randn(6, 12))
    all_tokens = torch.cat(batches)
    expected = reference_gates(all_tokens, layer.router.weight.detach(), layer.top_k).square().mean(0)
    assert layer.gate_token_count.item() == 16
    assert_rel_close(layer.gate_sq_mean(), expected)
    layer.reset_gate_stats()
    assert layer.gate_token_count.item() == 0 and (layer.gate_sq_sum == 0).all()


def test_router_diagnostics_after_forward():
    layer = make_layer(num_experts=5, top_k=3)
    x = torch.randn(40, 12)
    with torch.no_grad():
        layer(x)
    gates = reference_gates(x, layer.router.weight, 3)
    assert torch.allclose(layer.expert_load, (gates > 0).float().sum(0) / (40 * 3))
    assert layer.expert_load.sum().item() == pytest.approx(1.0)
    entropy = -(gates * gates.clamp_min(1e-30).log()).sum(-1).mean()
    assert layer.gate_entropy.item() == pytest.approx(entropy.item(), rel=1e-5)
    assert 0 < layer.gate_entropy.item() <= math.log(3) + 1e-6


@pytest.mark.parametrize(
    "base_dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)]
)
def test_mixed_dtypes(base_dtype, adapter_dtype):
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 8).to(base_dtype), 4, 2, 2, 4.0, dtype=adapter_dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 16, dtype=base_dtype, requires_grad=True)
    out = layer(x)
    assert out.dtype == base_dtype
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == adapter_dtype and torch.isfinite(layer.lora_A.grad).all()
    assert x.grad.dtype == base_dtype
    reference = make_reference_in_float64(layer, x.detach())
    assert (out.double() - reference).abs().max() < 0.1 * reference.abs().max()


def make_reference_in_float64(layer, x):
    b = layer.base_layer
    return reference_forward(
        x.double(), b.weight.double(), b.bias.double(), layer.lora_A.double(), layer.lora_B.double(),
        layer.router.weight.double(), layer.top_k, layer.scaling, 1.0,
    )


def test_parameters_point_back_to_their_layer_after_dtype_change_and_deepcopy():
    import copy

    layer = make_layer()
    for p in (layer.lora_A, layer.lora_B, layer.router.weight):
        assert layer_of(p) is layer
    layer.double()
    assert layer_of(layer.lora_A) is layer
    clone = copy.deepcopy(layer)
    assert layer_of(clone.lora_B) is clone and layer_of(layer.lora_B) is layer
    assert layer_of(layer.base_layer.weight) is None


def test_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        MoELoRALinear(nn.Linear(4, 4), num_experts=2, top_k=3, rank=1, alpha=1)
    with pytest.raises(TypeError, match="Conv1D"):
        MoELoRALinear(nn.Conv2d(3, 3, 1), num_experts=2, top_k=1, rank=1, alpha=1)


def test_layer_compiles_without_graph_breaks():
    layer = make_layer()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 12, requires_grad=True)
    expected = layer(x)
    got = compiled(x)
    assert_rel_close(got, expected)
    got.sum().backward()


def test_layer_with_dropout_compiles_without_graph_breaks():
    layer = make_layer()
    layer.dropout = 0.2
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 12, requires_grad=True)
    torch.manual_seed(3)
    got = compiled(x)
    got.sum().backward()
    torch.manual_seed(3)  # compiled, the layer draws its boolean mask from the default generator and keeps it
    keep = keep_mask((6, 12), 0.2)
    assert not keep.all() and keep.any()
    xr = x.detach().clone().requires_grad_(True)
    A, B, R = (t.detach().clone().requires_grad_(True) for t in (layer.lora_A, layer.lora_B, layer.router.weight))
    ref = reference_forward(xr, layer.base_layer.weight, layer.base_layer.bias, A, B, R, layer.top_k, layer.scaling,
                            layer.gate_backward_power, expert_input=xr * keep / keep_probability(0.2))
    ref.sum().backward()
    for got_value, want in [(got, ref.detach()), (x.grad, xr.grad), (layer.lora_A.grad, A.grad),
                            (layer.lora_B.grad, B.grad), (layer.router.weight.grad, R.grad)]:
        assert_rel_close(got_value, want)


def test_base_fusion_only_for_a_plain_linear():
    tokens = torch.randn(4, 12)
    assert make_layer()._base_is_fusable(tokens)
    assert not make_layer(separate_base=True)._base_is_fusable(tokens)
    hooked = make_layer()
    hooked.base_layer.register_forward_hook(lambda module, args, out: out * 2)
    assert not hooked._base_is_fusable(tokens)
    x = torch.randn(3, 12)
    plain = make_layer()
    assert_rel_close(hooked(x) - plain(x), plain.base_layer(x))  # the hook ran: its base output counts twice
    patched = make_layer()
    patched.base_layer.forward = lambda inp: torch.zeros(inp.shape[0], 10)
    assert not patched._base_is_fusable(tokens)
    assert not make_layer()._base_is_fusable(tokens.double())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fused_base_matches_separate_base_with_trainable_base(dropout, dtype):
    """The fused input projection against the module call of the same base, including the base weight
    and bias gradients (a trainable base) and an input that needs no gradient."""
    grads = {}
    for fused in (True, False):
        layer = make_layer(power=0.5, separate_base=not fused).to(dtype)
        layer.dropout = dropout
        x = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(5)).to(dtype)
        torch.manual_seed(4)
        out = layer(x)  # x needs no gradient: the first layer of a model
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        base = layer.base_layer
        grads[fused] = [out.detach(), base.weight.grad, base.bias.grad, layer.lora_A.grad, layer.lora_B.grad,
                        layer.router.weight.grad]
    rel = 1e-10 if dtype == torch.float64 else 2e-2
    for got, want in zip(grads[True], grads[False]):
        assert_rel_close(got.float(), want.float(), rel=rel)


@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_top_k_gates_match_the_definition_with_gradients(top_k):
    """Softmax over the kept logits against method.md's softmax, top-k mask and renormalisation."""
    from moelora.layers.routing import top_k_gates

    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    weight = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    upstream = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    w1, w2 = weight.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    got = top_k_gates(x @ w1.t(), top_k)
    want = reference_gates(x, w2, top_k)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)  # the gates are float32
    # (top_k = 1: every gate is exactly 1, so the router gradient is exactly zero in the definition)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert top_k == 1 or w2.grad.abs().max() > 1e-3


@pytest.mark.parametrize("top_k", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_router_backward_from_the_gates_alone_equals_autograd_through_top_k_gates(top_k, dtype):
    """The layer's routing backward (softmax Jacobian over the kept experts, from the gates alone) against
    autograd through top_k_gates' topk, softmax and scatter; and route_top_k's kept gates and experts are
    those the dense gates are scattered from."""
    from moelora.layers.routing import route_top_k, router_backward, top_k_gates

    logits = torch.randn(40, 5, generator=torch.Generator().manual_seed(4)).to(dtype)
    upstream = torch.randn(40, 5, generator=torch.Generator().manual_seed(5))
    slow = logits.clone().requires_grad_(True)
    want = top_k_gates(slow, top_k)
    (want * upstream).sum().backward()
    gates, weights, index = route_top_k(logits, top_k)
    assert torch.equal(gates, want) and gates.dtype == torch.float32
    assert weights.shape == index.shape == (40, top_k)
    assert torch.equal(torch.zeros_like(gates).scatter_(-1, index, weights), gates)
    got = router_backward(gates, upstream)
    torch.testing.assert_close(got.to(dtype), slow.grad, rtol=1e-6, atol=1e-7)
    assert top_k == 1 or slow.grad.abs().max() > 1e-3


def test_router_statistics_from_the_kept_gates_equal_those_of_the_dense_gates():
    """routing_statistics from the (T, top_k) kept gates against the definitions on the dense (T, E) gates,
    including a token whose kept gate underflows to zero (still an assignment)."""
    from moelora.layers.routing import route_top_k, routing_statistics

    logits = torch.randn(64, 7, generator=torch.Generator().manual_seed(6))
    logits[0] = torch.tensor([0.0, -200.0, -300.0, -400.0, -500.0, -600.0, -700.0])
    gates, weights, index = route_top_k(logits, 3)
    assert gates[0, 1] == 0  # kept, but exp(-200) is 0 in float32
    stats = routing_statistics(weights, index, 7)
    assert stats.shape == (15,) and stats.dtype == torch.float32
    assert_rel_close(stats[:7], gates.square().sum(0))
    assert torch.equal(stats[7:14], torch.zeros(64, 7).scatter_(-1, index, 1.0).sum(0) / (64 * 3))
    entropy = -(gates * gates.clamp_min(1e-30).log()).sum(-1).mean()
    assert stats[14].item() == pytest.approx(entropy.item(), rel=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("fused_base", [True, False], ids=["fused-base", "separate-base"])
def test_the_backward_pass_keeps_no_mask_and_no_parameter_copy(dropout, fused_base):
    """What the dense layer saves for its backward pass: the input, the (T, E*r + E) projections and the
    (T, E) gates. The dropout mask is drawn again from its seed and B_cat is rebuilt from B, so nothing of
    (T, d_in) besides x and no copy of a parameter is kept."""
    layer = make_layer(separate_base=not fused_base)
    layer.dropout = dropout
    x = torch.randn(64, 12, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params and tensor.untyped_storage().data_ptr() != x.data_ptr():
            saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()
    experts = layer.num_experts * layer.rank
    allowed = {(64, experts), (64, experts + layer.num_experts), (64, layer.num_experts)}
    assert saved and {shape for shape, _ in saved} <= allowed, saved
    assert all(dtype == torch.float32 for _, dtype in saved), saved
