"""Write the paper-reproduction configs: one YAML per model x optimizer x variant.

    python configs/paper/generate.py          # rewrites configs/paper/<model>/<optimizer>-<variant>.yaml

The tables below are the only place the values live; README.md in this folder explains them. A test
checks that the YAML files on disk are exactly what this script writes.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# The paper's expert learning rates; routers always use ROUTER_LR.
PAPER_LR = {"sgd": 3e-5, "adamw": 1e-5}
GLM_LR = {"sgd": 3e-6, "adamw": 1e-6}
ROUTER_LR = 3e-8

MODELS = {
    "llama-3.2-3b": {
        "title": "Llama-3.2-3B",
        "path": "models/Llama-3.2-3B",
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "lr": PAPER_LR,
        "task": "scienceqa",
        "data": "data/scienceqa",
        "grad_accum": 10,
        "notes": [],
    },
    "glm-4-9b": {
        "title": "GLM-4-9B",
        "path": "models/glm-4-9b-hf",
        # The original checkpoint fuses the attention input projection into one query_key_value module;
        # the transformers-format checkpoint (glm-4-9b-hf) holds the same weights as q/k/v_proj.
        "targets": r".*\.(query_key_value|self_attn\.(q_proj|k_proj|v_proj))",
        "lr": GLM_LR,
        "task": "commonsense_qa",
        "data": "data/commonsense_qa",
        "grad_accum": 20,
        "notes": [
            "The paper adapts the fused query_key_value module of the original checkpoint. The regex matches",
            "it, and matches q/k/v_proj (the same weights, split) in the transformers-format checkpoint",
            "glm-4-9b-hf, which loads without remote code. Expert learning rates are 10x lower for GLM.",
        ],
    },
    "llava-1.5-7b": {
        "title": "LLaVA-1.5-7B",
        "path": "models/llava-1.5-7b-hf",
        # The attention projections of both towers: q/k/v/out_proj in the CLIP vision tower, q/k/v/o_proj
        # in the language model (moelora.finetune.vision.PAPER_VLM_TARGETS).
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj"],
        "lr": PAPER_LR,
        "task": "visual7w",
        "data": "data/visual7w",
        "grad_accum": 20,
        "notes": [
            "Adapts the attention projections of both towers, as the paper does: q/k/v/out_proj in the",
            "CLIP vision tower and q/k/v/o_proj in the language model. Visual7W telling QA from its",
            "public layout; for VMCBench use --set data.task=vmcbench data.path=<folder with its parquet files>.",
        ],
    },
}

VARIANTS = {
    "baseline": {
        "title": "per-expert Riemannian (the paper's baseline)",
        "preconditioner": "riemannian",
        "gate_backward_power": 1.0,
    },
    "paper_method": {
        "title": "per-expert Riemannian + gate power 0.5 (the paper's method)",
        "preconditioner": "riemannian",
        "gate_backward_power": 0.5,
    },
    "gate_rescaled": {
        "title": "gate-rescaled preconditioner (derived, see docs/method.md)",
        "preconditioner": "gate_rescaled",
        "gate_backward_power": 1.0,
    },
}

OPTIMIZERS = ("sgd", "adamw")


def config(model: str, optimizer: str, variant: str) -> dict:
    """The run configuration of one paper run, as the mapping ``moelora.finetune.run_config.load_config`` reads."""
    m, v = MODELS[model], VARIANTS[variant]
    optim = {
        "name": optimizer,
        "preconditioner": v["preconditioner"],
        "lr": m["lr"][optimizer],
        "router_lr": ROUTER_LR,
        "router_max_grad_norm": 1.0,
        "weight_decay": 0.0,
        "reg": 1.0e-6,
    }
    if optimizer == "adamw":  # the AdamW of the paper's code (docs/method.md, paper-faithful switches)
        optim.update(betas=[0.9, 0.999], eps=1.0e-6, bias_correction=False, b_from_updated_a=True)
    else:
        optim.update(momentum=0.0)
    return {
        "output_dir": f"runs/paper/{model}/{optimizer}-{variant}",
        # The paper's base: 4-bit NF4 (double quantisation), computing in fp16; norms kept in float32.
        "model": {"name": m["path"], "dtype": "float16", "quantization": "nf4"},
        "data": {"task": m["task"], "path": m["data"], "max_length": 512},
        "adapter": {
            "num_experts": 20,
            "top_k": 10,
            "rank": 4,
            "alpha": 16.0,
            "dropout": 0.05,
            "target_modules": m["targets"],
            "gate_backward_power": v["gate_backward_power"],
            "router_init": "kaiming",
        },
        "optim": optim,
        "train": {
            "steps": 2000,
            "batch_size": 80,
            "grad_accum": m["grad_accum"],
            "warmup_steps": 0,
            "final_lr_ratio": 0.1,
            "eval_every": 100,
            "save_every": 500,
            "log_every": 10,
            "seed": 0,
            "device": "auto",
            "precision": "fp16",
        },
        "eval": {"method": "generate", "max_new_tokens": 10, "batch_size": 16, "zero_shot": True},
    }


def render(model: str, optimizer: str, variant: str) -> str:
    m, v = MODELS[model], VARIANTS[variant]
    header = [
        f"{m['title']} on {m['task']}, {optimizer.upper()}: {v['title']}.",
        "The paper's hyper-parameters; model.name and data.path are placeholders (see README.md here).",
        *m["notes"],
        "Generated by configs/paper/generate.py: edit the script and re-run it, not this file.",
    ]
    body = yaml.safe_dump(config(model, optimizer, variant), sort_keys=False, width=120)
    return "".join(f"# {line}\n" for line in header) + body


def all_configs() -> dict[Path, str]:
    """``{path: text}`` of every config, keyed by its path relative to this folder."""
    return {
        Path(model) / f"{optimizer}-{variant}.yaml": render(model, optimizer, variant)
        for model in MODELS
        for optimizer in OPTIMIZERS
        for variant in VARIANTS
    }


def main() -> None:
    for relative, text in all_configs().items():
        path = HERE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path.relative_to(HERE))


if __name__ == "__main__":
    main()
