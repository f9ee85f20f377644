"""One prompt in, thinking and answer out.

    python -m infer.generate --checkpoint DIR [--step N] --prompt "..." [--no_thinking] [--thinking_budget N]
"""

from __future__ import annotations

import sys

from absl import app, flags

from infer import cli_common
from infer.messages import complete

PROMPT = flags.DEFINE_string("prompt", None, "The user message.", required=True)
SYSTEM = flags.DEFINE_string("system", None, "Optional system message.")


def main(argv: list[str]) -> None:
    del argv
    engine, tokenizer = cli_common.load()
    messages = ([{"role": "system", "content": SYSTEM.value}] if SYSTEM.value else []) + [
        {"role": "user", "content": PROMPT.value}
    ]
    try:
        (result,) = complete(
            engine, tokenizer, [messages], max_new_tokens=cli_common.MAX_NEW_TOKENS.value,
            enable_thinking=not cli_common.NO_THINKING.value, thinking_budget=cli_common.THINKING_BUDGET.value,
            seed=cli_common.SEED.value, **cli_common.sampling_overrides(),
        )
    except ValueError as e:  # bad sampling parameters, over-long prompt, negative budget
        sys.exit(f"error: {e}")
    print(f"=== thinking ===\n{result.thinking}\n=== answer ===\n{result.answer}")
    print(f"({len(result.token_ids)} tokens)", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
