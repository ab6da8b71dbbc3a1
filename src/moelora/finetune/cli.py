"""``moelora`` command line: parse, build dataclasses, call the library.

Errors the user can fix (``moelora.MoELoRAError``: configuration, data, adapter and training errors) are
one line on stderr, exit 2 for mistakes in what was given (configuration and data) and 1 for the others;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import get_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything this tool loads is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ..errors import ConfigError, MoELoRAError
from .data.errors import DataError
from .errors import RunFolderError
from .eval.evaluate import LMEvalMethod
from .run_config import dump_config, format_keys, load_config


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a model (the embedded default job without CONFIG)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configuration keys (YAML sections, or --set section.key=value):\n" + format_keys(),
    )
    p.add_argument("config", nargs="?", help="YAML run configuration (default: the embedded default job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=20 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="clear a non-empty output_dir first (a new run)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration (YAML) and exit")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a local model folder's own Python code run (never read from a config file)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a finished run's adapter on held-out data")
    p.add_argument("run_dir")
    p.add_argument("--data", help="task to evaluate on (default: the run's task)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--method", choices=get_args(LMEvalMethod), help="default: the run's eval.method")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--harness", metavar="TASK[,TASK]",
                   help="evaluate on lm-evaluation-harness tasks instead (needs pip install lm-eval)")
    p.add_argument("--harness-include", metavar="FOLDER", help="a folder of your own lm-eval task YAML files")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: the run's train.device)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder's own Python code run (never taken from the run folder)")
    p.add_argument("--no-progress", action="store_true")


def _add_sampling(p) -> None:
    p.add_argument("run_dir")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--system", help="a system message before the conversation (chat template only)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: the run's train.device)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder's own Python code run (never taken from the run folder)")


ESCAPES_HELP = r"in the text, \n is a newline, \t a tab and \\ a backslash"


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text with a finished run's adapter (streamed)",
        description="Answer PROMPT with a finished run's model. A run on a chat task (or with --chat) poses it as "
                    f"a user turn through the chat template; other runs continue it as plain text; {ESCAPES_HELP} "
                    "(--raw: verbatim).",
    )
    _add_sampling(p)
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="take the prompt verbatim (no escapes)")
    template = p.add_mutually_exclusive_group()
    template.add_argument("--chat", dest="chat", action="store_true", default=None,
                          help="use the chat template even for a run on a non-chat task")
    template.add_argument("--no-chat", dest="chat", action="store_false",
                          help="plain completion even for a run on a chat task")


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat", help="talk to a finished run's model (interactive, multi-turn)",
        description=f"One line per turn; {ESCAPES_HELP}. /reset clears the history, /exit or Ctrl-D leaves.",
    )
    _add_sampling(p)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="speed comparisons against the usual alternatives")
    p.add_argument("--quick", action="store_true", help="fewer repeats and only the fast comparisons")
    p.add_argument("--json", dest="json_out", help="write the results as JSON here")
    p.add_argument("--only", action="append", default=[], help="run only these comparisons (repeatable)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), or cuda: the GPU check (parity on CUDA, then every speed ratio on the GPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelora", description="Fine-tune foundation models with a mixture of LoRA experts."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_chat(sub)
    _add_bench(sub)
    from ..reproduce.cli import add_parser as add_reproduce

    add_reproduce(sub)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"moelora: error: {message}", file=sys.stderr)
    return code


def cmd_train(args) -> int:
    from .trainer import RunAlreadyComplete, Trainer

    config = load_config(args.config, args.overrides)
    config.model.trust_remote_code = args.trust_remote_code
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    try:
        result = Trainer(config, progress=not args.no_progress).run(resume=args.resume, overwrite=args.overwrite)
    except RunAlreadyComplete as done:
        print(f"moelora: {done}")
        return 0
    if result.summary:
        print(Path(config.output_dir, "summary.md").read_text())
    return 0


def _load_run(run_dir: str, task: str | None = None, device: str | None = None, trust_remote_code: bool = False):
    """``(config, runtime, model, tokenizer)`` of a finished run: base model, adapter and trained head, on
    ``device`` (default: the run's ``train.device``)."""
    from ..adapter import load_adapter
    from .base_models import load_base_for_run
    from .checkpoint import list_checkpoints, load_other_trainable
    from .devices import check_precision, resolve_device
    from .tasks import TaskRuntime

    folder = Path(run_dir)
    if not (folder / "config.yaml").is_file() or not (folder / "adapter").is_dir():
        raise RunFolderError(f"{folder} is not a finished run folder (needs config.yaml and adapter/)")
    config = load_config(folder / "config.yaml")
    config.model.trust_remote_code = trust_remote_code  # this command's permission, not the folder's
    if task:
        config.data.task = task
    target = resolve_device(device or config.train.device)
    check_precision(config.train.precision, target)
    runtime = TaskRuntime.load(config)
    model, tokenizer = load_base_for_run(config, num_labels=runtime.task.num_labels, device=target,
                                         processor=runtime.images)
    load_adapter(model, folder / "adapter")  # with an encoder's trained head (modules_to_save)
    checkpoints = list_checkpoints(folder / "checkpoints")
    if checkpoints:  # anything else a run trained lives beside the adapter in the last checkpoint
        load_other_trainable(model, checkpoints[-1][1])
    runtime.attach(model, tokenizer)
    return config, runtime, model.eval(), tokenizer


def cmd_eval(args) -> int:
    from .devices import autocast

    if args.harness_include and not args.harness:
        raise ConfigError("--harness-include goes with --harness TASK[,TASK]")
    if args.harness:
        return _eval_harness(args)
    config, runtime, model, _ = _load_run(args.run_dir, task=args.data, device=args.device,
                                          trust_remote_code=args.trust_remote_code)
    if args.method:
        if runtime.generative and args.method != "generate":
            raise ConfigError(f"{runtime.task.name} is a generative task: it is evaluated by generation "
                              "(drop --method, or pass --method generate)")
        config.eval.method = args.method
    examples = runtime.task.split(args.split)[: args.max_examples]
    device = next(model.parameters()).device
    with autocast(config.train.precision, device):  # evaluate as the run trained
        result = runtime.evaluate(examples, progress=not args.no_progress, label=args.split)
    print(json.dumps(result.to_dict(per_example=False), indent=2))
    return 0


def _eval_harness(args) -> int:
    from .devices import autocast
    from .harness import check_harness, evaluate_harness

    check_harness()
    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    config, _, model, tokenizer = _load_run(args.run_dir, device=args.device, trust_remote_code=args.trust_remote_code)
    with autocast(config.train.precision, next(model.parameters()).device):
        results = evaluate_harness(model, tokenizer, tasks, include_path=args.harness_include,
                                   batch_size=config.eval.batch_size, limit=args.max_examples, seed=config.train.seed)
    print(json.dumps(results, indent=2, default=str))
    return 0


def _generator(args, chat: bool | None):
    """``(Generator, SamplingOptions, autocast context)`` for a finished run; ``chat`` None: the run decides."""
    from .base_models import is_encoder
    from .data.chat import resolve_chat_template
    from .devices import autocast
    from .generate import Generator, SamplingOptions

    options = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)  # checked before the model loads
    config, runtime, model, tokenizer = _load_run(args.run_dir, device=args.device,
                                                  trust_remote_code=args.trust_remote_code)
    if is_encoder(config.model.name):
        raise ConfigError(f"{args.command} needs a causal language model; this run trained an encoder classifier")
    use_template = runtime.generative if chat is None else chat
    template = resolve_chat_template(tokenizer, config.data.chat_template) if use_template else None
    if args.system and template is None:
        raise ConfigError("--system needs the chat template: this run's task is not a chat task (add --chat)")
    device = next(model.parameters()).device
    return Generator(model, tokenizer, template), options, autocast(config.train.precision, device)


