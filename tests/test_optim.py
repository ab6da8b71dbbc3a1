"""Riemannian optimizers: closed forms, reductions to torch.optim, the slow reference, PEFT, method.md section 5."""

import copy
import io
import json
import math

import pytest
import torch
from torch import nn

import moelora
from moelora import MoELoRALinear
from moelora.layers import kernels
from moelora.optim import (
    PreconditionerError,
    PreconditionerWarning,
    RiemannianAdamW,
    RiemannianSGD,
    param_groups,
)
from moelora.optim import precondition as precondition_module
from moelora.optim.groups import ExpertFactor
from moelora.optim.precondition import damped_inverse
from moelora.optim.reference import ReferenceRiemannianAdamW, ReferenceRiemannianSGD

F64 = torch.float64


# ------------------------------------------------------------------------------------------- helpers
class Net(nn.Module):
    """Two adapted linear maps of different shapes and a trainable head (the "other" group)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 7)
        self.down = nn.Linear(7, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.down(torch.tanh(self.up(x)))))


def make_net(num_experts=4, top_k=2, rank=3, power=1.0, dtype=F64, adapter_dtype=None, seed=0) -> Net:
    torch.manual_seed(seed)
    net = Net().to(dtype)
    config = moelora.MoELoRAConfig(
        num_experts=num_experts, top_k=top_k, rank=rank, alpha=2.0 * rank, dropout=0.0,
        target_modules=["up", "down"], gate_backward_power=power,
    )
    moelora.wrap(net, config, adapter_dtype=adapter_dtype)
    net.head.weight.requires_grad_(True)  # a trainable parameter outside the adapters
    with torch.no_grad():
        for _, layer in moelora.moelora_layers(net):
            layer.lora_B.normal_(0.0, 0.5)  # B = 0 at init would hide the A-side preconditioner
            layer.router.weight.normal_(0.0, 1.0)
    return net


def layers(net):
    return [layer for _, layer in moelora.moelora_layers(net)]


def backward(net: nn.Module, seed: int, tokens: int = 5) -> None:
    """A forward/backward pass on fixed random data (so two copies of a net see the same batch)."""
    g = torch.Generator().manual_seed(seed)
    dtype = net.head.weight.dtype
    x = torch.randn(tokens, 6, generator=g, dtype=F64).to(dtype)
    target = torch.randn(tokens, 2, generator=g, dtype=F64).to(dtype)
    ((net(x) - target) ** 2).sum().backward()


def train(net, opt, steps, first_seed=0):
    for step in range(steps):
        opt.zero_grad()
        backward(net, first_seed + step)
        opt.step()


def assert_nets_close(a: nn.Module, b: nn.Module, rel: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        scale = q.detach().abs().max().clamp_min(1e-12)
        err = (p.detach() - q.detach()).abs().max()
        assert err <= rel * scale, f"{name}: max abs error {err:.3e} > {rel:g} x {scale:.3e}"


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:g} x {scale:.3e}"


def gates_by_hand(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> torch.Tensor:
    """method.md section 1: softmax over all experts, keep the top_k, renormalise. ``(T, d_in) -> (T, E)``."""
    probs = torch.softmax(x.double() @ router_weight.double().t(), dim=-1)
    kept = torch.zeros_like(probs).scatter(-1, probs.topk(top_k, dim=-1).indices, 1.0)
    return probs * kept / (probs * kept).sum(-1, keepdim=True)


def record_inputs(net):
    inputs = {}
    for layer in layers(net):
        layer.register_forward_pre_hook(lambda m, args: inputs.__setitem__(id(m), args[0].detach().reshape(-1, m.in_features)))
    return inputs


# ---------------------------------------------------------------------------------------- param_groups
def test_param_groups_structure_and_serialisable():
    net = make_net()
    groups = param_groups(net, lr=1e-3, router_lr=3e-6, weight_decay=0.1, router_max_grad_norm=1.0)
    assert [g["kind"] for g in groups] == ["experts", "router", "other"]
    up, down = layers(net)
    assert groups[0]["params"] == [up.lora_A, up.lora_B, down.lora_A, down.lora_B]
    assert groups[1]["params"] == [up.router.weight, down.router.weight]
    assert groups[2]["params"] == [net.head.weight]  # frozen base weights and biases are left out
    assert (groups[0]["lr"], groups[0]["weight_decay"]) == (1e-3, 0.1)
    assert (groups[1]["lr"], groups[1]["weight_decay"], groups[1]["max_grad_norm"]) == (3e-6, 0.1, 1.0)
    assert groups[1]["preconditioner"] == groups[2]["preconditioner"] == "none"
    assert param_groups(net, lr=1e-3, weight_decay=0.1, router_weight_decay=0.0)[1]["weight_decay"] == 0.0
    assert param_groups(net, lr=1e-3)[1]["lr"] == 1e-3  # router lr defaults to lr
    # Plain dictionaries: everything but the parameters themselves is JSON.
    json.dumps([{k: v for k, v in g.items() if k != "params"} for g in groups])
    opt = RiemannianAdamW(groups)
    saved = opt.state_dict()["param_groups"]
    json.dumps(saved)
    assert [g["kind"] for g in saved] == ["experts", "router", "other"]


def test_param_groups_without_head_and_bad_input():
    net = make_net()
    net.head.weight.requires_grad_(False)
    assert [g["kind"] for g in param_groups(net, lr=1.0)] == ["experts", "router"]
    with pytest.raises(ValueError, match="no MoELoRALinear"):
        param_groups(nn.Linear(3, 3), lr=1.0)
    with pytest.raises(ValueError, match="router_lr"):
        param_groups(net, lr=1.0, router_lr=-1.0)
    with pytest.raises(ValueError, match="router_max_grad_norm"):
        param_groups(net, lr=1.0, router_max_grad_norm=0.0)


def test_optimizer_rejects_bad_options():
    net = make_net()
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        RiemannianSGD(param_groups(net, lr=1.0), preconditioner="shampoo")
    with pytest.raises(ValueError, match="reg"):
        RiemannianAdamW(param_groups(net, lr=1.0), reg=0.0)
    with pytest.raises(ValueError, match="gate_floor"):
        RiemannianAdamW(param_groups(net, lr=1.0), gate_floor=0.0)
    with pytest.raises(ValueError, match="kind"):
        RiemannianSGD([{"params": list(net.parameters()), "kind": "experts?"}])


# ------------------------------------------------------------------------- one SGD step by hand
@pytest.mark.parametrize("preconditioner", ["none", "riemannian", "gate_rescaled"])
def test_sgd_step_equals_closed_form(preconditioner):
    lr, router_lr, reg, floor = 0.05, 0.01, 1e-3, 0.02
    net = make_net(num_experts=5, top_k=2)
    inputs = record_inputs(net)
    backward(net, seed=1, tokens=3)  # 3 tokens x top-2 of 5 experts: some experts see no token
    before = {id(l): (l.lora_A.detach().clone(), l.lora_B.detach().clone(), l.router.weight.detach().clone()) for l in layers(net)}
    grads = {id(l): (l.lora_A.grad.clone(), l.lora_B.grad.clone(), l.router.weight.grad.clone()) for l in layers(net)}
    head, head_grad = net.head.weight.detach().clone(), net.head.weight.grad.clone()
    opt = RiemannianSGD(param_groups(net, lr=lr, router_lr=router_lr), preconditioner=preconditioner, reg=reg, gate_floor=floor)
    opt.step()

    floored = unfloored = 0
    for layer in layers(net):
        a, b, r = before[id(layer)]
        ga, gb, gr = grads[id(layer)]
        mean_g2 = gates_by_hand(inputs[id(layer)], r, layer.top_k).square().mean(0)  # over the forward's tokens
        want_a, want_b = a.clone(), b.clone()
        for e in range(layer.num_experts):
            c2 = max(float(mean_g2[e]), floor) if preconditioner == "gate_rescaled" else 1.0
            floored += c2 == floor
            unfloored += c2 > floor
            eye = torch.eye(layer.rank, dtype=F64)
            if preconditioner == "none":
                want_a[e] -= lr * ga[e]
                want_b[e] -= lr * gb[e]
            else:
                want_a[e] -= lr * torch.linalg.inv(c2 * b[e].T @ b[e] + reg * eye) @ ga[e]
                want_b[e] -= lr * gb[e] @ torch.linalg.inv(c2 * a[e] @ a[e].T + reg * eye)
        # The layer keeps its gate statistics in float32: c^2 is exact to about 1e-7 relative.
        rel = 1e-5 if preconditioner == "gate_rescaled" else 1e-12
        assert_rel_close(layer.lora_A.detach() - a, want_a - a, rel)
        assert_rel_close(layer.lora_B.detach() - b, want_b - b, rel)
        torch.testing.assert_close(layer.router.weight.detach(), r - router_lr * gr, rtol=1e-14, atol=0)
        assert layer.gate_token_count == 0  # consumed and reset by the step
    torch.testing.assert_close(net.head.weight.detach(), head - lr * head_grad, rtol=1e-14, atol=0)
    if preconditioner == "gate_rescaled":
        assert floored and unfloored  # both branches of max(mean g^2, floor) were exercised


def test_router_gradients_clipped_over_all_routers_without_touching_grad():
    net = make_net()
    backward(net, seed=2)
    routers = [layer.router.weight for layer in layers(net)]
    before = [r.detach().clone() for r in routers]
    grads = [r.grad.clone() for r in routers]
    norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
    max_norm = norm / 4
    opt = RiemannianSGD(param_groups(net, lr=0.1, router_lr=0.5, router_max_grad_norm=max_norm))
    opt.step()
    coef = max_norm / (norm + 1e-6)
    for r, r0, g in zip(routers, before, grads):
        torch.testing.assert_close(r.detach(), r0 - 0.5 * coef * g, rtol=1e-13, atol=0)
        assert torch.equal(r.grad, g)


# ----------------------------------------------------------------------------- reductions to torch.optim
SGD_SETTINGS = [
    dict(momentum=0.0, weight_decay=0.0),
    dict(momentum=0.9, dampening=0.1, weight_decay=0.05),
    dict(momentum=0.8, nesterov=True, weight_decay=0.01),
]


@pytest.mark.parametrize("settings", SGD_SETTINGS, ids=["plain", "momentum", "nesterov"])
def test_none_equals_torch_sgd(settings):
    ours, theirs = make_net(), make_net()
    kwargs = dict(lr=0.05, router_lr=0.02, weight_decay=settings["weight_decay"])
    options = {k: v for k, v in settings.items() if k != "weight_decay"}
    train(ours, RiemannianSGD(param_groups(ours, **kwargs), preconditioner="none", **options), steps=5)
    train(theirs, torch.optim.SGD(param_groups(theirs, **kwargs), foreach=False, **options), steps=5)
    assert_nets_close(ours, theirs, rel=1e-10)


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "foreach"])
def test_none_equals_torch_adamw(fused):
    ours, theirs = make_net(), make_net()
    kwargs = dict(lr=0.02, router_lr=0.005, weight_decay=0.1)
    options = dict(betas=(0.8, 0.95), eps=1e-7)
    train(ours, RiemannianAdamW(param_groups(ours, **kwargs), preconditioner="none", fused=fused, **options), steps=5)
    train(theirs, torch.optim.AdamW(param_groups(theirs, **kwargs), foreach=False, **options), steps=5)
    assert_nets_close(ours, theirs, rel=1e-10)


@pytest.mark.parametrize("preconditioner", ["none", "riemannian", "gate_rescaled"])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_the_compiled_cpu_adamw_loop_equals_torchs_fused_kernel(preconditioner, bias_correction):
    # float32 on a CPU: fused=None takes the compiled loop (moelora.layers.kernels.adamw), fused=True torch's
    # fused kernel; the same update to float32 rounding, steps apart.
    if not kernels.wanted() or kernels.compiler() is None:
        pytest.skip("no C compiler (or MOELORA_CPU_KERNELS=0): the compiled loop is not built")
    nets = [make_net(power=0.5, dtype=torch.float32) for _ in range(2)]
    kwargs = dict(lr=0.01, router_lr=0.002, weight_decay=0.05, router_max_grad_norm=0.5)
    options = dict(preconditioner=preconditioner, betas=(0.85, 0.99), eps=1e-7, bias_correction=bias_correction)
    compiled = RiemannianAdamW(param_groups(nets[0], **kwargs), fused=None, **options)
    fused = RiemannianAdamW(param_groups(nets[1], **kwargs), fused=True, **options)
    params = [p for p in nets[0].parameters() if p.requires_grad]
    assert kernels.adamw_applies(params, params)  # the compiled loop serves this net's parameters
    versions = [p._version for p in params]
    train(nets[0], compiled, steps=4)
    train(nets[1], fused, steps=4)
    assert all(p._version > v for p, v in zip(params, versions))  # in-place updates are visible as such
    assert_nets_close(nets[0], nets[1], rel=1e-5)
    for p, q in zip(params, (q for q in nets[1].parameters() if q.requires_grad)):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_rel_close(compiled.state[p][key], fused.state[q][key], rel=1e-5)


# --------------------------------------------------------------------------- the slow per-expert reference
@pytest.mark.parametrize("preconditioner", ["riemannian", "gate_rescaled"])
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_sgd_matches_reference(preconditioner, power):
    ours, ref = make_net(power=power), make_net(power=power)
    kwargs = dict(lr=0.02, router_lr=0.01, weight_decay=0.01, router_max_grad_norm=0.5)
    options = dict(preconditioner=preconditioner, reg=1e-4, gate_floor=1e-3, momentum=0.9)
    train(ours, RiemannianSGD(param_groups(ours, **kwargs), **options), steps=4)
    train(ref, ReferenceRiemannianSGD(param_groups(ref, **kwargs), **options), steps=4)
    assert_nets_close(ours, ref, rel=1e-10)


@pytest.mark.parametrize("preconditioner", ["riemannian", "gate_rescaled"])
@pytest.mark.parametrize(
    "paper", [False, True], ids=["defaults", "paper-faithful"]  # no bias correction, eps 1e-6, B from updated A
)
@pytest.mark.parametrize("fused", [None, False], ids=["fused", "foreach"])
def test_adamw_matches_reference(preconditioner, paper, fused):
    ours, ref = make_net(power=0.5), make_net(power=0.5)
    kwargs = dict(lr=0.01, router_lr=0.001, weight_decay=0.0 if paper else 0.05, router_max_grad_norm=0.5)
    options = dict(preconditioner=preconditioner, reg=1e-4, gate_floor=1e-3)
    if paper:
        options.update(bias_correction=False, eps=1e-6, b_from_updated_a=True)
    train(ours, RiemannianAdamW(param_groups(ours, **kwargs), fused=fused, **options), steps=4)
    train(ref, ReferenceRiemannianAdamW(param_groups(ref, **kwargs), **options), steps=4)
    assert_nets_close(ours, ref, rel=1e-9)


def test_layers_of_different_shapes_and_ranks_match_reference():
    def build():
        torch.manual_seed(4)
        net = nn.Sequential(
            MoELoRALinear(nn.Linear(6, 5), num_experts=3, top_k=2, rank=2, alpha=4.0),
            MoELoRALinear(nn.Linear(5, 8), num_experts=5, top_k=3, rank=4, alpha=4.0),
            MoELoRALinear(nn.Linear(8, 4), num_experts=2, top_k=1, rank=1, alpha=4.0),
        ).double()
        with torch.no_grad():
            for layer in net:
                layer.lora_B.normal_()
        return net

    def run(net, opt_cls):
        opt = opt_cls(param_groups(net, lr=0.01), preconditioner="gate_rescaled", reg=1e-4)
        for seed in range(3):
            opt.zero_grad()
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)
            net(x).square().sum().backward()
            opt.step()

    ours, ref = build(), build()
    run(ours, RiemannianAdamW)
    run(ref, ReferenceRiemannianAdamW)
    assert_nets_close(ours, ref, rel=1e-9)


def test_b_from_updated_a_changes_the_step():
    nets = [make_net(), make_net()]
    for net, switch in zip(nets, [False, True]):
        train(net, RiemannianAdamW(param_groups(net, lr=0.05), b_from_updated_a=switch), steps=1)
    up = [layers(net)[0] for net in nets]
    assert torch.equal(up[0].lora_A, up[1].lora_A)  # A's step is the same either way
    assert not torch.allclose(up[0].lora_B, up[1].lora_B)


# ---------------------------------------------------------------------------------------------- PEFT
@pytest.mark.parametrize("base_cls", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
def test_one_expert_matches_peft_riemannian(base_cls):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_riemannian_optimizer

    d_in, d_out, rank, reg, lr = 9, 7, 3, 1e-3, 0.05  # reg given explicitly: PEFT's default is 1e-2
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(d_in, d_out))
    base = base.double()
    ours = nn.Sequential()
    ours.add_module("proj", copy.deepcopy(base.proj))
    moelora.wrap(ours, moelora.MoELoRAConfig(num_experts=1, top_k=1, rank=rank, alpha=rank, dropout=0.0, target_modules=["proj"]))
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["proj"]))
    peft_model = peft_model.double()
    layer = ours.proj
    lora = peft_model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B.normal_()
        lora.lora_A["default"].weight.copy_(layer.lora_A[0])
        lora.lora_B["default"].weight.copy_(layer.lora_B[0])

    ours_cls = RiemannianSGD if base_cls is torch.optim.SGD else RiemannianAdamW
    ours_opt = ours_cls(param_groups(ours, lr=lr, weight_decay=0.01), preconditioner="riemannian", reg=reg)
    peft_opt = create_riemannian_optimizer(peft_model, base_cls, lr=lr, reg=reg, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad_a = torch.randn(rank, d_in, generator=g, dtype=F64)
        grad_b = torch.randn(d_out, rank, generator=g, dtype=F64)
        layer.lora_A.grad, layer.lora_B.grad = grad_a.clone()[None], grad_b.clone()[None]
        lora.lora_A["default"].weight.grad = grad_a.clone()  # PEFT overwrites .grad in place
        lora.lora_B["default"].weight.grad = grad_b.clone()
        ours_opt.step()
        peft_opt.step()
        assert torch.equal(layer.lora_A.grad[0], grad_a)  # ours leaves .grad alone
        torch.testing.assert_close(layer.lora_A.detach()[0], lora.lora_A["default"].weight.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.lora_B.detach()[0], lora.lora_B["default"].weight.detach(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ method.md section 5: the identities
@pytest.mark.parametrize(
    "power, preconditioner, weight",
    [
        (1.0, "riemannian", lambda g: g**2),  # per-expert Riemannian (paper baseline)
        (0.5, "riemannian", lambda g: g**1.5),  # + engineering strategy (the paper's method)
        (1.0, "gate_rescaled", lambda g: torch.ones_like(g)),  # gate-rescaled preconditioner (derived)
    ],
    ids=["riemannian-g2", "paper-g1.5", "gate_rescaled-1"],
)
def test_first_order_function_change(power, preconditioner, weight):
    d_in, d_out, num_experts, rank, alpha, lr = 6, 5, 3, 2, 4.0, 1e-7
    torch.manual_seed(3)
    layer = MoELoRALinear(nn.Linear(d_in, d_out).double(), num_experts, num_experts, rank, alpha, gate_backward_power=power)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.normal_()
    u = torch.randn(1, d_in, dtype=F64)  # one token: the gates are constants
    delta = torch.randn(1, d_out, dtype=F64)  # L = <delta, y>, so dL/dy = delta
    gates = gates_by_hand(u, layer.router.weight.detach(), num_experts)[0]
    assert gates.min() > 0.05

    def effective(a, b):  # s * sum_i g_i B_i A_i, the gates held at their pre-step values
        return layer.scaling * torch.einsum("e,eor,eri->oi", gates, b, a)

    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    (layer(u) * delta).sum().backward()
    opt = RiemannianSGD(param_groups(layer, lr=lr, router_lr=0.0), preconditioner=preconditioner, reg=1e-12, gate_floor=1e-12)
    opt.step()
    change = effective(layer.lora_A.detach(), layer.lora_B.detach()) - effective(a0, b0)

    full_grad = delta.T @ u  # N = delta u^T, the full fine-tuning gradient (d_out, d_in)
    expected = torch.zeros_like(full_grad)
    for i in range(num_experts):
        a, b = a0[i], b0[i]
        proj_b = b @ torch.linalg.inv(b.T @ b) @ b.T  # column space of B_i
        proj_a = a.T @ torch.linalg.inv(a @ a.T) @ a  # row space of A_i
        expected += weight(gates[i]) * (proj_b @ full_grad + full_grad @ proj_a)
    expected *= -lr * layer.scaling**2
    assert (change - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_top_1_makes_all_variants_coincide():
    results = []  # one token (section 5's setting): its expert has g = c = 1, the others no gradient
    for power, preconditioner in [(1.0, "riemannian"), (0.5, "riemannian"), (1.0, "gate_rescaled")]:
        net = make_net(top_k=1, power=power)
        backward(net, seed=11, tokens=1)
        RiemannianSGD(param_groups(net, lr=0.05), preconditioner=preconditioner).step()
        results.append(net)
    assert_nets_close(results[1], results[0], rel=1e-12)
    assert_nets_close(results[2], results[0], rel=1e-12)


# ------------------------------------------------------------------------------------------ state and dtypes
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda g: RiemannianAdamW(g, preconditioner="gate_rescaled", weight_decay=0.01),
        lambda g: RiemannianAdamW(g, bias_correction=False, eps=1e-6, b_from_updated_a=True, fused=False),
        lambda g: RiemannianSGD(g, preconditioner="riemannian", momentum=0.9, nesterov=True),
    ],
    ids=["adamw-gate_rescaled", "adamw-paper", "sgd-momentum"],
)
def test_state_dict_resume_continues_exactly(make_opt):
    groups = lambda net: param_groups(net, lr=0.01, router_lr=0.002, router_max_grad_norm=1.0)  # noqa: E731
    straight = make_net()
    train(straight, make_opt(groups(straight)), steps=6)

    first = make_net()
    opt = make_opt(groups(first))
    train(first, opt, steps=3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors, numbers and strings only

    resumed = make_net(seed=123)  # different initial weights, overwritten by the checkpoint
    resumed.load_state_dict(saved["model"])
    opt = make_opt(groups(resumed))
    opt.load_state_dict(saved["optim"])
    train(resumed, opt, steps=3, first_seed=3)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_deep_copy_of_model_and_optimizer_trains_alike():
    """torch copies and pickles an optimizer's defaults, state and param_groups only: every option is there."""
    net = make_net()
    opt = RiemannianAdamW(param_groups(net, lr=0.01), preconditioner="gate_rescaled", b_from_updated_a=True, fused=False)
    train(net, opt, steps=1)
    net_copy, opt_copy = copy.deepcopy((net, opt))
    assert opt_copy.defaults["b_from_updated_a"] and opt_copy.param_groups[0]["fused"] is False
    train(net, opt, steps=2, first_seed=1)
    train(net_copy, opt_copy, steps=2, first_seed=1)
    for p, q in zip(net.parameters(), net_copy.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)], ids=["float32", "bfloat16"])
