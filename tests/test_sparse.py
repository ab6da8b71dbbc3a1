"""The sparse (grouped) expert path against the dense one: same function, same gradients."""

import copy

import pytest
import torch
from torch import nn

import moelora
from moelora import ConfigError, MoELoRAConfig, MoELoRALinear
from moelora.layers.sparse import sort_pairs, sparse_is_cheaper
from reference import reference_forward


def make_pair(num_experts=16, top_k=2, rank=4, d_in=12, d_out=8, power=1.0, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    dense = MoELoRALinear(nn.Linear(d_in, d_out), num_experts, top_k, rank, 6.0, dropout=dropout,
                          gate_backward_power=power, expert_compute="dense")
    with torch.no_grad():
        dense.lora_B.normal_(0.0, 0.5)
        dense.router.weight.normal_(0.0, 1.0)
    sparse = copy.deepcopy(dense)
    sparse.expert_compute = "sparse"
    return dense, sparse


def run(layer, x, upstream, seed=5):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = layer(x)
    (out * upstream).sum().backward()
    return [out.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad]


def assert_close(got, want, rel=1e-5, atol=1e-7):
    # atol: with top_k = 1 every gate is exactly 1 and the router gradient exactly 0 in the definition,
    # which the float32 reference reproduces only to ~1e-8.
    scale = want.abs().max()
    assert (got - want).abs().max() <= rel * scale + atol


@pytest.mark.parametrize("power", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_sparse_matches_dense_forward_and_gradients(power, dropout):
    dense, sparse = make_pair(power=power, dropout=dropout)
    assert sparse.uses_sparse() and not dense.uses_sparse()
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(2))
    for got, want in zip(run(sparse, x, upstream), run(dense, x, upstream)):
        assert got.shape == want.shape
        assert_close(got, want)
    # The same gates, summed in another order (the dense form's CPU kernel adds them up in float64).
    torch.testing.assert_close(sparse.gate_sq_sum, dense.gate_sq_sum, rtol=1e-6, atol=0)
    torch.testing.assert_close(sparse.expert_load, dense.expert_load, rtol=1e-6, atol=0)
    assert torch.allclose(sparse.gate_entropy, dense.gate_entropy)


def test_sparse_matches_the_per_expert_reference_with_empty_experts():
    """Few tokens, top-1 of 16 experts: most experts get no token and must get zero gradients."""
    _, sparse = make_pair(top_k=1, power=0.5)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    upstream = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    out, gx, ga, gb, gr = run(sparse, x, upstream)
    xr = x.clone().requires_grad_(True)
    A, B, R = (t.detach().clone().requires_grad_(True) for t in (sparse.lora_A, sparse.lora_B, sparse.router.weight))
    base = sparse.base_layer
    ref = reference_forward(xr, base.weight, base.bias, A, B, R, 1, sparse.scaling, 0.5)
    (ref * upstream).sum().backward()
    for got, want in [(out, ref.detach()), (gx, xr.grad), (ga, A.grad), (gb, B.grad), (gr, R.grad)]:
        assert_close(got, want)
    unused = sparse.expert_load == 0
    assert unused.sum() >= 11 and (gb[unused] == 0).all() and (ga[unused] == 0).all()


def test_pairs_are_sorted_by_expert_with_block_offsets():
    index = torch.tensor([[3, 0], [0, 2], [3, 1]])
    order, token_of, offsets = sort_pairs(index, num_experts=5)
    experts = index.reshape(-1)[order]
    assert experts.tolist() == [0, 0, 1, 2, 3, 3]
    assert token_of.tolist() == [0, 1, 2, 1, 0, 2]
    assert offsets.tolist() == [2, 3, 4, 6, 6]


def test_auto_picks_sparse_only_where_it_is_cheaper_and_supported():
    assert sparse_is_cheaper(64, 2, 4) and not sparse_is_cheaper(20, 10, 4)
    base = nn.Linear(16, 16)
    assert MoELoRALinear(base, 64, 2, 4, 8.0).uses_sparse()
    assert not MoELoRALinear(base, 20, 10, 4, 8.0).uses_sparse()
    double = MoELoRALinear(base.double(), 64, 2, 4, 8.0, dtype=torch.float64)
    assert not double.uses_sparse()  # grouped GEMMs take float32 on CPU: auto falls back to dense
    double.expert_compute = "sparse"
    with pytest.raises(ConfigError, match="float32"):
        double(torch.randn(2, 16, dtype=torch.float64))
    # shapes the grouped GEMMs cannot take are refused when the layer (or the config) is built
    with pytest.raises(ConfigError, match="d_in must be multiples of 4"):
        MoELoRALinear(nn.Linear(15, 16), 64, 2, 4, 8.0, expert_compute="sparse")
    with pytest.raises(ConfigError, match="rank must be multiples of 4"):
        MoELoRAConfig(num_experts=4, top_k=2, rank=2, expert_compute="sparse")
    with pytest.raises(ValueError, match="expert_compute"):
        MoELoRALinear(base, 4, 2, 4, 8.0, expert_compute="fast")


def test_config_carries_expert_compute_to_every_layer():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    config = moelora.MoELoRAConfig(num_experts=32, top_k=2, rank=4, target_modules=["0", "2"],
                                   expert_compute="dense")
    moelora.wrap(model, config)
    assert {m.expert_compute for m in model.modules() if isinstance(m, MoELoRALinear)} == {"dense"}
    assert moelora.MoELoRAConfig.from_dict(config.to_dict()).expert_compute == "dense"
    with pytest.raises(ValueError, match="expert_compute"):
        moelora.MoELoRAConfig(expert_compute="grouped")


def test_auto_compiles_with_the_dense_form():
    _, layer = make_pair(num_experts=32)
    layer.expert_compute = "auto"
    x = torch.randn(6, 12)
    assert layer.uses_sparse(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), layer(x))