def cmd_generate(args) -> int:
    from .generate import decode_escapes

    generator, options, precision = _generator(args, args.chat)
    prompt = args.prompt if args.raw else decode_escapes(args.prompt)
    with precision:
        if generator.template is None:
            generator.complete(prompt, options, stream=sys.stdout)
        else:
            system = [{"role": "system", "content": args.system}] if args.system else []
            generator.reply([*system, {"role": "user", "content": prompt}], options, stream=sys.stdout)
    return 0


def cmd_chat(args) -> int:
    from .generate import chat_loop

    generator, options, precision = _generator(args, chat=True)
    print("moelora chat: one line per turn; /reset clears the history, /exit or Ctrl-D leaves.", file=sys.stderr)
    with precision:
        chat_loop(generator, options, system=args.system)
    return 0


def cmd_bench(args) -> int:
    from ..bench.runner import run_benchmarks

    results = run_benchmarks(quick=args.quick, json_out=args.json_out, only=args.only, device=args.device)
    if args.device != "cpu":
        from ..bench.gpu_check import passed

        return 0 if passed(results) else 1
    return 0


def cmd_reproduce(args) -> int:
    from ..reproduce.cli import run_from_args

    return run_from_args(args)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "chat": cmd_chat,
            "bench": cmd_bench, "reproduce": cmd_reproduce}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the CLI owns the console: no weight-loading bars or notices from transformers
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # notices about optional CPU kernels
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError) as err:
        return _fail(str(err), 2)
    except MoELoRAError as err:
        return _fail(str(err), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
