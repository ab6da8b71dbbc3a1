"""The MoE-LoRA layer: a frozen linear map plus a routed mixture of low-rank experts.

    y = W x + s * sum_i g_i(x) B_i A_i drop(x)            s = alpha / r

computed in the dense stacked form, one autograd Function for the whole training path
(``moelora.layers.dense.DenseMoELoRA``, which applies the backward gate power ``p`` of the paper's
engineering strategy), in the sparse form for few active experts per token (``moelora.layers.sparse``),
or, in eval mode without gradients, on the inference path (``moelora.layers.inference``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from typing import Any

import torch
from torch import nn

from ..config import EXPERT_COMPUTE
from ..errors import ConfigError
from .dense import DenseMoELoRA, MixSpec
from .dropout import DropoutMask, apply_mask, draw_mask, keep_probability
from .inference import SPARSE_GATHER_TOKENS, inference_forward, is_plain_linear, sparse_inference_forward
from .routing import init_router_, record_statistics_, routing_statistics, top_k_routing
from .sparse import sparse_expert_output, sparse_is_cheaper, sparse_shape_problem, sparse_supported
from .token_rows import current_rows

# Every MoE-LoRA layer alive in this process. The optimizers find which layer owns a parameter, and whether
# it is that layer's A or B, by reading the layers' current attributes (``parameter_owners``): a binding
# by structure that survives whatever replaces Parameter objects (FSDP2's DTensors,
# ``load_state_dict(assign=True)``, ``.to()``, a deep copy), unlike an attribute set on the Parameter.
_LIVE_LAYERS: weakref.WeakSet[MoELoRALinear] = weakref.WeakSet()

SIDE_A, SIDE_B, SIDE_ROUTER = "A", "B", "router"


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear-like module, or a ``TypeError`` saying what is supported."""
    if _is_conv1d(module):
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        d_in, d_out = weight.shape
        return int(d_in), int(d_out)
    features = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(features[0], int) and isinstance(features[1], int):
        return features[0], features[1]
    raise TypeError(
        f"MoELoRALinear wraps nn.Linear-like modules (with in_features / out_features) and transformers' "
        f"Conv1D, not {type(module).__name__}"
    )


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2-style Conv1D: weight is (d_in, d_out), y = x @ W + b.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _module_device(module: nn.Module) -> torch.device | None:
    """The device of a module's first parameter or buffer (a quantised linear may have no ``weight``)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device if tensor.device.type != "meta" else None
    return None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``device_type``, or None when autocast is off there."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def default_adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters train in float32 (float64 beside a float64 base), whatever the base precision."""
    weight = getattr(base, "weight", None)
    if weight is not None and weight.dtype == torch.float64:
        return torch.float64
    return torch.float32


