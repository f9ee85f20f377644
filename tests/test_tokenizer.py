"""Tokenizer: known Qwen3 ids, added tokens, tiktoken parity, save/load, SentencePiece wrapper."""

import base64
import json
import random
import re
import unicodedata

import pytest
from hypothesis import example, given, settings, strategies as st
import sentencepiece as spm
import tiktoken

from qwen3_jax import tokenizer as tokenizer_module
from qwen3_jax.ids import END_THINK_ID, ENDOFTEXT_ID, IM_END_ID, IM_START_ID, STOP_THINKING_TEXT, THINK_ID
from qwen3_jax.tokenizer import ADDED_TOKENS, Tokenizer

# The reference below is written out from the official Qwen2/Qwen3 tokenizer.json, not taken from
# the code: its pre-tokenizer Split regex, and its added tokens in id order from 151643 (the first
# 14 special); the normalizer (NFC) is applied with unicodedata.
OFFICIAL_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
OFFICIAL_ADDED = (
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|> "
    "<|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|> "
    "<tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|> "
    "<tool_response> </tool_response> <think> </think>"
).split()
OFFICIAL_NUM_SPECIAL = 14

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "Ünïcödé façade naïve — “quotes” … ½ ∑ ∫ √2",
    "中文分词测试：你好，世界！日本語のテキスト。한국어 문장입니다.",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇯🇵 and a lone ZWJ \u200d",
    "def f(x):\n\tif x  >  1:\n        return x ** 2  # comment\n\n\n    return None\r\n",
    "   leading and trailing spaces   ",
    "numbers 3.14159 1,000,000 0x1F 2024-05-06",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<think>\nhmm\n</think>\n\nok<|endoftext|>",
    "",
]

TIKTOKEN_CORPUS = ROUND_TRIP_TEXTS + [
    "I'm sure they'll say it's THE END'S start, we've seen it, you'd know.",
    "USER'Data and IT'Test",  # contractions match in any case: "'D" + "ata", not "'" + "Data"
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم שלום עולם",
    "tabs\tand\t\tnewlines\n\n\n  \n mixed \u00a0nbsp\u3000ideographic space",
    "x = [i**2 for i in range(10) if i % 2 == 0]  # list comp; s = 'a\\nb'",
    "<div class=\"a\">&amp; &lt;tag&gt;</div> https://example.com/path?q=1&r=2#frag",
    "e\u0301 vs é, Å vs A\u030a (NFC composes both)",
    "1234567890 ١٢٣ ४५६ ⅷ ² ₃",
    "２０２５年１０月",  # fullwidth "１０" and "２０" are the vocabulary's only multi-digit tokens: digits split anyway
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "!!!???...,,,;;;:::'''\"\"\"```~~~",
]


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory) -> Tokenizer:
    """Built from the ranks in an empty cache directory, so these tests exercise the build, not a
    tokenizer.json cached by an earlier (possibly different) build."""
    return Tokenizer.qwen3(cache_dir=tmp_path_factory.mktemp("qwen3-tokenizer-cache"))


def test_default_cache_holds_what_the_build_gives(qwen3):
    """A cached tokenizer.json from an older build with the same version key would be used
    everywhere else (tests included); bump _BUILD_VERSION when the build changes."""
    cached = Tokenizer.qwen3()
    for text in TIKTOKEN_CORPUS:
        assert cached.encode(text) == qwen3.encode(text), text


@pytest.fixture(scope="session")
def ranks() -> dict[bytes, int]:
    data = tokenizer_module._qwen_rank_file().read_bytes()
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in data.splitlines() if line)}


def test_known_encodings(qwen3):
    assert qwen3.encode("<|im_start|>user\nHello, world! 12345<|im_end|>\n") == [
        151644, 872, 198, 9707, 11, 1879, 0, 220, 16, 17, 18, 19, 20, 151645, 198,
    ]
    assert qwen3.encode("<|im_start|>assistant\n") == [151644, 77091, 198]
    assert qwen3.encode("") == []  # no BOS


