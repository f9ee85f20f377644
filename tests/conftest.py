"""Test set-up: eight simulated CPU devices, float32 matmuls at full precision, compile time cut, shared fixtures.

XLA_FLAGS and the JAX cache variables are set here, before jax is first imported, as environment
variables so that the subprocesses tests start inherit them: LLVM at optimisation level 0 (XLA's
HLO passes unchanged) and a persistent compilation cache fresh for each session.
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qwen3-jax-tests-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def no_torch(tmp_path_factory) -> str:
    """A directory to put first on a subprocess's PYTHONPATH so that `import torch` fails: torch is a
    test-only reference, and tensorboardX would otherwise import it (~2 s per process)."""
    path = tmp_path_factory.mktemp("no_torch")
    (path / "torch.py").write_text("raise ImportError('torch is not part of the training stack')\n")
    return str(path)


HF_KINDS = ("dense_tied", "dense", "moe")


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict:
    """{kind: (transformers model, its saved directory)} for the tiny random checkpoints of
    `helpers.hf_fixtures` (seeds 0, 1, 2). Shared: copy a directory before changing it."""
    from helpers.hf_fixtures import make_hf_model, save_hf_model  # imports torch

    out = {}
    for seed, kind in enumerate(HF_KINDS):
        hf = make_hf_model(kind, seed=seed)
        out[kind] = (hf, save_hf_model(hf, tmp_path_factory.mktemp(kind)))
    return out


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    """The Qwen3 tokenizer (from the default cache, built once per session otherwise)."""
    from qwen3_jax.tokenizer import Tokenizer

    return Tokenizer.qwen3()


SP_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A 400-piece SentencePiece BPE model with Qwen's control tokens as user-defined symbols."""
    import random

    import sentencepiece as spm

    directory = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog time user solution thinking now give".split()
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "sp"), vocab_size=400, model_type="bpe",
        user_defined_symbols=SP_CONTROL, byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )
    return directory / "sp.model"
