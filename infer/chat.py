"""Interactive multi-turn chat with streaming output.

    python -m infer.chat --checkpoint DIR [--step N] [--no_thinking] [--thinking_budget N]

`/think` and `/no_think` in a message are passed to the model as text (Qwen3's soft switches); the
sampling defaults and the thinking budget follow the last flag. `/clear` starts over, `/exit` or EOF quits.
"""

from __future__ import annotations

import sys

from absl import app, flags

from infer import cli_common
from infer.text import chat_turn

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    engine, tokenizer = cli_common.load()
    messages: list[dict] = []
    print("qwen3-jax chat: /clear resets, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/clear":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        try:
            reply = chat_turn(
                engine, tokenizer, messages, max_new_tokens=FLAGS.max_new_tokens,
                write=lambda piece: print(piece, end="", flush=True), enable_thinking=not FLAGS.no_thinking,
                thinking_budget=FLAGS.thinking_budget, seed=FLAGS.seed, **cli_common.sampling_overrides(),
            )
        except ValueError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append(reply)


if __name__ == "__main__":
    cli_common.define_flags()
    app.run(main)