def test_ids_and_attributes(qwen3):
    assert (ENDOFTEXT_ID, IM_START_ID, IM_END_ID, THINK_ID, END_THINK_ID) == (
        151643, 151644, 151645, 151667, 151668,
    )
    assert qwen3.eos_ids == (IM_END_ID, ENDOFTEXT_ID)
    assert (qwen3.think_id, qwen3.end_think_id) == (THINK_ID, END_THINK_ID)
    assert qwen3.vocab_size == 151_669
    assert qwen3.token_to_id("<|im_end|>") == IM_END_ID
    assert qwen3.token_to_id("not-a-token") is None


def test_added_tokens_are_single_ids(qwen3):
    assert ADDED_TOKENS == tuple(
        (151643 + k, content, k < OFFICIAL_NUM_SPECIAL) for k, content in enumerate(OFFICIAL_ADDED)
    )
    for i, content, special in ADDED_TOKENS:
        assert qwen3.encode(content) == [i]
        assert qwen3.encode(f"a{content}b")[1] == i
        assert qwen3.decode([i]) == content
        # skip_special_tokens drops exactly the `special` ones; <think>/</think> survive.
        assert qwen3.decode([i], skip_special_tokens=True) == ("" if special else content)


def test_stop_thinking_ids(qwen3):
    ids = qwen3.stop_thinking_ids
    assert len(ids) == 24
    assert ids[-2:] == (END_THINK_ID, qwen3.encode("\n\n")[0])
    assert qwen3.decode(ids) == STOP_THINKING_TEXT


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_round_trip(qwen3, text):
    assert qwen3.decode(qwen3.encode(text)) == text


def test_nfc_normalization(qwen3):
    assert qwen3.encode("e\u0301") == qwen3.encode("é")
    assert qwen3.decode(qwen3.encode("Cafe\u0301")) == "Café"


_ADDED_RE = re.compile("|".join(map(re.escape, sorted(OFFICIAL_ADDED, key=len, reverse=True))))


def expected_round_trip(text: str) -> str:
    """What the official tokenizer gives back: added-token strings as they are, and each stretch
    of text between them in NFC (its normalizer runs on the stretches, after added tokens are
    split off)."""
    out, start = [], 0
    for match in _ADDED_RE.finditer(text):
        out += [unicodedata.normalize("NFC", text[start:match.start()]), match.group()]
        start = match.end()
    return "".join(out) + unicodedata.normalize("NFC", text[start:])


TEXT_WITH_SPECIALS = st.lists(st.text(max_size=12) | st.sampled_from(OFFICIAL_ADDED), max_size=8).map("".join)


@settings(max_examples=300, deadline=None)
@given(TEXT_WITH_SPECIALS)
@example("<|im_end|>\u0338")  # NFC of the whole would fuse ">" and U+0338 into "≯" and lose the token
@example("Cafe\u0301<think>e\u0301")
def test_round_trip_of_any_text(qwen3, text):
    assert qwen3.decode(qwen3.encode(text)) == expected_round_trip(text)
    if text == expected_round_trip(text):  # NFC text (most text) comes back exactly
        assert qwen3.decode(qwen3.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40) | st.booleans() | st.floats(), max_size=4))
def test_decode_names_ids_that_are_not_token_ids(qwen3, ids):
    if all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**32 for i in ids):
        assert isinstance(qwen3.decode(ids), str)
    else:
        with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 2\*\*32\)"):
            qwen3.decode(ids)


def test_matches_tiktoken(qwen3, ranks):
    """The same ranks with the official regex, added tokens and NFC through tiktoken give
    identical ids (with and without add_special_tokens: Qwen3 has no BOS)."""
    enc = tiktoken.Encoding(
        "qwen3-reference",
        pat_str=OFFICIAL_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={content: 151643 + k for k, content in enumerate(OFFICIAL_ADDED)},
    )
    rng = random.Random(0)
    vocab = list(ranks)
    # Concatenated random vocab entries exercise many merges the hand-written corpus misses.
    random_texts = [
        b"".join(rng.choice(vocab) for _ in range(rng.randint(1, 30))).decode("utf-8", "replace")
        for _ in range(500)
    ]
    for text in TIKTOKEN_CORPUS + random_texts:
        expected = enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert qwen3.encode(text) == expected, text
        assert qwen3._backend.encode(text, add_special_tokens=True).ids == expected, text


