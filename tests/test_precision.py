"""Mixed precision: every layer path under bf16 autocast, against the same computation in float32.

bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2 %); a forward and backward pass of a few
GEMMs accumulates a few of those, so outputs and gradients are compared at a relative (Frobenius) error
of 2e-2 (measured: at most 6e-3) — far below the 100 % a wrong or missing term gives.
"""

import pytest
import torch
from torch import nn

from moelora import MoELoRALinear

TOLERANCE = 2e-2


class SubclassedLinear(nn.Linear):
    """A base the layer must not fuse (a subclass may compute something else): its own forward runs."""


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.detach().float(), reference.detach().float()
    return float((ours - reference).norm() / reference.norm().clamp_min(1e-12))


def run(layer: MoELoRALinear, x: torch.Tensor, seed: int, autocast: bool):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    grad_out = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out.float() * grad_out).sum().backward()
    return out, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad


@pytest.mark.parametrize("compute", ["dense", "sparse"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("power", [0.5, 1.0])
def test_every_layer_path_under_bf16_autocast_matches_float32(compute, fused, dropout, power):
    torch.manual_seed(0)
    base = (nn.Linear if fused else SubclassedLinear)(32, 24)
    layer = MoELoRALinear(base, num_experts=8, top_k=2, rank=4, alpha=8.0, dropout=dropout,
                          gate_backward_power=power, expert_compute=compute)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)  # B = 0 at init would leave dA and the router gradient at zero
    layer.train()
    x = torch.randn(3, 7, 32)
    assert layer._base_is_fusable(x.reshape(-1, 32), torch.bfloat16) == fused
    reference = run(layer, x, seed=1, autocast=False)
    ours = run(layer, x, seed=1, autocast=True)
    assert ours[0].dtype == torch.bfloat16  # as nn.Linear's output under autocast
    for name, a, b in zip(("output", "dx", "dA", "dB", "dR"), ours, reference):
        assert a is not None and b is not None, name
        assert b.float().abs().sum() > 0, name
        assert relative_error(a, b) < TOLERANCE, (name, relative_error(a, b))
    # the parameters and their gradients stay in float32 (the master weights)
    assert {p.dtype for p in layer.parameters() if p.requires_grad} == {torch.float32}
    assert {ours[i].dtype for i in (2, 3, 4)} == {torch.float32}


def test_autocast_off_inside_the_model_is_unchanged():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 16), 4, 2, 4, 8.0)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        inside = layer(x)
    assert inside.dtype == torch.float32 and torch.equal(inside, layer(x))
