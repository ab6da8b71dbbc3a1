"""Generation from a fine-tuned model: sampling options, the chat template, streaming, an interactive chat.

``Generator(model, tokenizer, template)`` answers a conversation (``reply``) or continues a plain text
(``complete``), printing tokens as they come when given a stream. ``chat_loop`` is the interactive loop
of ``moelora chat``: one line per user turn, the history kept, ``/reset`` to start over, ``/exit`` or
end of input (Ctrl-D) to leave.

Escapes: a prompt typed on a command line cannot hold a newline easily, so ``decode_escapes`` reads
``\\n`` as a newline, ``\\t`` as a tab and ``\\\\`` as one backslash; any other backslash stays as it is.
(``moelora generate --raw`` passes the prompt verbatim.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

import torch
from torch import nn

from ..errors import ConfigError
from .data.chat import end_of_turn, render
from .data.collate import pad_token_id
from .eval.generation import stop_tokens

_ESCAPES = re.compile(r"\\(\\|n|t)")
_ESCAPED = {"\\": "\\", "n": "\n", "t": "\t"}


def decode_escapes(text: str) -> str:
    """``\\n`` -> newline, ``\\t`` -> tab, ``\\\\`` -> backslash; other backslashes are kept."""
    return _ESCAPES.sub(lambda m: _ESCAPED[m.group(1)], text)


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are chosen.

    Attributes:
        max_new_tokens: at most this many generated tokens.
        temperature: 0 is greedy decoding; above 0 samples from the softmax at this temperature.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (1: all).
        top_k: keep the ``top_k`` most likely tokens (0: all).
        seed: the sampling seed (the same seed and prompt give the same text).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0: no limit), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class _Streamer:
    """Writes generated text to ``out`` as it grows (transformers' streamer protocol: ``put``, ``end``).

    The whole generated sequence is decoded each time, so multi-byte characters and merges come out
    right; text is held back while it may be the start of ``stop_text`` or ends in an incomplete
    character, and nothing after ``stop_text`` is written.
    """

    def __init__(self, tokenizer: Any, out: IO[str], stop_text: str | None) -> None:
        self.tokenizer, self.out, self.stop_text = tokenizer, out, stop_text
        self.ids: list[int] = []
        self.written = 0
        self.prompt_seen = False
        self.stopped = False

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop_text and self.stop_text in text:
            self.stopped = True
            text = text[: text.index(self.stop_text)]
        return text

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self._text()
        safe = len(text.rstrip("\ufffd"))
        if self.stop_text and not self.stopped:
            for k in range(min(len(self.stop_text) - 1, safe), 0, -1):
                if text[:safe].endswith(self.stop_text[:k]):
                    safe -= k
                    break
        self._write(text[:safe])

    def end(self) -> None:
        self._write(self._text())
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        if len(text) > self.written:
            self.out.write(text[self.written :])
            self.out.flush()
            self.written = len(text)


class Generator:
    """Generates with ``model`` (eval mode); ``template`` is the chat template of a chat model or
    ``None`` for plain completion.

    ``reply(messages)`` renders the conversation with the generation prompt and returns the assistant's
    answer, stopping at eos or the template's end of turn; ``complete(prompt)`` continues a plain text.
    Both print the tokens to ``stream`` as they come, when it is given.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, template: str | None = None) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.stop_ids: list[int] = []
        self.stop_text: str | None = None
        if template is not None:
            self.stop_ids, self.stop_text = end_of_turn(tokenizer, template)

    def reply(self, messages: Sequence[dict[str, str]], options: SamplingOptions = SamplingOptions(),
              stream: IO[str] | None = None) -> str:
        if self.template is None:
            raise ConfigError("this model has no chat template: use complete(), or choose a template")
        text = render(self.tokenizer, list(messages), add_generation_prompt=True, template=self.template)
        return self._generate(text, options, stream)

    def complete(self, prompt: str, options: SamplingOptions = SamplingOptions(),
                 stream: IO[str] | None = None) -> str:
        prefix = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return self._generate(prefix, options, stream)

    def _generate(self, prompt: str | list[int], options: SamplingOptions, stream: IO[str] | None) -> str:
        from transformers import GenerationConfig

        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else prompt
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        stops = stop_tokens(self.model, self.tokenizer, self.stop_ids)
        sampling: dict[str, Any] = {"do_sample": False}
        if not options.greedy:
            sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p,
                        "top_k": options.top_k or None}
        config = GenerationConfig(max_new_tokens=options.max_new_tokens, num_beams=1, pad_token_id=pad_token_id(
            self.tokenizer), eos_token_id=stops or None, **sampling)
        streamer = _Streamer(self.tokenizer, stream, self.stop_text) if stream is not None else None
        generate = cast(Callable[..., torch.Tensor], self.model.generate)
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(options.seed)
            out = generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                           streamer=streamer)
        text = self.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
        return text.split(self.stop_text)[0] if self.stop_text else text


RESET, EXIT = "/reset", "/exit"


def chat_loop(generator: Generator, options: SamplingOptions, *, system: str | None = None,
              read: Callable[[str], str] = input, out: IO[str] | None = None) -> int:
    """The interactive chat: returns the number of answered turns when the user leaves.

    Each line read (escapes decoded) is a user turn; the streamed answer joins the history. ``/reset``
    clears the history (the system message stays); ``/exit`` or end of input leaves.
    """
    import sys

    out = out or sys.stdout
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    start = len(history)
    turns = 0
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return turns
        command = line.strip()
        if command == EXIT:
            return turns
        if command == RESET:
            del history[start:]
            out.write("(history cleared)\n")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": decode_escapes(line)})
        out.write("assistant> ")
        out.flush()
        answer = generator.reply(history, options, stream=out)
        history.append({"role": "assistant", "content": answer})
        turns += 1
