"""The model card (``README.md``) of an adapter folder: what it is, what it was trained on, how to load it."""

from __future__ import annotations

import json
from typing import Any


def _yaml_value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and lists are valid YAML flow values


def model_card(meta: dict[str, Any], training: dict[str, Any] | None = None) -> str:
    """Markdown with a YAML header (``library_name``, ``base_model``, ``tags``) from an adapter's metadata
    (``adapter_config.json``) and, when known, its training: ``{"data": ..., "metrics": {...}, ...}``."""
    config, base = meta["config"], meta.get("base_model", {})
    name = base.get("name_or_path")
    header = ["---", "library_name: moelora"]
    if name:
        header.append(f"base_model: {_yaml_value(name)}")
    header += ["tags: [moelora, moe-lora, lora, mixture-of-experts]", "---", ""]
    targets = config["target_modules"]
    lines = [
        f"# MoE-LoRA adapter{f' for {name}' if name else ''}",
        "",
        "A mixture of LoRA experts per adapted linear layer, mixed by a top-k softmax router, trained with "
        "moelora (Riemannian preconditioners per expert; Sun et al., ICML 2025).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {name or 'unknown'} ({base.get('class_name', '?')}) |",
        f"| experts per layer / top-k / rank / alpha | {config['num_experts']} / {config['top_k']} / "
        f"{config['rank']} / {config['alpha']:g} |",
        f"| backward gate power | {config['gate_backward_power']:g} |",
        f"| adapted modules | {len(base.get('modules', {}))} ({', '.join(targets) if isinstance(targets, list) else targets}) |",
        f"| other trained modules | {', '.join(config.get('modules_to_save') or []) or 'none'} |",
        f"| base quantisation | {base.get('quantization') or 'none'} |",
        f"| adapter dtype | {meta.get('dtype')} |",
        f"| moelora version | {meta.get('library', {}).get('version', '?')} |",
    ]
    if training:
        lines += ["", "## Training", ""]
        for key, value in training.items():
            if key == "metrics" and isinstance(value, dict):
                lines += ["", "| metric | value |", "|---|---:|"]
                lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in value.items()]
                lines.append("")
            else:
                lines.append(f"- {key}: {value}")
    lines += [
        "",
        "## Load",
        "",
        "This is not a PEFT adapter (PEFT and transformers loaders refuse it); load it with moelora:",
        "",
        "```python",
        "import moelora",
        "from transformers import AutoModelForCausalLM",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(name or 'BASE_MODEL')})",
        'moelora.load_adapter(model, "path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(header + lines)
