"""Vision-language pieces: a tiny random LLaVA (CLIP tower + Llama), the paper's targets in both towers,
images that reach the model, and image_mc_file with its errors."""

import json

import pytest
import torch
from PIL import Image

import moelora
from moelora.finetune.data import MalformedRowError, load_task
from moelora.finetune.vision import PAPER_VLM_TARGETS, random_llava


def square(path, colour, size=28):
    Image.new("RGB", (size, size), colour).save(path)
    return path.name


def test_the_papers_target_list_wraps_both_towers():
    model, _ = random_llava()
    moelora.wrap(model, moelora.MoELoRAConfig(num_experts=4, top_k=2, rank=2, target_modules=PAPER_VLM_TARGETS))
    names = [name for name, _ in moelora.moelora_layers(model)]
    vision = [n for n in names if ".vision_tower." in n]
    language = [n for n in names if ".language_model." in n]
    assert len(vision) == 2 * 4 and len(language) == 2 * 4 and len(names) == 16  # 2 layers x 4 per tower
    assert {n.rsplit(".", 1)[1] for n in vision} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert {n.rsplit(".", 1)[1] for n in language} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_the_image_changes_the_models_output(tmp_path):
    model, processor = random_llava()
    moelora.wrap(model, moelora.MoELoRAConfig(num_experts=4, top_k=2, rank=2, target_modules=PAPER_VLM_TARGETS))
    with torch.no_grad():
        for _, layer in moelora.moelora_layers(model):
            layer.lora_B.normal_(0, 0.1)
    red = Image.new("RGB", (28, 28), "red")
    blue = Image.new("RGB", (28, 28), (0, 0, 255))
    prompt = "<image>\nWhat colour is the square? Answer:"

    def logits(image):
        inputs = processor(text=prompt, images=image, return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 4  # (28 / 14) ** 2 patches
        with torch.no_grad():
            return model(**inputs).logits[0, -1]

    assert not torch.allclose(logits(red), logits(blue))  # same question, another image
    torch.testing.assert_close(logits(red), logits(red))


def write_task(folder, rows):
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for colour in ("red", "blue", "green"):
        square(images / f"{colour}.png", colour)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def rows(n=12):
    colours = ["red", "blue", "green"]
    return [{"image": f"images/{colours[i % 3]}.png", "question": "What colour is the square?",
             "choices": colours, "answer": colours[i % 3]} for i in range(n)]


def test_image_mc_file_reads_rows_with_images(tmp_path):
    task = load_task("image_mc_file", data_dir=write_task(tmp_path / "data", rows()))
    example = task.train[0]
    assert task.kind == "multiple_choice" and task.info["modality"] == "image"
    assert example.prompt.startswith("<image>\n") and example.image.endswith(".png")
    assert example.options[example.label].strip().endswith(f"{'ABC'[example.label]}.")  # letter answers


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(image="images/absent.png"), r"train.jsonl, line 3: image .*absent.png does not exist"),
    (lambda r: r.update(image="images/broken.png"), r"train.jsonl, line 3: image .*broken.png cannot be read"),
    (lambda r: r.pop("image"), r"train.jsonl, line 3: a row of an image task needs 'image'"),
])
def test_bad_image_rows_name_the_file_line_and_image(tmp_path, change, message):
    data = rows()
    change(data[2])
    folder = write_task(tmp_path / "data", data)
    (folder / "images" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(MalformedRowError, match=message):
        load_task("image_mc_file", data_dir=folder)


def test_image_batches_label_the_answer_and_train_the_adapters(tmp_path):
    """ImageCollator through the processor; the answer loss with pixel_values equals transformers' own; a few
    steps of the paper's method on both towers lower it."""
    from moelora.finetune.data.image_collate import ImageCollator
    from moelora.finetune.loss import CausalLMAnswerLoss, answer_loss
    from moelora.optim import RiemannianAdamW, param_groups

    task = load_task("image_mc_file", data_dir=write_task(tmp_path / "data", rows(24)))
    model, processor = random_llava(initializer_range=0.1)
    collator = ImageCollator(processor, max_length=128)
    batch = collator(task.train[:6])
    assert batch["pixel_values"].shape == (6, 3, 28, 28)
    image_token = model.config.image_token_index
    assert ((batch["input_ids"] == image_token).sum(dim=1) == 4).all()  # every row keeps its 4 image tokens
    answer = processor.tokenizer.decode([t for t in batch["labels"][0].tolist() if t != -100])
    assert answer == task.train[0].answer
    with torch.no_grad():
        ours = answer_loss(model, batch)
        theirs = model(**batch).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)  # the adapters' initialisation, whatever ran before
    moelora.wrap(model, moelora.MoELoRAConfig(num_experts=4, top_k=2, rank=4, dropout=0.0, gate_backward_power=0.5,
                                              target_modules=PAPER_VLM_TARGETS))
    model.train()
    optimizer = RiemannianAdamW(param_groups(model, lr=2e-2, router_lr=2e-3), lr=2e-2)
    loss_module = CausalLMAnswerLoss(model)
    losses = []
    for step in range(24):
        rows_of_step = task.train[(step * 6) % 18:][:6]
        total, count = loss_module(**collator(rows_of_step))
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(total / count))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_image_collation_errors(tmp_path):
    from moelora.finetune.data import DataError
    from moelora.finetune.data.image_collate import ImageCollator

    task = load_task("image_mc_file", data_dir=write_task(tmp_path / "data", rows()))
    _, processor = random_llava()
    with pytest.raises(DataError, match=r"takes \d+ tokens with its image tokens, more than data.max_length=8"):
        ImageCollator(processor, max_length=8)(task.train[:2])
    with pytest.raises(DataError, match="has no image processor"):
        ImageCollator(processor.tokenizer)


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SMOKE_VISION = ROOT / "configs" / "smoke_vision.yaml"


