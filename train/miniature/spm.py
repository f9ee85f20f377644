"""Train a small SentencePiece tokenizer that speaks Qwen3's chat format.

    python -m train.miniature.spm --input corpus.txt [--input more.txt] \
        --model_prefix out/spm --vocab_size 8000 [--model_type bpe|unigram]

writes `out/spm.model` and `out/spm.vocab`. Load it with
`qwen3_jax.tokenizer.Tokenizer.from_sentencepiece("out/spm.model")`.

Choices, and why:
- Qwen3's control tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
  `<think>`, `</think>`) are user-defined symbols, so they are always single
  pieces and are recognised inside raw text, like added tokens in HF.
- byte_fallback: every string round-trips; unseen characters (and "\n", which
  never appears inside a SentencePiece training line) become byte pieces.
- No dummy prefix, no whitespace collapsing, identity normalisation: the
  tokenizer must not alter the text, and tokenising the rendered chat segment by
  segment must give the same ids as tokenising the whole text (train.data
  relies on that to build SFT loss masks).
- No BOS (Qwen3 has none); `</s>` stays as SentencePiece's eos.

Input files are plain text, one training sentence per line.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence

import sentencepiece as spm

CONTROL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
)


def train_sentencepiece(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    extra_symbols: Sequence[str] = (),
    input_sentence_size: int = 10_000_000,
) -> str:
    """Trains a SentencePiece model and returns the path of the `.model` file.

    Args:
      inputs: text files, one sentence per line.
      model_prefix: output path prefix; `<prefix>.model` and `<prefix>.vocab`.
      vocab_size: total pieces, including the 256 byte pieces and the symbols.
      model_type: "bpe" (as Qwen3) or "unigram".
      character_coverage: share of characters covered by character pieces; the
        rest are spelled with byte pieces.
      extra_symbols: more user-defined symbols after CONTROL_TOKENS (e.g.
        "<tool_call>").
      input_sentence_size: at most this many lines are sampled for training.
    """
    if not inputs:
        raise ValueError("train_sentencepiece needs at least one input file")
    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"sentencepiece input file(s) not found: {missing}")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    out_dir = os.path.dirname(model_prefix)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    symbols = list(dict.fromkeys([*CONTROL_TOKENS, *extra_symbols]))
    spm.SentencePieceTrainer.train(
        input=list(inputs),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        user_defined_symbols=symbols,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        split_digits=True,  # as Qwen3's pre-tokenizer: one digit per token
        unk_id=0,
        bos_id=-1,
        eos_id=1,
        pad_id=-1,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        minloglevel=2,
    )
    return f"{model_prefix}.model"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.miniature.spm", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--input", action="append", required=True, help="text file; repeatable"
    )
    parser.add_argument("--model_prefix", required=True)
    parser.add_argument("--vocab_size", type=int, required=True)
    parser.add_argument("--model_type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--character_coverage", type=float, default=0.9995)
    parser.add_argument(
        "--extra_symbol", action="append", default=[],
        help="additional user-defined symbol; repeatable",
    )
    args = parser.parse_args(argv)
    try:
        path = train_sentencepiece(
            args.input,
            args.model_prefix,
            args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            extra_symbols=args.extra_symbol,
        )
    except (FileNotFoundError, RuntimeError) as e:  # RuntimeError: e.g. vocab_size too high
        most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(e))
        parser.error(str(e) if most is None else (
            f"--vocab_size {args.vocab_size} is more pieces than this text yields: at most {most[1]} (the 256 "
            f"byte pieces, the control tokens and what the text gives). Pass --vocab_size {most[1]} or less, "
            "or train on more text."))
    print(path)


if __name__ == "__main__":
    main()
