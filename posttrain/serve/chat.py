"""``posttrain chat``: talk to a model in the terminal, with the conversation kept as history.

Commands: ``/reset`` forgets the conversation, ``/system TEXT`` sets the system prompt (and
resets; ``/system`` alone removes it), ``/exit`` (or end of input) quits. The reply streams to
the terminal token by token; Ctrl-C during a reply stops it (the turn is then forgotten).
"""

from __future__ import annotations

import sys
from typing import TextIO

from posttrain.errors import PosttrainError
from posttrain.serve.engine import Backend, Sampling, Sequence
from posttrain.serve.schemas import ApiError

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), /exit"


def chat_loop(backend: Backend, *, model: str | None = None, system: str | None = None, temperature: float = 0.7,
              top_p: float = 1.0, max_tokens: int = 256, seed: int | None = None, stdin: TextIO | None = None,
              stdout: TextIO | None = None, prompt: str = "you> ", reply_prefix: str = "assistant> ") -> int:
    """Read lines from ``stdin``, write replies to ``stdout``; returns how many replies were given."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if not backend.has_chat_template:
        raise PosttrainError("this model's tokenizer has no chat template, so it cannot chat")
    try:
        model_id = backend.resolve(model)
    except ApiError as exc:
        raise PosttrainError(exc.message) from None
    try:
        Sampling(max_tokens, temperature, top_p, seed)
    except ValueError as exc:
        raise PosttrainError(str(exc)) from None
    adapter = backend.adapter_of(model_id)
    history: list[dict] = []
    replies = 0

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    write(f"chatting with {model_id} ({HELP})\n")
    if system:
        write(f"[system prompt: {system}]\n")
    while True:
        write(prompt)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:  # end of input
            write("\n")
            return replies
        line = line.rstrip("\r\n")
        command, _, argument = line.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return replies
        if command == "/reset":
            history.clear()
            write("[conversation reset]\n")
            continue
        if command == "/system":
            system = argument.strip() or None
            history.clear()
            write(f"[system prompt: {system}; conversation reset]\n" if system else
                  "[system prompt removed; conversation reset]\n")
            continue
        if command.startswith("/"):
            write(f"[unknown command {command}; {HELP}]\n")
            continue
        if not line.strip():
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": line})
        try:
            prompt_ids = backend.chat_prompt(messages)
            budget = backend.fit(len(prompt_ids), max_tokens, param="messages")
        except ApiError as exc:
            write(f"[{exc.message}; /reset starts a new conversation]\n")
            continue
        seq = Sequence(prompt_ids, Sampling(budget, temperature, top_p, seed, ()), adapter,
                       on_text=lambda text, finish: write(text))
        write(reply_prefix)
        try:
            backend.generate([seq])
        except KeyboardInterrupt:
            write(" [stopped]\n")
            continue
        note = " [cut at --max-tokens]" if seq.finish_reason == "length" else ""
        write(f"{note}\n")
        history += [messages[-1], {"role": "assistant", "content": seq.text}]
        replies += 1
