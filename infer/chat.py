"""Interactive multi-turn chat with streaming output.

    python -m infer.chat --checkpoint DIR [--step N] [--no_thinking] [--thinking_budget N]

`/think` and `/no_think` in a message are passed to the model as text (Qwen3's soft switches);
the sampling defaults follow the last flag. Type `/clear` to start over, `/exit` or EOF to quit.
"""

from __future__ import annotations

import sys

from absl import app

from infer import cli_common
from infer.messages import chat_turn


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
                engine, tokenizer, messages, max_new_tokens=cli_common.MAX_NEW_TOKENS.value,
                write=lambda piece: print(piece, end="", flush=True),
                enable_thinking=not cli_common.NO_THINKING.value, thinking_budget=cli_common.THINKING_BUDGET.value,
                seed=cli_common.SEED.value, **cli_common.sampling_overrides(),
            )
        except ValueError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append(reply)


if __name__ == "__main__":
    app.run(main)
