"""Every YAML under configs/ is a valid run configuration; the paper configs hold the paper's values."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from moelora import MoELoRAConfig
from moelora.finetune.data import available_tasks
from moelora.finetune.run_config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PAPER = CONFIGS / "paper"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
PAPER_YAML = sorted(PAPER.rglob("*.yaml"))


def _generator():
    spec = importlib.util.spec_from_file_location("paper_configs", PAPER / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rel(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_the_config_folders_are_found():
    assert CONFIGS / "smoke.yaml" in ALL_YAML
    assert len(PAPER_YAML) == 18  # 3 models x 2 optimizers x 3 variants


@pytest.mark.parametrize("path", ALL_YAML, ids=_rel)
def test_every_config_loads(path):
    config = load_config(path)
    MoELoRAConfig(**vars(config.adapter))  # the adapter section is a valid MoELoRAConfig too
    task = config.data.task
    assert task in available_tasks() or f"{task.split(':')[0]}:<name>" in available_tasks()


def test_paper_configs_are_what_the_generator_writes():
    generated = _generator().all_configs()
    on_disk = {path.relative_to(PAPER): path.read_text() for path in PAPER_YAML}
    assert set(on_disk) == set(generated), "run `python configs/paper/generate.py`"
    for relative, text in generated.items():
        assert on_disk[relative] == text, f"{relative} is out of date: run `python configs/paper/generate.py`"


EXPECTED_LR = {  # the paper's protocol
    ("llama-3.2-3b", "sgd"): 3e-5, ("llama-3.2-3b", "adamw"): 1e-5,
    ("glm-4-9b", "sgd"): 3e-6, ("glm-4-9b", "adamw"): 1e-6,
    ("llava-1.5-7b", "sgd"): 3e-5, ("llava-1.5-7b", "adamw"): 1e-5,
}
EXPECTED_VARIANT = {  # (preconditioner, gate_backward_power), see docs/method.md
    "baseline": ("riemannian", 1.0), "paper_method": ("riemannian", 0.5), "gate_rescaled": ("gate_rescaled", 1.0),
}


@pytest.mark.parametrize("path", PAPER_YAML, ids=_rel)
def test_paper_configs_hold_the_papers_values(path):
    model, (optimizer, variant) = path.parent.name, path.stem.split("-", 1)
    c = load_config(path)
    a, o, t = c.adapter, c.optim, c.train
    assert (a.num_experts, a.top_k, a.rank, a.alpha, a.dropout) == (20, 10, 4, 16.0, 0.05)
    assert (o.preconditioner, a.gate_backward_power) == EXPECTED_VARIANT[variant]
    assert o.name == optimizer
    assert o.lr == pytest.approx(EXPECTED_LR[model, optimizer], rel=1e-12)
    assert o.router_lr == pytest.approx(3e-8, rel=1e-12)
    assert o.router_max_grad_norm == 1.0 and o.weight_decay == 0.0 and o.reg == pytest.approx(1e-6)
    if optimizer == "adamw":
        assert o.bias_correction is False and o.eps == pytest.approx(1e-6) and o.b_from_updated_a is True
        assert o.betas == [0.9, 0.999]
    else:
        assert o.momentum == 0.0
    assert (t.steps, t.batch_size, t.warmup_steps, t.final_lr_ratio, t.eval_every) == (2000, 80, 0, 0.1, 100)
    assert t.batch_size % t.grad_accum == 0
    assert (c.eval.method, c.eval.max_new_tokens) == ("generate", 10)
    # the paper's QLoRA setting: an NF4 base, fp16 compute (autocast with a gradient scaler)
    assert (c.model.dtype, c.model.quantization, t.precision) == ("float16", "nf4", "fp16")
    assert c.output_dir == f"runs/paper/{model}/{path.stem}"
    assert model.split("-")[0] in c.model.name.lower()


def test_the_paper_tasks_are_covered():
    tasks = {load_config(p).data.task for p in PAPER_YAML}
    assert tasks == {"scienceqa", "commonsense_qa", "visual7w"}
    assert all(load_config(p).data.task == "scienceqa" for p in PAPER.glob("llama-3.2-3b/*.yaml"))


# ------------------------------------------------------------------------------------ target modules
def _linear_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def _targets(model_dir: str) -> MoELoRAConfig:
    adapter = load_config(next(PAPER.glob(f"{model_dir}/*.yaml"))).adapter
    return MoELoRAConfig(**vars(adapter))


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, vocab_size=64, pad_token_id=0)


def test_llama_targets_are_the_attention_projections():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = _targets("llama-3.2-3b")
    matched = [n for n in _linear_names(LlamaForCausalLM(LlamaConfig(**TINY))) if config.matches(n)]
    assert len(matched) == 8 and all(re.search(r"self_attn\.[qkvo]_proj$", n) for n in matched)


def test_glm_targets_the_fused_or_split_query_key_value():
    from transformers import GlmConfig, GlmForCausalLM

    config = _targets("glm-4-9b")
    # transformers-format checkpoint (glm-4-9b-hf): q/k/v, not the output projection nor the MLP
    matched = [n for n in _linear_names(GlmForCausalLM(GlmConfig(**TINY))) if config.matches(n)]
    assert len(matched) == 6 and all(re.search(r"self_attn\.[qkv]_proj$", n) for n in matched)
    # original checkpoint layout: the fused query_key_value only
    original = ["transformer.encoder.layers.0.self_attention.query_key_value",
                "transformer.encoder.layers.0.self_attention.dense",
                "transformer.encoder.layers.0.mlp.dense_h_to_4h", "transformer.encoder.layers.0.mlp.dense_4h_to_h",
                "transformer.output_layer"]
    assert [n for n in original if config.matches(n)] == original[:1]


def test_llava_targets_the_attention_of_both_towers():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TINY)))
    config = _targets("llava-1.5-7b")
    matched = [n for n in _linear_names(model) if config.matches(n)]
    vision_tower = [n for n in matched if "vision_tower" in n]
    language = [n for n in matched if "language_model" in n]
    assert len(vision_tower) == 4 and all(re.search(r"self_attn\.(q|k|v|out)_proj$", n) for n in vision_tower)
    assert len(language) == 8 and all(re.search(r"self_attn\.[qkvo]_proj$", n) for n in language)
    assert len(matched) == 12  # not the projector, the MLPs or the head


# ------------------------------------------------------------------------------------------ dry runs
@pytest.mark.parametrize("name, data", [
    ("llama-3.2-3b/adamw-paper_method", "scienceqa"),
    ("glm-4-9b/sgd-gate_rescaled", "commonsense_qa"),
    ("llava-1.5-7b/adamw-baseline", "visual7w"),
])
def test_paper_config_runs_with_tiny_stand_ins(name, data, tmp_path):
    """The paper's settings (optimizer switches, schedule, generation eval) run end to end when the model,
    the data and the sizes are replaced by tiny ones."""
    from moelora.finetune.trainer import Trainer

    # the paper's NF4 base stays (bitsandbytes runs it on the CPU); fp16 needs a GPU: bf16 here
    stand_in = "random-llava" if name.startswith("llava") else "random-llama"  # a tiny CLIP + Llama for LLaVA
    overrides = [f"output_dir={tmp_path / 'run'}", f"model.name={stand_in}", "model.dtype=float32",
                 "train.precision=bf16", "train.device=cpu",
                 f"data.path={FIXTURES / data}", "data.max_eval=2", "train.steps=2", "train.batch_size=2",
                 "train.grad_accum=2", "train.eval_every=1", "train.eval_examples=2", "train.save_every=0",
                 "eval.max_new_tokens=3"]
    if name.startswith("llava"):  # bitsandbytes' CPU 4-bit kernels need rows of at least 64 values
        overrides.append("model.random_config={hidden_size: 64}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = Trainer(load_config(PAPER / f"{name}.yaml", overrides), progress=False).run().summary
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
