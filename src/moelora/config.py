"""Configuration of a MoE-LoRA adapter, and the choice types used across the package.

Every option with a fixed set of values is a ``Literal`` type defined here once; the tuples of valid
values (``ROUTER_INITS`` ...) are derived from them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .errors import ConfigError

RouterInit = Literal["kaiming", "zeros", "normal"]
ExpertCompute = Literal["auto", "dense", "sparse"]
# How the experts' gradients are preconditioned (method.md section 4); "none" is plain SGD / AdamW.
Preconditioner = Literal["none", "riemannian", "gate_rescaled"]
# The base update the preconditioned gradient feeds.
OptimizerName = Literal["adamw", "sgd"]

ROUTER_INITS: tuple[str, ...] = get_args(RouterInit)
EXPERT_COMPUTE: tuple[str, ...] = get_args(ExpertCompute)
PRECONDITIONERS: tuple[str, ...] = get_args(Preconditioner)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class MoELoRAConfig:
    """Hyper-parameters of a mixture of LoRA experts.

    Each adapted linear map ``W`` (``d_out x d_in``) becomes

        y = W x + (alpha / rank) * sum_i g_i(x) * B_i A_i dropout(x)

    with ``num_experts`` experts ``A_i`` (``rank x d_in``), ``B_i`` (``d_out x rank``) and a top-k softmax
    router ``g(x)``.

    Raises ``moelora.ConfigError`` (a ``ValueError``) on a bad value.

    Attributes:
        num_experts: experts per adapted module (``E``).
        top_k: experts kept per token; the kept softmax probabilities are renormalised to sum to 1.
        rank: rank ``r`` of every expert.
        alpha: LoRA scaling numerator; the adapter output is multiplied by ``alpha / rank``.
        dropout: dropout probability on the experts' input (the router sees the input without dropout).
        target_modules: module names to adapt. A list matches a module whose full name equals an entry or
            ends with ``"." + entry``; a string is a regular expression that must match the full name.
        gate_backward_power: ``p`` in the backward pass; expert gradients are scaled by ``g**p`` instead of
            ``g``. 1.0 is the plain gradient, 0.5 is the paper's engineering strategy. The forward value
            never changes.
        router_init: ``"kaiming"`` (PyTorch's default ``nn.Linear`` init, as in the paper's code),
            ``"zeros"`` (uniform routing at the start) or ``"normal"`` (std ``router_init_std``).
        router_init_std: standard deviation for ``router_init="normal"``.
        exclude_modules: module names (same matching rule as a list ``target_modules``) never adapted.
        track_router_stats: keep per-layer expert load and gate entropy of the last forward pass.
        expert_compute: how the experts are computed (the function and its gradients are the same).
            ``"dense"`` computes every expert on every token (two GEMMs of rank ``E * r``), ``"sparse"``
            only the ``top_k`` selected experts per token (grouped GEMMs, float32 on CPU), ``"auto"``
            picks sparse where it runs and is cheaper (``E * r >= 64 * top_k``; see
            ``moelora.layers.sparse``).
        modules_to_save: other modules to train and to store in the adapter file beside the experts (a
            new classification head, an embedding), matched as a list ``target_modules`` is. They stay
            where they are in the model (trained in place) and ``load_adapter`` restores them.
        skip_padding: in training, compute the experts and the router on a padded batch's real tokens only
            (the ``attention_mask`` given to the model's decoder; ``moelora.layers.token_rows``). The loss and
            every gradient are unchanged, the routing statistics count real tokens only. Applies to
            decoders of the model types in ``moelora.layers.token_rows.SKIPS_PADDING_MODEL_TYPES``, whose
            padding positions cannot reach real ones, and not under activation checkpointing.
    """

    num_experts: int = 20
    top_k: int = 10
    rank: int = 4
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    gate_backward_power: float = 1.0
    router_init: RouterInit = "kaiming"
    router_init_std: float = 0.02
    exclude_modules: list[str] = field(default_factory=list)
    track_router_stats: bool = True
    expert_compute: ExpertCompute = "auto"
    modules_to_save: list[str] = field(default_factory=list)
    skip_padding: bool = True

    def __post_init__(self) -> None:
        _check_int_range("num_experts", self.num_experts, 1)
        _check_int_range("rank", self.rank, 1)
        _check_int_range("top_k", self.top_k, 1, self.num_experts, "num_experts")
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a number > 0, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not _is_number(self.gate_backward_power) or not 0 <= self.gate_backward_power <= 1:
            raise ConfigError(
                f"gate_backward_power must be in [0, 1] (1.0 = plain gradient, 0.5 = the paper's "
                f"engineering strategy), got {self.gate_backward_power!r}"
            )
        if self.expert_compute not in EXPERT_COMPUTE:
            raise ConfigError(f"expert_compute must be one of {EXPERT_COMPUTE}, got {self.expert_compute!r}")
        if self.expert_compute == "sparse":
            from .layers.sparse import sparse_shape_problem  # the layers import this module

            problem = sparse_shape_problem(self.rank)
            if problem is not None:
                raise ConfigError(f"expert_compute='sparse' cannot run: {problem}; use 'auto' or 'dense'")
        if self.router_init not in ROUTER_INITS:
            raise ConfigError(f"router_init must be one of {ROUTER_INITS}, got {self.router_init!r}")
        if not _is_number(self.router_init_std) or not math.isfinite(self.router_init_std) or self.router_init_std <= 0:
            raise ConfigError(f"router_init_std must be a number > 0, got {self.router_init_std!r}")
        self.target_modules = _normalise_targets("target_modules", self.target_modules, allow_regex=True)
        self.exclude_modules = _normalise_targets("exclude_modules", self.exclude_modules, allow_empty=True)
        self.modules_to_save = _normalise_targets("modules_to_save", self.modules_to_save, allow_empty=True)
        if not isinstance(self.skip_padding, bool):
            raise ConfigError(f"skip_padding must be true or false, got {self.skip_padding!r}")
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        self.gate_backward_power = float(self.gate_backward_power)

    @property
    def scaling(self) -> float:
        """The LoRA output scale ``alpha / rank``."""
        return self.alpha / self.rank

    def saves(self, name: str) -> bool:
        """Whether the module called ``name`` is one of ``modules_to_save``."""
        return _name_matches(name, self.modules_to_save)

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` (its full dotted name) is a target."""
        if _name_matches(name, self.exclude_modules):
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return _name_matches(name, self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoELoRAConfig:
        """Build a config from a mapping; unknown keys are an error that lists the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"unknown MoELoRAConfig key(s) {unknown}; valid keys are {sorted(valid)}")
        return cls(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int_range(name: str, value: Any, low: int, high: int | None = None, high_name: str = "") -> None:
    accepted = f"{low} <= {name}" + (f" <= {high_name} (= {high})" if high is not None else "")
    if not _is_int(value):
        raise ConfigError(f"{name} must be an integer with {accepted}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{name} must satisfy {accepted}, got {value}")


def _normalise_targets(name: str, value: Any, allow_regex: bool = False, allow_empty: bool = False):
    if isinstance(value, str):
        if not allow_regex:
            return [value]
        if not value:
            raise ConfigError(f"{name} must not be empty: give module names such as ['q_proj', 'v_proj'] or a regex")
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(f"{name} is not a valid regular expression ({err}): {value!r}") from None
        return value
    try:
        names = list(value)
    except TypeError:
        raise ConfigError(f"{name} must be a list of module names or a regex string, got {value!r}") from None
    if not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{name} must contain non-empty strings, got {names!r}")
    if not names and not allow_empty:
        raise ConfigError(f"{name} must not be empty: give module names such as ['q_proj', 'v_proj'] or a regex")
    return names


def _name_matches(name: str, names: list[str]) -> bool:
    return any(name == n or name.endswith("." + n) for n in names)
