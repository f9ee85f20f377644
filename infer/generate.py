"""One prompt in, thinking and answer out.

    python -m infer.generate --checkpoint DIR [--step N] --prompt "..." [--no_thinking] [--thinking_budget N]
"""

from __future__ import annotations

import sys

from absl import app, flags

from infer import cli_common
from infer.text import complete

FLAGS = flags.FLAGS


def define_flags() -> None:
    cli_common.define_flags()
    flags.DEFINE_string("prompt", None, "The user message.", required=True)
    flags.DEFINE_string("system", None, "Optional system message.")


def main(argv: list[str]) -> None:
    del argv
    engine, tokenizer = cli_common.load()
    messages = ([{"role": "system", "content": FLAGS.system}] if FLAGS.system else []) + [
        {"role": "user", "content": FLAGS.prompt}
    ]
    try:
        (result,) = complete(
            engine, tokenizer, [messages], max_new_tokens=FLAGS.max_new_tokens, enable_thinking=not FLAGS.no_thinking,
            thinking_budget=FLAGS.thinking_budget, seed=FLAGS.seed, **cli_common.sampling_overrides(),
        )
    except ValueError as e:  # bad sampling parameters, over-long prompt, negative budget
        sys.exit(f"error: {e}")
    print(f"=== thinking ===\n{result.thinking}\n=== answer ===\n{result.answer}")
    print(f"({len(result.token_ids)} tokens)", file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    app.run(main)