def test_low_precision_parameters(dtype, rel):
    lr, reg = 0.05, 1e-4
    net = make_net(dtype=torch.float32, adapter_dtype=dtype)
    up = layers(net)[0]
    assert up.lora_A.dtype == dtype
    backward(net, seed=4)
    a, b = up.lora_A.detach().clone(), up.lora_B.detach().clone()
    ga = up.lora_A.grad.clone()
    RiemannianSGD(param_groups(net, lr=lr), reg=reg).step()
    eye = torch.eye(up.rank, dtype=F64)
    want_a = torch.stack([
        a[e].double() - lr * torch.linalg.inv(b[e].double().T @ b[e].double() + reg * eye) @ ga[e].double()
        for e in range(up.num_experts)
    ])
    assert up.lora_A.dtype == dtype
    # Solved in float32 whatever the parameter dtype; bfloat16 then rounds the new weights.
    assert_rel_close(up.lora_A.double() - a.double(), want_a - a.double(), rel)

    opt = RiemannianAdamW(param_groups(net, lr=1e-2), preconditioner="gate_rescaled")
    train(net, opt, steps=3)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert opt.state[up.lora_B]["exp_avg"].dtype == dtype


def test_none_grad_is_skipped():
    net = make_net()
    up, down = layers(net)
    backward(net, seed=5)
    up.lora_B.grad = None
    down.router.weight.grad = None
    frozen = {name: p.detach().clone() for name, p in [("up.B", up.lora_B), ("down.R", down.router.weight)]}
    moved = {name: p.detach().clone() for name, p in [("up.A", up.lora_A), ("down.B", down.lora_B)]}
    opt = RiemannianAdamW(param_groups(net, lr=0.01, weight_decay=0.1))
    opt.step()
    assert torch.equal(up.lora_B, frozen["up.B"]) and torch.equal(down.router.weight, frozen["down.R"])
    assert up.lora_B not in opt.state and down.router.weight not in opt.state
    assert not torch.equal(up.lora_A, moved["up.A"]) and not torch.equal(down.lora_B, moved["down.B"])


