"""Converts checkpoints to Hugging Face safetensors or qwen3-jax Orbax directories.

    python -m qwen3_jax.convert --src Qwen3-8B --dst qwen3-8b-jax
    python -m qwen3_jax.convert --src runs/sft [--step 2000] --dst Qwen3-8B-sft --to hf --dtype bfloat16

The source is any checkpoint `load_any` reads; the direction defaults to the other format (HF for
a trainer's), the dtype to the source's; tokenizer files are copied along. Parameters stream a
block at a time, so host memory stays about one block whatever the model's size. Single-process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Sequence

import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from qwen3_jax.checkpoint import locate_checkpoint
from qwen3_jax.config import DTYPES
from qwen3_jax.errors import CheckpointError
from qwen3_jax.hf import write_hf
from qwen3_jax.model import abstract_model
from qwen3_jax.stream import open_params, save_streamed
from qwen3_jax.tokenizer import tokenizer_dir

FORMATS = ("orbax", "hf")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwen3_jax.convert", description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="Hugging Face, qwen3-jax or trainer checkpoint (workdir, checkpoints/ or step folder)")
    p.add_argument("--step", type=int, help="step of a trainer workdir or checkpoints/ directory (default: the latest)")
    p.add_argument("--dst", required=True, help="output directory (must be absent or empty)")
    p.add_argument("--to", choices=FORMATS, help="output format (default: orbax for an HF source, else hf)")
    p.add_argument("--dtype", choices=DTYPES, help="parameter dtype of the output (default: the source's)")
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors file size limit for --to hf")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    return p


def _hf_dtype(path: str) -> str:
    """The dtype an HF checkpoint declares (transformers v5 writes `dtype`, v4 `torch_dtype`)."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    name = hf.get("dtype") or hf.get("torch_dtype")
    return name if name in DTYPES else "float32"


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    src, dst = os.path.abspath(args.src), os.path.abspath(args.dst)
    if not os.path.isdir(src):
        parser.error(f"--src {args.src} does not exist")
    try:
        src_format, weights_dir = locate_checkpoint(src, step=args.step)
    except CheckpointError as e:
        parser.error(f"--src: {e}")
    dst_format = args.to or ("orbax" if src_format == "hf" else "hf")
    if os.path.commonpath([src, dst]) in (src, dst):
        parser.error("--src and --dst must be separate directories, neither inside the other")
    if args.max_shard_gb <= 0:
        parser.error(f"--max_shard_gb must be positive, got {args.max_shard_gb}")
    if os.path.isdir(dst) and os.listdir(dst):
        if not args.overwrite:
            parser.error(f"--dst {args.dst} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(dst)
    elif os.path.exists(dst) and not os.path.isdir(dst):
        parser.error(f"--dst {args.dst} exists and is not a directory")

    # The source's dtype unless --dtype says otherwise (float32 for a trainer's master weights).
    dtype = args.dtype or (_hf_dtype(src) if src_format == "hf" else None)
    _, cfg, read = open_params(weights_dir, dtype=dtype)
    dtype = cfg.param_dtype
    params = [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))]
    with tqdm(total=len(params), desc="convert", unit="param") as bar:
        done: set[tuple] = set()

        def read_counted(param, index):
            if param not in done:
                done.add(param)
                bar.update()
            return read(param, index)

        if dst_format == "orbax":
            save_streamed(cfg, read_counted, dst)
        else:
            write_hf(cfg, read_counted, dst, dtype=jnp.dtype(dtype), max_shard_bytes=int(args.max_shard_gb * 2**30))
    files_dir = tokenizer_dir(src) or src  # a trainer checkpoint's tokenizer is in its workdir
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(files_dir, n))]
    for name in copied:
        shutil.copy2(os.path.join(files_dir, name), os.path.join(dst, name))
    origin = f" from step folder {weights_dir}" if src_format == "trainer" else ""
    print(f"wrote {dst_format} checkpoint {dst} ({dtype}{origin}; copied {', '.join(copied) or 'no tokenizer files'})")


if __name__ == "__main__":
    main()