def test_moelora_train_on_images_then_eval(tmp_path, monkeypatch, capsys):
    """The training command on an image_mc_file fixture with the tiny LLaVA: the loss falls, the adapter
    saves and loads (the same logits), and moelora eval scores the run."""
    from moelora.finetune.cli import main
    from moelora.finetune.data.image_collate import ImageCollator
    from moelora.finetune.run_config import load_config
    from moelora.finetune.trainer import Trainer

    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    config = load_config(SMOKE_VISION, [f"output_dir={run}", "train.steps=16", "train.log_every=1"])
    trainer = Trainer(config, progress=False)
    result = trainer.run()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses  # 5.5 -> 4.7
    assert result.test is not None and result.test.n == 12 and result.zero_shot is not None
    towers = json.loads((run / "summary.json").read_text())["router_by_tower"]
    assert set(towers) == {"vision", "language"} and towers["vision"]["layers"] == towers["language"]["layers"] == 8
    assert all(0 < t["mean_gate_entropy"] and 1 / 4 <= t["mean_max_load"] <= 1 for t in towers.values())

    fresh, processor = random_llava(seed=config.train.seed, initializer_range=0.1)
    moelora.load_adapter(fresh, run / "adapter")
    batch = ImageCollator(processor, 128)(trainer.runtime.task.test[:3])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**batch).logits, trainer.model.eval()(**batch).logits)
    names = [n for n, _ in moelora.moelora_layers(fresh)]
    assert any(".vision_tower." in n for n in names) and any(".language_model." in n for n in names)

    capsys.readouterr()
    assert main(["eval", str(run), "--no-progress"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["n"] == 12 and scored["value"] == pytest.approx(result.test.value)


def test_an_image_task_on_a_model_without_an_image_processor_exits_2(tmp_path, monkeypatch, capsys):
    from moelora.finetune.cli import main

    monkeypatch.chdir(ROOT)
    code = main(["train", str(SMOKE_VISION), "--no-progress", "--set", f"output_dir={tmp_path}/run",
                 "--set", "model.name=random-llama", "--set", "model.random_config={}",
                 "--set", "adapter.target_modules=[q_proj, v_proj]"])
    assert code == 2 and "has no image processor" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_local_llava_folder_with_its_processor_trains(tmp_path, monkeypatch):
    """model.name may be a folder holding a LLaVA-style model and its processor (AutoProcessor)."""
    from moelora.finetune.run_config import load_config
    from moelora.finetune.trainer import Trainer

    monkeypatch.chdir(ROOT)
    model, processor = random_llava(initializer_range=0.1)
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    config = load_config(SMOKE_VISION, [f"output_dir={tmp_path / 'run'}", f"model.name={tmp_path / 'llava'}",
                                        "model.random_config={}", "train.steps=4", "train.eval_every=0",
                                        "eval.zero_shot=false"])
    result = Trainer(config, progress=False).run()
    assert result.test is not None and result.test.n == 12
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model"]["class_name"] == "LlavaForConditionalGeneration" and meta["base_model"]["fingerprint"]


def test_generation_with_images_answers_and_is_scored(tmp_path, monkeypatch):
    """eval.method=generate on an image task: greedy text through the processor with each image, the answer
    letter read from it; the image changes what is generated."""
    from moelora.finetune.eval import evaluate
    from moelora.finetune.eval.generation import generate_image_texts

    task = load_task("image_mc_file", data_dir=write_task(tmp_path / "data", rows()))
    model, processor = random_llava(initializer_range=0.1)
    result = evaluate(model, processor, task, task.train[:4], method="generate", max_new_tokens=5)
    assert result.method == "generate" and result.n == 4 and len(result.generations) == 4
    assert all(p in (-1, 0, 1, 2) for p in result.predictions)
    assert processor.tokenizer.padding_side == "right"  # restored
    red, blue = (replace_image(task.test[0], tmp_path, c) for c in ("red", "blue"))
    outputs = generate_image_texts(model, processor, [red, blue], max_new_tokens=6)
    logits = []
    for example in (red, blue):
        inputs = processor(text=example.prompt, images=Image.open(example.image), return_tensors="pt")
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert len(outputs) == 2 and not torch.allclose(logits[0], logits[1])


def replace_image(example, folder, colour):
    from dataclasses import replace

    return replace(example, image=str(folder / "data" / "images" / f"{colour}.png"))


def test_visual7w_in_its_public_layout(tmp_path):
    root = tmp_path / "v7w"
    (root / "images").mkdir(parents=True)
    entries = []
    for i, (colour, split) in enumerate([("red", "train"), ("blue", "train"), ("green", "val"), ("red", "test")]):
        square(root / "images" / f"v7w_{i}.png", colour)
        entries.append({"filename": f"v7w_{i}.png", "image_id": i, "split": split, "qa_pairs": [
            {"qa_id": 100 + i, "question": "What colour is the square?", "answer": colour,
             "multiple_choices": [c for c in ("red", "blue", "green", "white") if c != colour][:3], "type": "what"}]})
    (root / "dataset_v7w_telling.json").write_text(json.dumps({"images": entries}))
    task = load_task("visual7w", data_dir=root)
    assert task.sizes() == {"train": 2, "validation": 1, "test": 1} and task.info["modality"] == "image"
    for example in task.train + task.validation + task.test:
        assert len(example.options) == 4 and example.image.endswith(".png") and example.prompt.startswith("<image>")
    positions = {e.label for e in task.train + task.validation + task.test}
    assert all(0 <= p < 4 for p in positions)
    entries[1]["filename"] = "missing.png"
    (root / "dataset_v7w_telling.json").write_text(json.dumps({"images": entries}))
    with pytest.raises(MalformedRowError, match=r"record images\[1\]: image .*missing.png does not exist"):
        load_task("visual7w", data_dir=root)


def test_prompts_go_through_the_processors_chat_template_when_it_has_one(tmp_path):
    from moelora.finetune.data.image_collate import ImageCollator, image_prompt

    task = load_task("image_mc_file", data_dir=write_task(tmp_path / "data", rows()))
    model, processor = random_llava()
    example = task.train[0]
    assert image_prompt(processor, example) == example.prompt  # no template: the placeholder line
    processor.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    text = image_prompt(processor, example)
    assert text.startswith("<|im_start|>user\n<image>\n") and text.endswith("<|im_start|>assistant\n")
    assert example.prompt.removeprefix("<image>\n") in text
    batch = ImageCollator(processor, 256)(task.train[:2])
    assert ((batch["input_ids"] == model.config.image_token_index).sum(dim=1) == 4).all()
    answer = processor.tokenizer.decode([t for t in batch["labels"][0].tolist() if t != -100])
    assert answer == example.answer


def write_vmcbench(root, rows_by_split):
    """VMCBench's public layout: data/<split>-00000-of-00001.parquet, images embedded as the datasets Image
    feature stores them ({"bytes", "path"})."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        table = []
        for i, (colour, answer, image) in enumerate(rows):
            if image is None:
                buffer = io.BytesIO()
                Image.new("RGB", (28, 28), colour).save(buffer, format="PNG")
                image = {"bytes": buffer.getvalue(), "path": f"{split}_{i}.png"}
            choices = [c for c in ("red", "blue", "green", "white") if c != colour][:3]
            choices.insert("ABCD".index(answer), colour)
            table.append({"index": f"{split}{i}", "question": "What colour is the square?",
                          **dict(zip("ABCD", choices)), "answer": answer, "category": "colour", "image": image})
        pq.write_table(pa.Table.from_pylist(table), root / "data" / f"{split}-00000-of-00001.parquet")


def test_vmcbench_in_its_public_layout(tmp_path):
    from PIL import Image as PILImage

    root, cache = tmp_path / "VMCBench", tmp_path / "cache"
    colours = ["red", "blue", "green", "white"]
    write_vmcbench(root, {"dev": [(colours[i % 4], "ABCD"[i % 4], None) for i in range(24)],
                          "test": [(colours[i % 4], "DCBA"[i % 4], None) for i in range(6)]})
    task = load_task("vmcbench", data_dir=root, cache_dir=cache)
    sizes = task.sizes()
    assert sizes["train"] + sizes["validation"] == 24 and sizes["validation"] >= 1 and sizes["test"] == 6
    assert task.info["modality"] == "image" and task.num_labels == 4
    for example in task.train + task.validation + task.test:
        assert example.prompt.startswith("<image>") and len(example.options) == 4
        with PILImage.open(example.image) as image:  # decoded from the parquet file, stored in the cache
            colour = image.convert("RGB").getpixel((0, 0))
        right = {(255, 0, 0): "red", (0, 0, 255): "blue", (0, 128, 0): "green", (255, 255, 255): "white"}[colour]
        assert f"({'ABCD'[example.label]}) {right}\n" in example.prompt.replace(" (", "\n(")  # the answer letter
    stored = sorted(p.name for p in (cache / "images" / "vmcbench").iterdir())
    assert len(stored) == 4  # one file per distinct image (named by content), written once
    load_task("vmcbench", data_dir=root, cache_dir=cache)
    assert sorted(p.name for p in (cache / "images" / "vmcbench").iterdir()) == stored


@pytest.mark.parametrize("bad, message", [
    ({"bytes": b"", "path": None}, r"record 1 \(index dev1\): has no image bytes"),
    ({"bytes": b"not an image", "path": "x.png"}, r"record 1 \(index dev1\): has an image that Pillow cannot decode"),
])
def test_vmcbench_bad_images_name_the_file_and_row(tmp_path, bad, message):
    root = tmp_path / "VMCBench"
    write_vmcbench(root, {"dev": [("red", "A", None), ("blue", "B", bad), ("green", "C", None)]})
    with pytest.raises(MalformedRowError, match=r"dev-00000-of-00001.parquet, " + message):
        load_task("vmcbench", data_dir=root, cache_dir=tmp_path / "cache")


def test_vmcbench_needs_its_files(tmp_path):
    from moelora.finetune.data import DataError

    with pytest.raises(DataError, match="dev-\\*.parquet"):
        load_task("vmcbench", data_dir=tmp_path, cache_dir=tmp_path / "cache")


def vision_losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


VISION_FAST = ["eval.zero_shot=false", "train.eval_every=0", "train.steps=6", "train.log_every=1", "data.max_eval=4"]


def test_a_vision_run_killed_after_a_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    """Checkpoints and resume are unchanged for an image task: the same losses (dropout masks included) and
    the same adapter as an uninterrupted run."""
    from safetensors.torch import load_file

    from moelora.finetune import batching
    from moelora.finetune.run_config import load_config
    from moelora.finetune.trainer import Trainer

    monkeypatch.chdir(ROOT)
    common = [*VISION_FAST, "adapter.dropout=0.1", "train.save_every=3"]
    Trainer(load_config(SMOKE_VISION, [f"output_dir={tmp_path / 'full'}", *common]), progress=False).run()
    original = batching.StepBatches.micro_batches

    def killed_at_step_5(self, step, *args):
        if step == 4:
            raise KeyboardInterrupt  # after the step-3 checkpoint and one more step
        return original(self, step, *args)

    monkeypatch.setattr(batching.StepBatches, "micro_batches", killed_at_step_5)
    resumed = load_config(SMOKE_VISION, [f"output_dir={tmp_path / 'resumed'}", *common])
    with pytest.raises(KeyboardInterrupt):
        Trainer(resumed, progress=False).run()
    monkeypatch.setattr(batching.StepBatches, "micro_batches", original)
    Trainer(resumed, progress=False).run(resume=True)
    assert vision_losses(tmp_path / "resumed") == vision_losses(tmp_path / "full")
    full = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_a_vision_run_on_two_ddp_processes_matches_one_process(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from moelora.finetune.run_config import load_config
    from moelora.finetune.trainer import Trainer

    monkeypatch.chdir(ROOT)
    overrides = [*VISION_FAST, "train.save_every=0", "train.batch_size=8", "train.grad_accum=2", "adapter.dropout=0.0"]
    Trainer(load_config(SMOKE_VISION, [f"output_dir={tmp_path / 'single'}", *overrides]), progress=False).run()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
         "-m", "moelora", "train", str(SMOKE_VISION), "--no-progress", "--set", f"output_dir={tmp_path / 'ddp'}",
         *sum((["--set", o] for o in overrides), [])],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = vision_losses(tmp_path / "single"), vision_losses(tmp_path / "ddp")
    assert one.keys() == two.keys() and len(one) == 6
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["router_by_tower"].keys() == {"vision", "language"}