@pytest.mark.parametrize("preconditioner", ["riemannian", "gate_rescaled"])
def test_experts_without_tokens_are_updated_as_torch_optim_would(preconditioner):
    lr, betas, eps, wd = 0.01, (0.9, 0.99), 1e-8, 0.1
    net = make_net(num_experts=4, top_k=1)
    opt = RiemannianAdamW(param_groups(net, lr=lr, weight_decay=wd), preconditioner=preconditioner, betas=betas, eps=eps)
    train(net, opt, steps=1)  # five tokens: give most experts a state
    opt.zero_grad()
    backward(net, seed=9, tokens=1)  # one token, top-1: three of four experts get exactly zero gradients
    up = layers(net)[0]
    idle = [e for e in range(4) if up.lora_B.grad[e].abs().sum() == 0]
    assert len(idle) == 3 and all(up.lora_A.grad[e].abs().sum() == 0 for e in idle)
    expected = {}
    for param in (up.lora_A, up.lora_B):
        state = opt.state[param]
        clone = param.detach()[idle].clone().requires_grad_(True)
        torch_opt = torch.optim.AdamW([clone], lr=lr, betas=betas, eps=eps, weight_decay=wd)
        torch_opt.state[clone] = {
            "step": torch.tensor(state["step"]),
            "exp_avg": state["exp_avg"][idle].clone(),
            "exp_avg_sq": state["exp_avg_sq"][idle].clone(),
        }
        clone.grad = torch.zeros_like(clone)
        torch_opt.step()
        expected[param] = (clone.detach(), torch_opt.state[clone]["exp_avg"])
    opt.step()
    for param, (want, want_m) in expected.items():
        torch.testing.assert_close(param.detach()[idle], want, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(opt.state[param]["exp_avg"][idle], want_m, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------- failures and statistics
def test_precondition_batches_mixed_shapes_and_ranks():
    """Plain and 16-wide readings of B (precondition._BLOCK_WIDTH), several ranks, one call: the formula."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 32), (2, 24), (4, 12), (4, 10), (8, 6), (3, 12), (4, 12)]  # (rank, d_out); d_in = 5
    factors, grads, expected = [], [], []
    reg = 1e-3
    for rank, rows in shapes:
        a = torch.randn(3, rank, 5, generator=g, dtype=F64)
        b = torch.randn(3, rows, rank, generator=g, dtype=F64)
        grad_a, grad_b = torch.randn_like(a), torch.randn_like(b)
        eye = torch.eye(rank, dtype=F64)
        factors += [ExpertFactor(a, None, "A", b), ExpertFactor(b, None, "B", a)]
        grads += [grad_a, grad_b]
        expected += [torch.linalg.inv(b.mT @ b + reg * eye) @ grad_a, grad_b @ torch.linalg.inv(a @ a.mT + reg * eye)]
    out = precondition_module.precondition(factors, grads, [reg] * len(factors), [None] * len(factors))
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_damped_inverse_flags_failures():
    systems = torch.stack([2 * torch.eye(3), -torch.eye(3), torch.full((3, 3), float("nan"))]).double()
    inverses, not_pd, non_finite = damped_inverse(systems)
    torch.testing.assert_close(inverses[0], 0.5 * torch.eye(3, dtype=F64))
    assert not_pd.tolist() == [False, True, True] or not_pd.tolist() == [False, True, False]
    assert (not_pd | non_finite).tolist() == [False, True, True]
    assert (inverses[1:] == 0).all()


def test_non_finite_solves_warn_with_counts_and_error_when_all_fail():
    net = make_net(num_experts=4)
    backward(net, seed=6)
    up, down = layers(net)
    with torch.no_grad():
        up.lora_B[1] = float("nan")  # expert 1 of `up`: its A-side system is non-finite
    a_before = up.lora_A.detach().clone()
    opt = RiemannianSGD(param_groups(net, lr=0.01))
    with pytest.warns(PreconditionerWarning, match=r"1 of 16 .*1 on the A side") as record:
        opt.step()
    assert "reg" in str(record[0].message)
    assert torch.equal(up.lora_A[1], a_before[1])  # its preconditioned gradient was zeroed, not replaced
    assert not torch.equal(up.lora_A[0], a_before[0])
    assert torch.isfinite(down.lora_A).all() and torch.isfinite(down.lora_B).all()

    net = make_net(num_experts=4)
    backward(net, seed=6)
    with torch.no_grad():
        for layer in layers(net):
            layer.lora_A.fill_(float("nan"))
            layer.lora_B.fill_(float("inf"))
    heads = net.head.weight.detach().clone()
    with pytest.raises(PreconditionerError, match="every one of the 16"):
        RiemannianSGD(param_groups(net, lr=0.01)).step()
    assert torch.equal(net.head.weight, heads)  # nothing was updated


@pytest.mark.parametrize("preconditioner", ["none", "riemannian", "gate_rescaled"])
def test_gate_statistics_reset_after_every_step(preconditioner):
    net = make_net()
    opt = RiemannianSGD(param_groups(net, lr=0.01), preconditioner=preconditioner)
    backward(net, seed=7)
    assert all(layer.gate_token_count == 5 for layer in layers(net))
    opt.step()
    assert all(layer.gate_token_count == 0 and (layer.gate_sq_sum == 0).all() for layer in layers(net))


def test_gate_rescaled_warns_when_no_statistics_were_recorded():
    net = make_net()
    backward(net, seed=8)
    for layer in layers(net):
        layer.reset_gate_stats()
    with pytest.warns(PreconditionerWarning, match="recorded no token"):
        RiemannianSGD(param_groups(net, lr=0.01), preconditioner="gate_rescaled").step()


def test_gate_statistics_are_all_reduced_for_ddp_replicas(monkeypatch):
    """Replicas (DDP, marked by share_gate_statistics) sum their (sum, count) pairs before c^2 is formed;
    in a multi-process job an unmarked model is an error, never a silent per-replica c^2 or a hang."""
    from moelora.optim import share_gate_statistics

    net, single = make_net(), make_net()
    backward(net, seed=10)
    backward(single, seed=10)
    calls = []

    def all_reduce(tensor, *args, **kwargs):  # a second replica with identical statistics
        calls.append(tensor.numel())
        tensor.mul_(2)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with pytest.raises(RuntimeError, match="share_gate_statistics"):
        RiemannianSGD(param_groups(net, lr=0.01), preconditioner="gate_rescaled").step()
    assert calls == []
    share_gate_statistics(net)
    RiemannianSGD(param_groups(net, lr=0.01), preconditioner="gate_rescaled").step()
    assert calls == [sum(layer.num_experts + 1 for layer in layers(net))]  # one all-reduce for all layers
    alone = make_net()
    backward(alone, seed=10)
    share_gate_statistics(alone, False)  # a model this process trains alone: no collective
    RiemannianSGD(param_groups(alone, lr=0.01), preconditioner="gate_rescaled").step()
    assert len(calls) == 1
    monkeypatch.undo()
    # Doubling both sums and counts leaves every mean unchanged: the same step as a single process.
    RiemannianSGD(param_groups(single, lr=0.01), preconditioner="gate_rescaled").step()
    assert_nets_close(net, single, rel=1e-14)


def test_damped_inverse_counts_failed_factorisations_instead_of_raising():
    from moelora.optim.precondition import damped_inverse

    good = torch.eye(4) * 2.0
    singular = torch.zeros(4, 4)
    singular[0, 0] = 1.0  # positive semi-definite, rank 1: the factorisation fails
    indefinite = -torch.eye(4)
    inverses, not_pd, non_finite = damped_inverse(torch.stack([good, singular, indefinite]))
    assert not_pd.tolist() == [False, True, True] and not non_finite.any()
    torch.testing.assert_close(inverses[0], torch.eye(4) * 0.5)
    assert (inverses[1:] == 0).all()