def test_qwen3_cache(tmp_path, monkeypatch, qwen3):
    builds = []

    def fake_build(rank_bytes):
        builds.append(len(rank_bytes))
        return qwen3._backend

    monkeypatch.setattr(tokenizer_module, "build_qwen3_tokenizer", fake_build)
    first = Tokenizer.qwen3(cache_dir=tmp_path)
    (cached,) = tmp_path.glob("qwen3-tokenizer-v*-*.json")
    second = Tokenizer.qwen3(cache_dir=tmp_path)
    assert len(builds) == 1  # the second call read the cache
    assert first.encode("cache hit?") == second.encode("cache hit?") == qwen3.encode("cache hit?")
    assert not list(tmp_path.glob("*.tmp"))
    assert cached.stat().st_size > 1_000_000


def test_build_rejects_bad_ranks():
    with pytest.raises(ValueError, match="not contiguous"):
        tokenizer_module.build_qwen3_tokenizer(b"IQ== 0\nIg== 2\n")
    with pytest.raises(ValueError, match="malformed tiktoken rank line"):
        tokenizer_module.build_qwen3_tokenizer(b"IQ== 0\nnot-a-rank-line\n")
    with pytest.raises(ValueError, match="expected 151643"):
        tokenizer_module.build_qwen3_tokenizer(b"IQ== 0\nIg== 1\n")


def test_save_and_load_round_trip(qwen3, tmp_path):
    qwen3.save(tmp_path)
    loaded = Tokenizer.from_checkpoint(tmp_path)
    assert loaded.vocab_size == qwen3.vocab_size
    for text in ROUND_TRIP_TEXTS:
        assert loaded.encode(text) == qwen3.encode(text)
    assert loaded.eos_ids == qwen3.eos_ids
    assert loaded.stop_thinking_ids == qwen3.stop_thinking_ids
    ids = qwen3.encode(ROUND_TRIP_TEXTS[-2])
    assert loaded.decode(ids, skip_special_tokens=True) == qwen3.decode(ids, skip_special_tokens=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == ("<|im_end|>", "<|endoftext|>", None)
    assert config["added_tokens_decoder"][str(THINK_ID)]["special"] is False


def test_saved_directory_loads_in_transformers(qwen3, tmp_path):
    transformers = pytest.importorskip("transformers")
    qwen3.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TIKTOKEN_CORPUS:
        assert hf.encode(text, add_special_tokens=False) == qwen3.encode(text), text
        assert hf.encode(text, add_special_tokens=True) == qwen3.encode(text), text  # no BOS
    assert hf.eos_token_id == IM_END_ID and hf.bos_token_id is None


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.from_sentencepiece(tmp_path / "missing.model")
    with pytest.raises(TypeError, match="backend"):
        Tokenizer("not a backend")


# ---- SentencePiece ------------------------------------------------------------------------------

SP_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def test_sentencepiece_wrapper(sp_model, tmp_path):
    tok = Tokenizer.from_sentencepiece(sp_model)
    proc = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids = {piece: proc.piece_to_id(piece) for piece in SP_CONTROL}
    assert tok.eos_ids == (ids["<|im_end|>"], ids["<|endoftext|>"])
    assert (tok.think_id, tok.end_think_id) == (ids["<think>"], ids["</think>"])
    assert tok.vocab_size == proc.get_piece_size() == 400
    assert tok.token_to_id("<|im_start|>") == ids["<|im_start|>"]
    assert tok.token_to_id("<|vision_pad|>") is None

    encoded = tok.encode("<|im_start|>the fox<think>lazy dog</think>now<|im_end|>")
    for piece in ["<|im_start|>", "<think>", "</think>", "<|im_end|>"]:
        assert encoded.count(ids[piece]) == 1  # control tokens are kept whole
    assert proc.bos_id() not in encoded
    assert tok.decode(encoded) == "<|im_start|>the fox<think>lazy dog</think>now<|im_end|>"
    assert tok.decode(encoded, skip_special_tokens=True) == "the fox<think>lazy dog</think>now"
    assert tok.stop_thinking_ids == tuple(proc.encode(STOP_THINKING_TEXT))
    assert Tokenizer.from_sentencepiece(sp_model, stop_thinking_ids=[5, 6]).stop_thinking_ids == (5, 6)

    tok.save(tmp_path)
    reloaded = Tokenizer.from_checkpoint(tmp_path)
    assert reloaded.encode("the quick dog<|im_end|>") == tok.encode("the quick dog<|im_end|>")