class MoELoRALinear(nn.Module):
    """A frozen linear module with a mixture of ``num_experts`` rank-``rank`` LoRA experts.

    Attributes:
        base_layer: the wrapped module (``nn.Linear`` or transformers' ``Conv1D``), frozen.
        lora_A: ``(E, r, d_in)`` expert down-projections, Kaiming-uniform (``a = sqrt(5)``) per expert.
        lora_B: ``(E, d_out, r)`` expert up-projections, zero at init (the layer starts as ``base_layer``).
        router: ``nn.Linear(d_in, E, bias=False)``.
        scaling: ``alpha / rank``.
        dropout: dropout probability on the experts' input (``moelora.layers.dropout``); the router reads ``x``.
        expert_compute: ``"dense"``, ``"sparse"`` (only the selected pairs, ``moelora.layers.sparse``) or ``"auto"``.
        gate_sq_sum: ``(E,)`` float32 running ``sum_t g_it^2`` over training forwards since the last reset.
        gate_token_count: ``()`` float32 number of tokens in that sum.
        expert_load / gate_entropy: router diagnostics of the last forward pass (see ``moelora.layers.routing``).

    The gate statistics are recorded only when ``self.training and torch.is_grad_enabled()``, over the
    rows the layer computes: every position, or a padded batch's real tokens only while its decoder runs
    with an ``attention_mask`` (``moelora.layers.token_rows``). An optimizer with
    ``preconditioner="gate_rescaled"`` consumes and resets them after each step.
    """

    # Buffers (registered in __init__), declared for type checkers: nn.Module's attribute lookup is untyped.
    gate_sq_sum: torch.Tensor
    gate_token_count: torch.Tensor
    expert_load: torch.Tensor
    gate_entropy: torch.Tensor

    def __init__(
        self,
        base_layer: nn.Module,
        num_experts: int,
        top_k: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        gate_backward_power: float = 1.0,
        router_init: str = "kaiming",
        router_init_std: float = 0.02,
        track_router_stats: bool = True,
        dtype: torch.dtype | None = None,
        expert_compute: str = "auto",
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must satisfy 1 <= top_k <= num_experts (= {num_experts}), got {top_k}")
        if not 0.0 <= gate_backward_power <= 1.0:
            raise ValueError(f"gate_backward_power must be in [0, 1], got {gate_backward_power}")
        self.base_layer = base_layer
        self.in_features, self.out_features = _linear_shape(base_layer)
        self.num_experts = num_experts
        self.top_k = top_k
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.gate_backward_power = float(gate_backward_power)
        self.track_router_stats = track_router_stats
        self.adapter_enabled = True  # False: the base module alone (moelora.disable_adapter)
        # Eval mode without gradients takes the inference path (moelora.layers.inference); False: always the
        # training path (for comparisons). Its (key, W_cat, B_cat^T) cache is rebuilt when stale.
        self.inference_path = True
        self._inference_cache: tuple | None = None
        # Whether the optimizer sums the gate statistics over the default process group (DDP replicas);
        # None: not said (an error for gate_rescaled in a multi-process job). Set by share_gate_statistics.
        self.share_gate_stats: bool | None = None
        if expert_compute not in EXPERT_COMPUTE:
            raise ConfigError(f"expert_compute must be one of {EXPERT_COMPUTE}, got {expert_compute!r}")
        if expert_compute == "sparse":
            problem = sparse_shape_problem(rank, self.in_features, self.out_features)
            if problem is not None:
                raise ConfigError(f"expert_compute='sparse' cannot run: {problem}; use 'auto' or 'dense'")
        self.expert_compute = expert_compute

        device = _module_device(base_layer)
        dtype = dtype or default_adapter_dtype(base_layer)
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, rank, device=device, dtype=dtype))
        self.router = nn.Linear(self.in_features, num_experts, bias=False, device=device, dtype=dtype)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)  # on the experts' input only; see moelora.layers.dropout

        for name, shape in (("gate_sq_sum", (num_experts,)), ("gate_token_count", ()),
                            ("expert_load", (num_experts,)), ("gate_entropy", ())):
            self.register_buffer(name, torch.zeros(shape, device=device, dtype=torch.float32), persistent=False)

        self.reset_parameters(router_init, router_init_std)
        _LIVE_LAYERS.add(self)

    # ----------------------------------------------------------------------------------------- set-up
    def reset_parameters(self, router_init: str = "kaiming", router_init_std: float = 0.02) -> None:
        """LoRA init per expert: ``A_i`` Kaiming-uniform with ``a = sqrt(5)``, ``B_i = 0``."""
        with torch.no_grad():
            # kaiming_uniform_(a=sqrt(5)) of an (r, d_in) matrix is uniform(+-1/sqrt(d_in)); the stacked
            # (E, r, d_in) tensor would get the wrong fan-in from kaiming_uniform_ itself.
            bound = 1.0 / math.sqrt(self.in_features)
            self.lora_A.uniform_(-bound, bound)
            self.lora_B.zero_()
        init_router_(self.router.weight, router_init, router_init_std)

    def train(self, mode: bool = True) -> MoELoRALinear:
        self.clear_inference_cache()  # a mode change drops the inference path's derived weights
        return super().train(mode)

    def clear_inference_cache(self) -> None:
        """Drop the inference path's fused weights (rebuilt on the next eval-mode forward)."""
        self._inference_cache = None

    def __setstate__(self, state: dict) -> None:
        # Unpickling and copy.deepcopy build the layer without __init__: register the new one too.
        super().__setstate__(state)
        self.__dict__.setdefault("adapter_enabled", True)  # layers pickled before these attributes existed
        self.__dict__.setdefault("_inference_cache", None)
        self.__dict__.setdefault("inference_path", True)
        _LIVE_LAYERS.add(self)

    # ---------------------------------------------------------------------------------------- compute
    def _record_routing(self, stats: torch.Tensor, tokens: int) -> None:
        """Gate statistics and diagnostics from a forward pass's ``routing_statistics``."""
        record, track, buffers = self.training and torch.is_grad_enabled(), self.track_router_stats, self._buffers
        record_statistics_(stats, tokens, buffers["gate_sq_sum"] if record else None,
                           buffers["gate_token_count"] if record else None,
                           buffers["expert_load"] if track else None, buffers["gate_entropy"] if track else None)

    def uses_sparse(self, tokens: torch.Tensor | None = None) -> bool:
        """Whether a forward pass on ``tokens`` computes only the selected experts (``moelora.layers.sparse``)."""
        if self.expert_compute == "dense":
            return False
        # Under torch.compile "auto" stays dense: the sparse form's data-dependent block sizes break graphs.
        # The integer rule goes first, so the usual dense layer does no more work per forward pass.
        if self.expert_compute == "auto" and (not sparse_is_cheaper(self.num_experts, self.top_k, self.rank)
                                              or torch.compiler.is_compiling()):
            return False
        device = tokens.device if tokens is not None else self.lora_A.device
        reason = sparse_supported(self.lora_A.dtype, device, self.rank, self.in_features, self.out_features)
        if self.expert_compute == "sparse" and reason is not None:
            raise ConfigError(f"expert_compute='sparse' cannot run: {reason}; use 'auto' or 'dense'")
        return reason is None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base_layer(x, *args, **kwargs)
        if self.inference_path and not self.training and not torch.is_grad_enabled():  # eval, no_grad: generation
            if not self.uses_sparse(x):
                return inference_forward(self, x, args, kwargs, autocast_dtype(x.device.type))
            if x.numel() <= SPARSE_GATHER_TOKENS * self.in_features:
                return sparse_inference_forward(self, x, args, kwargs)
        lead_shape = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features)
        # In training, a padded batch's real rows only (moelora.layers.token_rows); None: every row.
        rows = current_rows(lead_shape, x.device) if self.training and torch.is_grad_enabled() else None
        sparse = self.uses_sparse(tokens)
        mask: DropoutMask | torch.Tensor | None = None
        scaling = self.scaling
        if self.training and self.dropout > 0:
            # The dense form reads the full mask's rows; the sparse form gathers its rows first.
            shape = tokens.shape if rows is None or not sparse else (rows.shape[0], self.in_features)
            mask = draw_mask(shape, self.dropout, tokens.device)
            scaling = self.scaling / keep_probability(self.dropout, tokens.device)  # drop(x) = x * m / q
        if sparse:
            out = self._forward_sparse(x, tokens, mask, scaling, args, kwargs, rows)
        else:
            out = self._forward_dense(x, tokens, mask, scaling, args, kwargs, rows)
        return out.view(*lead_shape, self.out_features)

    def _forward_dense(self, x: torch.Tensor, tokens: torch.Tensor, mask: DropoutMask | torch.Tensor | None,
                       scaling: float, args: tuple, kwargs: dict, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Every expert on every token (``DenseMoELoRA``), ``(T, d_out)``.

        Under ``torch.autocast`` the experts compute in the autocast dtype with every operand cast
        explicitly (autocast does not cast inside autograd Functions), while the parameters, and so their
        gradients, stay in their own (float32) dtype. The router stays in the adapter's dtype, as
        mixture-of-experts models usually keep it: bf16 logits would flip the top-k choice of near-tied
        experts (at E=20, top_k=10 that moved the expert gradients by 4 %).
        """
        compute = autocast_dtype(tokens.device.type)
        fused = not args and not kwargs and self._base_is_fusable(tokens, compute)
        base_out = None
        if not fused:  # the base module's own forward, under the caller's autocast state
            base_out = self.base_layer(x, *args, **kwargs).reshape(-1, self.out_features)
        dtype = compute or self.lora_A.dtype
        router = self.router.weight
        with torch.autocast(tokens.device.type, enabled=False) if compute is not None else contextlib.nullcontext():
            router_input = tokens.to(router.dtype) if router.dtype != dtype else None
            weight = bias = None
            if fused:
                assert isinstance(self.base_layer, nn.Linear)
                weight, bias = self.base_layer.weight, self.base_layer.bias
            # The experts' output goes into the base output inside a GEMM when the dtypes agree.
            into_base = base_out if base_out is not None and base_out.dtype == dtype else None
            inputs = tokens if tokens.dtype == dtype else tokens.to(dtype)
            out, stats = DenseMoELoRA.apply(inputs, weight, bias, self.lora_A, router, self.lora_B, router_input,
                                            into_base, mask, MixSpec(scaling, self.gate_backward_power, self.top_k),
                                            rows)
        self._record_routing(stats, tokens.shape[0] if rows is None else rows.shape[0])
        if base_out is not None and into_base is None:
            return base_out + out.to(base_out.dtype)
        return out

    def _forward_sparse(self, x: torch.Tensor, tokens: torch.Tensor, mask: DropoutMask | torch.Tensor | None,
                        scaling: float, args: tuple, kwargs: dict, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The same function as the dense path, computing only the ``T * top_k`` selected pairs (of the
        ``rows`` only, when given; ``mask`` is then over those rows).

        The grouped GEMMs run in the adapter's dtype (float32), also under autocast.
        """
        result = self.base_layer(x, *args, **kwargs).reshape(-1, self.out_features)
        compute = autocast_dtype(tokens.device.type)
        with torch.autocast(tokens.device.type, enabled=False) if compute is not None else contextlib.nullcontext():
            adapter_in = tokens.to(self.lora_A.dtype)
            if rows is not None:
                adapter_in = adapter_in.index_select(0, rows)
            logits = adapter_in @ self.router.weight.t()  # the router sees the input without dropout
            weights, index = top_k_routing(logits, self.top_k)
            self._record_routing(routing_statistics(weights.detach(), index, self.num_experts), adapter_in.shape[0])
            expert_in = adapter_in if mask is None else apply_mask(mask, adapter_in)
            outputs, token_of = sparse_expert_output(expert_in, weights, index, self.lora_A, self.lora_B, scaling,
                                                     self.gate_backward_power)
        return result.index_add(0, token_of if rows is None else rows[token_of], outputs.to(result.dtype))

    def _base_is_fusable(self, tokens: torch.Tensor, compute: torch.dtype | None = None) -> bool:
        """Whether ``DenseMoELoRA`` may compute the base map itself: a plain ``nn.Linear`` (no subclass,
        hook or patched ``forward``, which could change what it computes) with a plain floating-point weight
        (not a quantised tensor subclass), of the adapter's dtype (any float dtype under autocast, where
        every operand is cast to the autocast dtype)."""
        base = self.base_layer
        if not is_plain_linear(base):
            return False
        assert isinstance(base, nn.Linear)
        weight = base.weight
        if type(weight) not in (torch.Tensor, nn.Parameter) or not weight.dtype.is_floating_point:
            return False
        return compute is not None or tokens.dtype == weight.dtype == self.lora_A.dtype

    # ------------------------------------------------------------------------------------ statistics
    def gate_sq_mean(self) -> torch.Tensor:
        """``(E,)`` mean of ``g^2`` over the tokens recorded since the last reset (0 if none)."""
        return self.gate_sq_sum / self.gate_token_count.clamp_min(1.0)

    def reset_gate_stats(self) -> None:
        self.gate_sq_sum.zero_()
        self.gate_token_count.zero_()

    def adapter_params(self) -> list[str]:
        """The names (below this module) of the trained parameters: the experts and the router. This is
        torchtune's adapter protocol, so its ``get_adapter_params`` / ``set_trainable_params`` find them."""
        return ["lora_A", "lora_B", "router.weight"]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"gate_backward_power={self.gate_backward_power:g}, expert_compute={self.expert_compute!r}"
        )


def parameter_owners() -> dict[int, tuple[MoELoRALinear, str]]:
    """``{id(parameter): (layer, side)}`` for the current ``lora_A`` (side ``"A"``), ``lora_B`` (``"B"``) and
    router weight (``"router"``) of every live ``MoELoRALinear``, read from the layers' attributes now."""
    owners: dict[int, tuple[MoELoRALinear, str]] = {}
    for layer in list(_LIVE_LAYERS):
        for side, param in ((SIDE_A, layer.lora_A), (SIDE_B, layer.lora_B), (SIDE_ROUTER, layer.router.weight)):
            owners[id(param)] = (layer, side)
    return owners


def layer_of(param: torch.Tensor) -> MoELoRALinear | None:
    """The live ``MoELoRALinear`` whose ``lora_A``, ``lora_B`` or router weight is ``param`` now, else None."""
    owner = parameter_owners().get(id(param))
    return owner[0] if owner is not None else None
