"""Adapter files other tools can trust: modules_to_save, the model card, the recorded base, and what PEFT and
transformers loaders (and save_pretrained) do with a moelora model or folder."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import moelora
from moelora.adapter import CONFIG_NAME, WEIGHTS_NAME

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=128, pad_token_id=0)


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(**TINY, num_labels=3)).eval()


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


IDS = torch.tensor([[5, 9, 3, 7, 1, 2]])
CONFIG = moelora.MoELoRAConfig(num_experts=4, top_k=2, rank=2, dropout=0.0)


def test_modules_to_save_train_in_place_and_come_back_with_the_adapter(tmp_path):
    model = moelora.wrap(tiny_classifier(0), moelora.MoELoRAConfig(num_experts=4, top_k=2, rank=2, dropout=0.0,
                                                                   modules_to_save=["score"]))
    assert model.score.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    perturb(model)
    trained = model(IDS).logits
    moelora.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert "score.weight" in f.keys()  # under its own path in the model
    base = tiny_classifier(0)
    torch.nn.init.normal_(base.score.weight)  # the same base with another (new, random) head
    fresh = moelora.load_adapter(base, tmp_path)  # the head is restored from the file
    torch.testing.assert_close(fresh(IDS).logits, trained)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["modules_to_save"]["score.weight"]["shape"] == [3, 32]


def test_modules_to_save_errors():
    with pytest.raises(moelora.ConfigError, match="'head' matches no module"):
        moelora.wrap(tiny_classifier(), moelora.MoELoRAConfig(num_experts=2, top_k=1, modules_to_save=["head"]))
    with pytest.raises(moelora.ConfigError, match="both a target module and in modules_to_save"):
        moelora.wrap(tiny_lm(), moelora.MoELoRAConfig(num_experts=2, top_k=1, modules_to_save=["q_proj"]))


def test_the_adapter_folder_has_a_model_card_and_records_the_library_and_base(tmp_path):
    base = tiny_lm()
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    moelora.wrap(model, CONFIG)
    moelora.save_adapter(model, tmp_path / "adapter", training={"data": "fixture", "metrics": {"accuracy": 0.75}})
    meta = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert meta["library"] == {"name": "moelora", "version": moelora.__version__}
    assert meta["base_model"]["name_or_path"] == str(tmp_path / "base") and len(meta["base_model"]["fingerprint"]) == 64
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: moelora\nbase_model: ") and "moelora.load_adapter(model" in card
    assert "| accuracy | 0.75 |" in card and "fixture" in card
    moelora.adapter.record_training(tmp_path / "adapter", {"data": "other"})
    assert "other" in (tmp_path / "adapter" / "README.md").read_text()


def test_a_different_base_warns_but_loads(tmp_path, caplog):
    tiny_lm(0).save_pretrained(tmp_path / "base")
    model = moelora.wrap(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), CONFIG)
    moelora.save_adapter(model, tmp_path / "adapter")
    changed = tiny_lm(1)
    changed.config.vocab_size = 128  # same shapes, other weights and another config.json
    changed.config.rope_theta = 1234.0
    changed.save_pretrained(tmp_path / "base")
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with caplog.at_level(logging.WARNING, logger="moelora.adapter"):
        moelora.load_adapter(other, tmp_path / "adapter")
    assert "was trained on" in caplog.text and "its outputs may differ" in caplog.text


def test_save_pretrained_of_a_wrapped_model_refuses_and_names_save_adapter(tmp_path):
    model = moelora.wrap(tiny_lm(), CONFIG)
    with pytest.raises(moelora.AdapterError, match=r"moelora\.save_adapter"):
        model.save_pretrained(tmp_path / "full")
    assert not (tmp_path / "full").exists()
    import copy
    import pickle

    with pytest.raises(moelora.AdapterError):  # the guard survives copies
        pickle.loads(pickle.dumps(copy.deepcopy(model))).save_pretrained(tmp_path / "copy")
    moelora.unwrap(model)
    model.save_pretrained(tmp_path / "base")  # the plain base saves again
    assert (tmp_path / "base" / "config.json").is_file()


@pytest.fixture
def adapter_folder(tmp_path):
    tiny_lm().save_pretrained(tmp_path / "base")
    model = moelora.wrap(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), CONFIG)
    perturb(model)
    moelora.save_adapter(model, tmp_path / "adapter")
    return tmp_path


def _says_how(err: BaseException) -> bool:
    text = str(err)
    return "moelora" in text and "moelora.load_adapter" in text


def test_peft_loaders_refuse_the_folder_saying_how_to_load_it(adapter_folder):
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel

    folder = adapter_folder / "adapter"
    for load in (lambda: PeftModel.from_pretrained(tiny_lm(), folder), lambda: PeftConfig.from_pretrained(folder),
                 lambda: AutoPeftModelForCausalLM.from_pretrained(folder)):
        with pytest.raises(Exception) as info:
            load()
        assert _says_how(info.value), repr(info.value)


def test_transformers_loaders_refuse_the_folder_saying_how_to_load_it(adapter_folder):
    folder = adapter_folder / "adapter"
    with pytest.raises(Exception) as info:
        tiny_lm().load_adapter(str(folder))
    assert _says_how(info.value), repr(info.value)
    with pytest.raises(Exception) as info:
        AutoModelForCausalLM.from_pretrained(folder)
    assert _says_how(info.value), repr(info.value)


def test_load_adapter_refuses_a_peft_lora_folder(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "lora")
    with pytest.raises(moelora.AdapterError, match=r"PEFT adapter \(peft_type 'LORA'\).*PeftModel.from_pretrained"):
        moelora.load_adapter(tiny_lm(), tmp_path / "lora")


def test_a_format_1_folder_still_loads(tmp_path):
    """Folders written before modules_to_save and the model card existed."""
    model = moelora.wrap(tiny_lm(), CONFIG)
    perturb(model)
    moelora.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    for key in ("peft_type", "base_model_name_or_path", "library", "modules_to_save", "training"):
        meta.pop(key)
    meta["format_version"] = 1
    meta["config"].pop("modules_to_save")
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    loaded = moelora.load_adapter(tiny_lm(), tmp_path)
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)


def test_an_encoder_runs_head_is_in_its_adapter(tmp_path, monkeypatch):
    """A training run on the bundled encoder: the new head is saved in adapter/ and comes back with it."""
    from moelora.finetune.base_models import load_model_and_tokenizer
    from moelora.finetune.run_config import load_config
    from moelora.finetune.trainer import Trainer

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    config = load_config(root / "configs" / "smoke.yaml", [f"output_dir={tmp_path / 'run'}", "model.name=minilm",
                                                           "train.steps=3", "data.max_eval=8", "train.eval_every=0",
                                                           "adapter.target_modules=[query, value]"])
    trainer = Trainer(config, progress=False)
    trainer.run()
    trained = trainer.model.classifier.weight.detach().clone()
    meta = json.loads((tmp_path / "run" / "adapter" / CONFIG_NAME).read_text())
    assert meta["config"]["modules_to_save"] == ["classifier"]
    assert "accuracy" in (tmp_path / "run" / "adapter" / "README.md").read_text()
    model, _ = load_model_and_tokenizer("minilm", num_labels=2, seed=1)
    assert not torch.equal(model.classifier.weight, trained)
    moelora.load_adapter(model, tmp_path / "run" / "adapter")
    assert torch.equal(model.classifier.weight, trained)


def test_the_layer_follows_torchtunes_adapter_protocol():
    """torchtune's get_adapter_params collects, from every module with a callable ``adapter_params()``, the
    named parameters it lists; restated here (torchtune is not installed) and run on a wrapped model."""
    def get_adapter_params(model):
        found = {}
        for prefix, module in model.named_modules():
            if callable(getattr(module, "adapter_params", None)):
                wanted = list(module.adapter_params())
                for name, param in module.named_parameters(recurse=True):
                    if name in wanted:
                        found[f"{prefix}.{name}" if prefix else name] = param
                        wanted.remove(name)
                assert wanted == [], f"{prefix}: {wanted} not found"
        return found

    model = moelora.wrap(tiny_lm(), CONFIG)
    found = get_adapter_params(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert found.keys() == trainable.keys() and len(found) == 3 * len(list(moelora.moelora_layers(model)))
    assert all(found[n] is trainable[n] for n in found)
