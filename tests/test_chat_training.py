"""Generative (chat) tasks: the file loaders, packing against padding, the trainer on conversations, the
generation metrics, and the generate / chat commands."""

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moelora
from moelora.finetune.base_models import byte_level_tokenizer, load_model_and_tokenizer
from moelora.finetune.cli import main
from moelora.finetune.data import (
    IGNORE_INDEX,
    ChatCollator,
    DataError,
    MalformedRowError,
    chat_example,
    load_task,
)
from moelora.finetune.data.chat_collate import pack_sequences
from moelora.finetune.eval import EvalResult, evaluate
from moelora.finetune.eval.text_metrics import contains, exact_match, extract_answer_text, normalize_answer, token_f1
from moelora.finetune.generate import Generator, SamplingOptions, _Streamer, chat_loop, decode_escapes
from moelora.finetune.loss import CausalLMAnswerLoss
from moelora.finetune.run_config import load_config
from moelora.finetune.tasks import TaskRuntime

ROOT = Path(__file__).resolve().parents[1]
SMOKE_CHAT = ROOT / "configs" / "smoke_chat.yaml"
FAST = ["train.steps=4", "train.save_every=2", "train.eval_every=2", "train.log_every=1", "data.max_eval=8",
        "train.eval_examples=4", "eval.max_new_tokens=4"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ loaders
def test_the_three_file_tasks_read_their_layouts(tmp_path):
    chat_dir = tmp_path / "chat"
    chat_dir.mkdir()
    write_jsonl(chat_dir / "train.jsonl", [{"messages": [user(f"q{i}"), assistant(f"a{i}")]} for i in range(20)])
    write_jsonl(chat_dir / "test.jsonl", [{"conversations": [{"from": "human", "value": "2+2?"},
                                                             {"from": "gpt", "value": "4"}], "references": ["four"]}])
    task = load_task("chat_file", data_dir=chat_dir, system_prompt="Be brief.")
    assert task.kind == "generative" and task.metric == "exact_match" and task.sizes()["test"] == 1
    test = task.test[0]
    assert test.messages[0] == {"role": "system", "content": "Be brief."} and test.options == ("4", "four")
    assert test.context == [test.messages[0], user("2+2?")] and test.answer == "4"

    (tmp_path / "alpaca.csv").write_text("instruction,input,output\nAdd,2 and 2,4\n" + "Say hi,,hi\n" * 10)
    alpaca = load_task("instruction_file", train_file=tmp_path / "alpaca.csv")
    assert alpaca.train[0].messages[0]["content"] in ("Add\n\n2 and 2", "Say hi")
    (tmp_path / "completion.json").write_text(json.dumps([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]))
    completion = load_task("completion_file", train_file=tmp_path / "completion.json")
    assert sum(completion.sizes().values()) == 10 and completion.train[0].messages[-1]["role"] == "assistant"


def test_a_row_of_another_layout_names_the_task_to_use(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [user("a"), assistant("b")]},
                                                 {"instruction": "x", "output": "y"}])
    with pytest.raises(MalformedRowError, match=r"rows.jsonl, line 2: .*data.task=instruction_file"):
        load_task("chat_file", train_file=path)


def test_an_invalid_answer_pattern_is_refused_before_reading(tmp_path):
    with pytest.raises(DataError, match="answer_pattern"):
        load_task("chat_file", train_file=tmp_path / "absent.jsonl", answer_pattern="(")


