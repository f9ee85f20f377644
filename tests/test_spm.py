"""The miniature's SentencePiece trainer (train/miniature/spm.py) and its command line."""

from __future__ import annotations

import os
import subprocess
import sys

import sentencepiece as spm

from train.miniature.spm import CONTROL_TOKENS


def test_spm_cli_trains_model_with_control_tokens(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the cat sat on the mat, {i * 7}." for i in range(300)))
    prefix = tmp_path / "out" / "spm"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--model_prefix", str(prefix), "--vocab_size", "300"]
    cmd = [sys.executable, "-m", "train.miniature.spm", "--input", str(corpus), *args]
    subprocess.run(cmd, check=True, capture_output=True, cwd=repo)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    for token in CONTROL_TOKENS:
        assert sp.encode(token, out_type=str) == [token]
    text = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nsat"
    pieces = sp.encode(text, out_type=str)
    assert all(t in pieces for t in CONTROL_TOKENS[1:]) and sp.decode(sp.encode(text)) == text

    missing = subprocess.run(
        [*cmd[:4], str(tmp_path / "nope.txt"), *args], capture_output=True, text=True, cwd=repo
    )
    assert missing.returncode != 0 and "nope.txt" in missing.stderr
    # Issue 27: the README's --vocab_size 8000 on a small corpus says which size works.
    too_big = subprocess.run([*cmd[:-1], "8000"], capture_output=True, text=True, cwd=repo)
    assert too_big.returncode != 0 and "error: --vocab_size 8000 is more pieces than this text yields: at most" \
        in too_big.stderr and "Pass --vocab_size" in too_big.stderr and "INTERNAL" not in too_big.stderr
