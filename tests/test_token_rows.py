"""Padding positions skipped by the adapters (moelora.layers.token_rows): the row kernels against their
PyTorch ops, the layer against its every-row computation, and a padded batch's loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import moelora
from moelora.finetune.loss import CausalLMAnswerLoss
from moelora.layers import kernels, token_rows
from moelora.layers.dropout import DropoutMask, apply_mask
from moelora.layers.linear import MoELoRALinear
from moelora.layers.token_rows import TokenRows, computing_only

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=64)


def _padding_mask() -> torch.Tensor:
    """(3, 9): right padding after 6 and 4 tokens, one full row (19 real positions of 27)."""
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, 4:] = 0
    return mask


def test_rows_of_a_padding_mask():
    rows = TokenRows.from_mask(_padding_mask())
    assert rows is not None and rows.lead_shape == (3, 9)
    assert rows.index.tolist() == [*range(6), *range(9, 13), *range(18, 27)]
    assert TokenRows.from_mask(torch.ones(2, 5, dtype=torch.long)) is None  # nothing to skip
    assert TokenRows.from_mask(torch.zeros(2, 5, dtype=torch.long)) is None  # nothing real: compute all
    assert TokenRows.from_mask(torch.ones(2, 1, 5, 5)) is None  # a 4-d mask is not a padding mask
    assert TokenRows.from_mask(torch.ones(2, 5)) is None  # nor is a float (additive) mask


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("p", [None, 0.3])
def test_gather_and_scatter_add_apply_the_full_arrays_mask_rows(monkeypatch, use_kernels, p):
    if not use_kernels:
        monkeypatch.setattr(kernels, "_load", lambda: None)
    elif not kernels.available():
        pytest.skip("no CPU kernels")
    rows = torch.tensor([0, 2, 3, 7, 10])
    x = torch.randn(11, 37)
    mask = None if p is None else DropoutMask.draw(x.shape, p, "cpu")
    full = x if mask is None else apply_mask(mask, x)  # the mask of the whole array
    assert torch.equal(token_rows.gather(x, rows, mask), full[rows])
    strided = torch.randn(11, 50)[:, :37]  # rows with a stride of their own
    assert torch.equal(token_rows.gather(strided, rows), strided[rows])

    out, src = torch.randn(11, 37), torch.randn(5, 37)
    want = out.clone()
    want[rows] += src if mask is None else src * mask.materialize()[rows]
    version = out._version
    token_rows.scatter_add_(out, rows, src, mask)
    assert torch.equal(out, want)
    assert out._version > version


def _layer(base: nn.Module, dropout: float, expert_compute: str = "dense", rank: int = 2) -> MoELoRALinear:
    torch.manual_seed(0)
    layer = MoELoRALinear(base, num_experts=6, top_k=3, rank=rank, alpha=4.0, dropout=dropout,
                          gate_backward_power=0.5, expert_compute=expert_compute)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _run(layer: MoELoRALinear, x: torch.Tensor, grad: torch.Tensor, rows: TokenRows | None, seed: int):
    """Output, gradients and routing records of one training forward+backward."""
    layer.reset_gate_stats()
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout seed
    with computing_only(rows):
        out = layer(x)
    out.backward(grad)
    grads = [x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad]
    return out.detach(), grads, layer.gate_sq_sum.clone(), layer.gate_token_count.clone()


class _BiasedLinear(nn.Linear):
    """A Linear subclass: the layer calls its forward instead of computing the base map itself."""


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("base_kind", ["fused", "module"])
def test_the_layer_on_real_rows_equals_every_row_with_padding_ignored(monkeypatch, use_kernels, dropout, base_kind):
    if not use_kernels:
        monkeypatch.setattr(kernels, "_load", lambda: None)
    torch.manual_seed(1)
    base = nn.Linear(16, 12) if base_kind == "fused" else _BiasedLinear(16, 12)
    layer = _layer(base, dropout)
    mask = _padding_mask()
    rows = TokenRows.from_mask(mask)
    assert rows is not None
    x, grad = torch.randn(3, 9, 16), torch.randn(3, 9, 12)
    real = mask.bool().unsqueeze(-1)
    grad_real = grad * real  # what reaches the adapters of a decoder: nothing at padding

    out, grads, sq_sum, count = _run(layer, x, grad_real, rows, seed=3)
    want_out, want_grads, want_sq_sum, want_count = _run(layer, x, grad_real, None, seed=3)
    torch.testing.assert_close(out[real.expand_as(out)], want_out[real.expand_as(want_out)], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # padding positions hold the base map's output
        torch.testing.assert_close(out[~mask.bool()], base(x[~mask.bool()]), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert count.item() == int(mask.sum())  # the statistics count real tokens only
    assert want_count.item() == mask.numel()

    # A gradient at padding positions reaches the input through the base map alone.
    _, grads_full, _, _ = _run(layer, x, grad, rows, seed=3)
    torch.testing.assert_close(grads_full[0] - grads[0], (grad * ~real) @ base.weight, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads_full[1:], grads[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_layer_skips_padding_under_bf16_autocast():
    layer = _layer(nn.Linear(16, 12), dropout=0.1)
    mask = _padding_mask()
    rows = TokenRows.from_mask(mask)
    x, grad = torch.randn(3, 9, 16), torch.randn(3, 9, 12) * mask.unsqueeze(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads, _, count = _run(layer, x, grad, rows, seed=4)
        want_out, want_grads, _, _ = _run(layer, x, grad, None, seed=4)
    real = mask.bool()
    torch.testing.assert_close(out[real].float(), want_out[real].float(), rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert count.item() == int(mask.sum())


def test_the_sparse_form_skips_padding():
    torch.manual_seed(2)
    layer = _layer(nn.Linear(16, 12), dropout=0.0, expert_compute="sparse", rank=4)
    mask = _padding_mask()
    rows = TokenRows.from_mask(mask)
    assert layer.uses_sparse(torch.randn(2, 16))
    x, grad = torch.randn(3, 9, 16), torch.randn(3, 9, 12) * mask.unsqueeze(-1)
    out, grads, sq_sum, count = _run(layer, x, grad, rows, seed=0)
    want_out, want_grads, _, _ = _run(layer, x, grad, None, seed=0)
    real = mask.bool()
    torch.testing.assert_close(out[real], want_out[real], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert count.item() == int(mask.sum())


def test_rows_apply_only_to_inputs_of_their_shape_and_in_training():
    layer = _layer(nn.Linear(16, 12), dropout=0.0)
    rows = TokenRows.from_mask(_padding_mask())
    with computing_only(rows):
        layer(torch.randn(2, 9, 16)).sum().backward()  # another batch shape: every row
        assert layer.gate_token_count.item() == 18
        layer.reset_gate_stats()
        with torch.no_grad():
            layer(torch.randn(3, 9, 16))  # no gradients: no records, every row
        assert layer.gate_token_count.item() == 0


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def _padded_batch():
    mask = _padding_mask()
    ids = torch.randint(0, 64, mask.shape, generator=torch.Generator().manual_seed(0))
    labels = torch.full(mask.shape, -100)
    labels[0, 5], labels[1, 3], labels[2, 7:] = 3, 4, 5
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    model.zero_grad(set_to_none=True)
    for _, layer in moelora.moelora_layers(model):
        layer.reset_gate_stats()
    torch.manual_seed(7)  # the dropout seeds
    loss_sum, count = CausalLMAnswerLoss(model)(**batch)
    (loss_sum / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    tokens = next(layer for _, layer in moelora.moelora_layers(model)).gate_token_count.item()
    return loss_sum.detach(), grads, tokens


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_padded_batch_has_the_same_loss_and_gradients_with_padding_skipped(dropout):
    base = _tiny_llama()
    models = {}
    for skip in (True, False):
        model = moelora.wrap(copy.deepcopy(base), moelora.MoELoRAConfig(dropout=dropout, skip_padding=skip))
        for _, layer in moelora.moelora_layers(model):
            with torch.no_grad():
                layer.lora_B.normal_(std=0.1)
        models[skip] = model.train()
    models[False].load_state_dict(models[True].state_dict())
    assert token_rows.installed(models[True].get_decoder()) and not token_rows.installed(models[False].get_decoder())
    batch = _padded_batch()
    loss, grads, tokens = _loss_and_grads(models[True], batch)
    want_loss, want_grads, want_tokens = _loss_and_grads(models[False], batch)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == want_grads.keys() and len(grads) == 4 * 2 * 3  # q/k/v/o of 2 layers: A, B, router
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert (tokens, want_tokens) == (int(batch["attention_mask"].sum()), batch["attention_mask"].numel())


def test_padding_is_not_skipped_under_activation_checkpointing_or_after_unwrap():
    model = moelora.wrap(_tiny_llama(), moelora.MoELoRAConfig(dropout=0.1)).train()
    batch = _padded_batch()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    _, grads, tokens = _loss_and_grads(model, batch)
    assert tokens == 2 * batch["attention_mask"].numel() and grads  # every row, in the forward and its recompute
    model.activation_checkpointing_disable()
    assert _loss_and_grads(model, batch)[2] == int(batch["attention_mask"].sum())
    moelora.unwrap(model)
    assert not token_rows.installed(model.get_decoder())


def test_only_listed_decoders_are_hooked():
    model = _tiny_llama()
    model.config.model_type = "mamba"  # a recurrent mixer carries padding into real positions
    moelora.wrap(model, moelora.MoELoRAConfig())
    assert not token_rows.installed(model.get_decoder())
    plain = moelora.wrap(nn.Sequential(nn.Linear(8, 8)), moelora.MoELoRAConfig(target_modules=["0"]))
    assert not token_rows.installed(plain)


def test_skip_padding_must_be_a_bool():
    with pytest.raises(moelora.ConfigError, match="skip_padding"):
        moelora.MoELoRAConfig(skip_padding="yes")  # type: ignore[arg-type]
    assert moelora.MoELoRAConfig.from_dict(moelora.MoELoRAConfig(skip_padding=False).to_dict()).skip_padding is False


def test_a_vision_language_model_skips_the_language_models_padding_only():
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    from moelora.finetune.vision import random_llava

    base, processor = random_llava()
    targets = r".*(q_proj|k_proj|v_proj|o_proj|fc1|fc2)"  # both towers
    models = {skip: moelora.wrap(copy.deepcopy(base), moelora.MoELoRAConfig(target_modules=targets, dropout=0.1,
                                                                            skip_padding=skip)).train()
              for skip in (True, False)}
    for _, layer in moelora.moelora_layers(models[True]):
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
    models[False].load_state_dict(models[True].state_dict())
    image = Image.fromarray((np.random.RandomState(0).rand(28, 28, 3) * 255).astype("uint8"))
    batch = processor(text=["<image> hi there friend", "<image> a b"], images=[image, image], return_tensors="pt",
                      padding=True)
    assert not batch["attention_mask"].all()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    results = {}
    for skip, model in models.items():
        torch.manual_seed(3)
        model(**batch, labels=labels).loss.backward()
        counts = {name: layer.gate_token_count.item() for name, layer in moelora.moelora_layers(model)}
        results[skip] = ({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, counts)
    grads, counts = results[True]
    for name, want in results[False][0].items():
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-6, msg=name)
    real, positions = int(batch["attention_mask"].sum()), batch["attention_mask"].numel()
    for name, count in counts.items():  # the vision tower's patches all count; the text's padding does not
        want_count = results[False][1][name] if "vision_tower" in name else real
        assert count == want_count, name
    assert any(results[False][1][n] == positions for n in counts if "language_model" in n)