@pytest.mark.parametrize("rows,message", [
    ([{"messages": [user("Hi")]}], "line 2: the conversation has no assistant turn"),
    ([{"messages": [user("a"), user("b"), assistant("c")]}], "line 2: message 1 is from 'user' where 'assistant'"),
    ([{"messages": [user("a"), assistant("")]}], "line 2: message 1 .* empty or missing 'content'"),
    ([{"messages": [{"role": "wizard", "content": "a"}, assistant("b")]}], "line 2: message 0 has role='wizard'"),
])
def test_bad_conversations_exit_2_naming_the_file_and_line(tmp_path, capsys, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [user("ok"), assistant("fine")]}, *rows])
    code = main(["train", str(SMOKE_CHAT), "--no-progress", "--set", f"output_dir={tmp_path}/run",
                 "--set", f"data.options.train_file={path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_tokenizer_without_a_chat_template_is_an_error(tmp_path, capsys):
    code = main(["train", str(SMOKE_CHAT), "--no-progress", "--set", f"output_dir={tmp_path}/run",
                 "--set", "data.chat_template=null"])
    assert code == 2
    assert "no chat template" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_chat_template_from_a_file(tmp_path):
    from moelora.finetune.data.chat import resolve_chat_template

    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert resolve_chat_template(None, str(tmp_path / "t.jinja")).startswith("{% for m")
    with pytest.raises(DataError, match="no template file"):
        resolve_chat_template(None, str(tmp_path / "absent.jinja"))
    with pytest.raises(DataError, match="must be 'chatml'"):
        resolve_chat_template(None, "chatlm")


def test_chat_options_on_a_choice_task_are_refused():
    config = load_config(ROOT / "configs" / "smoke.yaml", ["data.packing=true"])
    with pytest.raises(moelora.ConfigError, match="apply to generative tasks"):
        TaskRuntime.load(config)


# ------------------------------------------------------------------------------------------------ packing
def test_pack_sequences_fills_rows_without_overflow():
    lengths = [5, 9, 3, 7, 2, 10, 1]
    rows = pack_sequences(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows) and len(rows) == 4
    with pytest.raises(ValueError, match="does not fit"):
        pack_sequences([11], 10)


CHATS = [
    [{"role": "system", "content": "Be brief."}, user("What is 2 plus 2?"), assistant("4")],
    [user("Name a fruit."), assistant("An apple."), user("Another one?"), assistant("A pear.")],
    [user("Hi"), assistant("Hello there, how can I help?")],
    [user("Spell cat backwards."), assistant("tac")],
    [user("Count to three."), assistant("one two three")],
]


def test_a_packed_batch_computes_what_the_padded_batch_computes():
    model, tokenizer = load_model_and_tokenizer("random-llama", random_config={"hidden_size": 64,
                                                "intermediate_size": 128, "num_hidden_layers": 2})
    moelora.wrap(model, moelora.MoELoRAConfig(num_experts=4, top_k=2, rank=4, dropout=0.0))
    adapters = [p for p in model.parameters() if p.requires_grad]
    for p in adapters:
        p.data.normal_(0, 0.05)  # non-zero B, so the adapters take part
    examples = [chat_example(c) for c in CHATS]
    loss = CausalLMAnswerLoss(model)
    results = {}
    for packing in (False, True):
        collator = ChatCollator(tokenizer, max_length=256, chat_template="chatml", packing=packing)
        batch = collator(examples)
        model.zero_grad()
        total, count = loss(**batch)
        total.backward()
        grads = torch.cat([p.grad.flatten() for p in adapters])
        results[packing] = (batch, total.detach(), int(count), grads)
    padded, packed = results[False], results[True]
    assert "attention_mask" not in packed[0] and packed[0]["input_ids"].shape[0] < len(examples)
    assert packed[2] == padded[2]
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[3], padded[3], rtol=1e-4, atol=1e-6)
    # each packed sequence numbers its own positions from 0
    positions = packed[0]["position_ids"][0]
    assert int((positions == 0).sum()) >= 2


def test_labels_of_a_batch_are_the_assistant_tokens_only():
    tokenizer = byte_level_tokenizer()
    batch = ChatCollator(tokenizer, chat_template="chatml", train_on="last")([chat_example(CHATS[1])])
    labelled = tokenizer.decode([t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX])
    assert labelled == "A pear.<|im_end|>\n"


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("chat") / "run"
    code = main(["train", str(SMOKE_CHAT), "--no-progress", "--set", f"output_dir={run}",
                 *sum((["--set", f"data.options.train_file={ROOT / 'configs/data/smoke_chat.jsonl'}"],
                       *(["--set", o] for o in FAST)), [])])
    assert code == 0
    return run


def test_a_chat_run_reports_generation_metrics_and_loss(chat_run):
    summary = json.loads((chat_run / "summary.json").read_text())
    assert summary["metric"] == "exact_match"
    metrics = summary["fine_tuned"]["metrics"]
    assert {"exact_match", "contains", "token_f1", "loss", "perplexity"} <= set(metrics)
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    assert set(summary["differences"]) == {"contains", "token_f1"}
    assert len(summary["fine_tuned"]["generations"]) == summary["fine_tuned"]["n"] == 8
    text = (chat_run / "summary.md").read_text()
    assert "contains:" in text and "held-out loss per assistant token" in text
    events = [json.loads(line) for line in (chat_run / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("split") == "test" and "contains" in e.get("metrics", {}) for e in events)
    losses = [e["loss"] for e in events if "loss" in e]
    assert len(losses) == 4 and all(map(lambda v: v == v, losses))


@pytest.mark.parametrize("override,key", [
    ("data.packing=false", "data.packing"),
    ("data.train_on=last", "data.train_on"),
    ("data.chat_template='{% for m in messages %}{{ m.content }}{% endfor %}'", "data.chat_template"),
])
def test_the_chat_keys_are_part_of_the_resume_identity(chat_run, tmp_path, override, key):
    import shutil

    from moelora.finetune.trainer import Trainer

    run = tmp_path / "run"
    shutil.copytree(chat_run, run)
    (run / "summary.json").unlink()  # an unfinished run, to resume
    config = load_config(SMOKE_CHAT, [f"output_dir={run}", f"data.options.train_file={ROOT / 'configs/data/smoke_chat.jsonl'}",
                                      *FAST, override])
    with pytest.raises(moelora.ConfigError, match=rf"different settings(.|\n)*\n  {key}"):
        Trainer(config, progress=False).run(resume=True)


def test_a_packed_run_trains_like_an_unpacked_one(tmp_path):
    """Same data, same order: the packed run's losses equal the padded run's."""
    curves = {}
    for packing in ("true", "false"):
        config = load_config(SMOKE_CHAT, [f"output_dir={tmp_path / packing}", *FAST, f"data.packing={packing}",
                                          "eval.zero_shot=false", "train.eval_every=0"])
        config.data.options["train_file"] = str(ROOT / "configs/data/smoke_chat.jsonl")
        from moelora.finetune.trainer import Trainer

        trainer = Trainer(config, progress=False)
        trainer.setup()
        trainer.fit()
        curves[packing] = [json.loads(line)["loss"] for line in (tmp_path / packing / "metrics.jsonl").read_text()
                           .splitlines() if "loss" in json.loads(line)]
        trainer.close()
    assert curves["true"] == pytest.approx(curves["false"], rel=1e-4)


def test_conversations_whose_answer_cannot_fit_are_skipped_and_counted(tmp_path, caplog):
    long = "word " * 60
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": [user(f"q{i}"), assistant("short")]} for i in range(30)]
                       + [{"messages": [user("q"), assistant(long)]}] * 2)
    config = load_config(SMOKE_CHAT, [f"output_dir={tmp_path}/run", "data.max_length=64",
                                      f"data.options.train_file={path}", "data.options.test_file=" + str(path)])
    runtime = TaskRuntime.load(config)
    _, tokenizer = load_model_and_tokenizer("random-llama", random_config=config.model.random_config)
    runtime.attach(torch.nn.Linear(1, 1), tokenizer)
    before = len(runtime.task.train)
    with caplog.at_level(logging.WARNING):
        lengths = runtime.train_lengths()
    assert runtime.skipped >= 1 and len(lengths) == before - runtime.skipped == len(runtime.task.train)
    assert "their last answer does not fit data.max_length=64" in caplog.text and max(lengths) <= 64


def test_the_chat_demo_config_loads():
    config = load_config(ROOT / "configs" / "chat_arithmetic.yaml")
    assert config.data.task == "bigbench:arithmetic/2_digit_addition" and config.data.options == {"generative": True}
    assert config.model.name == "smollm2-135m-instruct" and config.data.chat_template is None


# ------------------------------------------------------------------------------------------------ metrics
def test_answer_normalisation_and_metrics():
    assert normalize_answer("The answer: 12.") == "answer 12" and normalize_answer("-765.") == "-765"
    assert normalize_answer("0.5") == "0.5" and normalize_answer("3,000") == "3000"
    assert exact_match(" 12. ", ["12"]) and not exact_match("112", ["12"]) and exact_match("Four", ["4", "four"])
    assert contains("I think it is 12, yes", ["12"]) and not contains("112", ["12"]) and not contains("-12", ["12"])
    assert token_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert token_f1("", [""]) == 1.0 and token_f1("x", ["y"]) == 0.0
    import re
    pattern = re.compile(r"answer is (-?\d+)")
    assert extract_answer_text("so the answer is 42.", pattern) == "42" and extract_answer_text("none", pattern) == ""
    assert extract_answer_text("  7 \n", None) == "7"


def test_generative_evaluation_scores_generations_and_round_trips(tmp_path):
    model, tokenizer = load_model_and_tokenizer("random-llama", random_config={"hidden_size": 64,
                                                "intermediate_size": 128, "num_hidden_layers": 2})
    task = load_task("chat_file", train_file=ROOT / "configs/data/smoke_chat.jsonl")
    result = evaluate(model, tokenizer, task, task.test[:6], chat_template="chatml", max_new_tokens=3, max_length=128)
    assert result.method == "generate" and result.n == 6 and len(result.generations) == 6
    assert set(result.intervals) == {"exact_match", "contains", "token_f1"}
    assert result.metrics["loss"] > 0 and result.metrics["loss_tokens"] > 0
    again = EvalResult.from_dict(json.loads(json.dumps(result.to_dict())))
    bounds = {k: (v.low, v.high) for k, v in result.intervals.items()}
    assert {k: (v.low, v.high) for k, v in again.intervals.items()} == bounds
    assert again.per_example == result.per_example
    with pytest.raises(moelora.ConfigError, match="generative"):
        evaluate(model, tokenizer, task, task.test[:2], method="loglik", chat_template="chatml")


# ------------------------------------------------------------------------------------------------ generation
def test_escapes_are_decoded_explicitly():
    assert decode_escapes(r"a\nb\tc\\n\d") == "a\nb\tc\\n\\d"


def test_the_streamer_holds_back_a_stop_marker():
    tokenizer = byte_level_tokenizer()
    out = io.StringIO()
    streamer = _Streamer(tokenizer, out, "<|im_end|>")
    streamer.put(torch.tensor([[1, 2]]))  # the prompt: not written
    for token in tokenizer("hello<|im_end|>ignored", add_special_tokens=False)["input_ids"]:
        streamer.put(torch.tensor([token]))
        assert "<" not in out.getvalue()
    streamer.end()
    assert out.getvalue() == "hello\n"


class _Echo:
    """A stand-in generator recording the conversations it is asked to answer."""

    def __init__(self):
        self.seen = []

    def reply(self, messages, options, stream=None):
        self.seen.append([dict(m) for m in messages])
        answer = f"#{len(self.seen)}"
        stream.write(answer + "\n")
        return answer


def test_the_chat_loop_keeps_history_resets_and_exits():
    lines = iter(["hello", "and\\nmore", "/reset", "again", "/exit", "never read"])
    echo, out = _Echo(), io.StringIO()
    turns = chat_loop(echo, SamplingOptions(), system="sys", read=lambda _: next(lines), out=out)
    assert turns == 3
    assert echo.seen[1] == [{"role": "system", "content": "sys"}, user("hello"), assistant("#1"), user("and\nmore")]
    assert echo.seen[2] == [{"role": "system", "content": "sys"}, user("again")]
    assert "(history cleared)" in out.getvalue()
    ended = chat_loop(_Echo(), SamplingOptions(), read=lambda _: (_ for _ in ()).throw(EOFError), out=io.StringIO())
    assert ended == 0


def test_sampling_is_seeded_and_options_are_checked():
    model, tokenizer = load_model_and_tokenizer("random-llama", random_config={"hidden_size": 64,
                                                "intermediate_size": 128, "num_hidden_layers": 2})
    from moelora.finetune.data.chat import CHATML_TEMPLATE

    generator = Generator(model.eval(), tokenizer, CHATML_TEMPLATE)
    options = SamplingOptions(max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=50, seed=3)
    messages = [user("hi")]
    assert generator.reply(messages, options) == generator.reply(messages, options)
    greedy = SamplingOptions(max_new_tokens=6)
    assert generator.reply(messages, greedy) == generator.reply(messages, greedy)
    for bad in ({"top_p": 0.0}, {"temperature": -1.0}, {"top_k": -1}, {"max_new_tokens": 0}):
        with pytest.raises(moelora.ConfigError):
            SamplingOptions(**bad)


def test_generate_uses_the_chat_template_and_streams(chat_run, capsys):
    assert main(["generate", str(chat_run), r"What is 1 plus 1?\nQuick.", "--max-new-tokens", "4",
                 "--system", "Be brief.", "--temperature", "0.7", "--seed", "1"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["generate", str(chat_run), "plain text", "--no-chat", "--max-new-tokens", "3"]) == 0
    assert main(["generate", str(chat_run), "x", "--no-chat", "--system", "s"]) == 2
    assert "--system needs the chat template" in capsys.readouterr().err
    assert main(["generate", str(chat_run), "x", "--top-p", "0"]) == 2


def test_moelora_chat_through_stdin(chat_run):
    proc = subprocess.run(
        [sys.executable, "-m", "moelora", "chat", str(chat_run), "--max-new-tokens", "3"],
        input="What is 2 plus 2?\n/reset\nSpell cat backwards.\n", capture_output=True, text=True, timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2 and "(history cleared)" in proc.stdout
    assert "/reset clears the history" in proc.stderr


def test_eval_of_a_chat_run_generates_and_refuses_loglik(chat_run, capsys):
    assert main(["eval", str(chat_run), "--no-progress", "--max-examples", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "generate" and result["n"] == 3 and "contains" in result["metrics"]
    assert main(["eval", str(chat_run), "--method", "loglik"]) == 2
    assert "generative task" in capsys.readouterr().err
