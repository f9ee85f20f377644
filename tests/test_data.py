"""Input pipeline (train/data.py) and SentencePiece trainer (train/spm.py)."""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen3_jax.chat import render, render_for_training
from qwen3_jax.tokenizer import Tokenizer
from train import data
from train.spm import CONTROL_TOKENS, train_sentencepiece

SEP = 1  # WordIdTokenizer's <|endoftext|>


class WordIdTokenizer:
    """Text is whitespace-separated ids, so every document's tokens are known exactly."""

    eos_ids = (SEP,)
    vocab_size = 1 << 20

    def encode(self, text: str) -> list[int]:
        return [SEP] if text == "<|endoftext|>" else [int(w) for w in text.split()]


def doc_ids(d: int, n: int) -> list[int]:
    """Document d: n distinct ids d*1000 + k (ids never collide with SEP)."""
    return [d * 1000 + k for k in range(n)]


DOC_LENGTHS = [3, 6, 2, 5, 13, 1, 4, 8, 7, 0, 17, 2]  # with L=8: 13+1 and 17+1 tokens are chunked
TEXT_RECORDS = [{"text": " ".join(map(str, doc_ids(d + 1, n)))} for d, n in enumerate(DOC_LENGTHS)]


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def config(**fields) -> ml_collections.ConfigDict:
    """A training config with a `data` section; unspecified fields keep their defaults."""
    base = {"seq_len": 8, "batch_size": 2, "num_epochs": 1, "shuffle": False, "num_threads": 2}
    return ml_collections.ConfigDict({"data": {**base, **fields}})


def batches(cfg, tokenizer, process_index=0, process_count=1, limit=None) -> list[dict]:
    it = data.make_dataset(
        cfg, tokenizer, process_index=process_index, process_count=process_count
    )
    return list(itertools.islice(it, limit))


def rows(batch_list):
    for b in batch_list:
        for r in range(b["tokens"].shape[0]):
            yield {k: v[r] for k, v in b.items()}


def segments(row):
    """(tokens, targets, loss_mask, positions) of each document piece of a row, in order."""
    seg = row["segment_ids"]
    for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        yield row["tokens"][idx], row["targets"][idx], row["loss_mask"][idx], row["positions"][idx]


@pytest.fixture(scope="module")
def text_jsonl(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("text") / "docs.jsonl", TEXT_RECORDS)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog what is two plus three five hello".split()
    lines = [
        " ".join(rng.choice(words, rng.integers(3, 15))) + rng.choice(["", ".", "?", " 42"])
        for _ in range(1500)
    ]
    corpus = tmp_path_factory.mktemp("spm") / "corpus.txt"
    corpus.write_text("\n".join(lines))
    return train_sentencepiece([str(corpus)], str(corpus.parent / "m" / "spm"), 400)


@pytest.fixture(scope="module")
def sp_tokenizer(sp_model) -> Tokenizer:
    return Tokenizer.from_sentencepiece(sp_model)


@pytest.fixture(scope="module")
def qwen3_tokenizer() -> Tokenizer:
    return Tokenizer.qwen3()


# ---- packing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", data.PACKINGS)
def test_packing_rows(text_jsonl, packing):
    out = batches(config(paths=text_jsonl, packing=packing), WordIdTokenizer())
    for b in out:
        assert b["tokens"].shape == (2, 8) and set(b) == set(data.ROW_FEATURES)
        assert {k: v.dtype for k, v in b.items()} == {
            "tokens": np.int32, "targets": np.int32, "loss_mask": np.float32,
            "segment_ids": np.int32, "positions": np.int32,
        }
    triples = collections.Counter()
    for row in rows(out):
        seg = row["segment_ids"]
        used = seg > 0
        # Segment ids count up from 1; padding (id 0) only at the end and all-zero.
        assert (np.diff(seg[used]) >= 0).all()
        assert set(np.unique(seg[used])) == set(range(1, seg.max() + 1))
        assert used[: used.sum()].all()
        for name in ("tokens", "targets", "loss_mask", "positions"):
            assert not row[name][~used].any()
        for tokens, targets, mask, positions in segments(row):
            np.testing.assert_array_equal(positions, np.arange(len(tokens)))
            np.testing.assert_array_equal(targets[:-1], tokens[1:])
        triples.update(
            zip(*(row[k][used].tolist() for k in ("tokens", "targets", "loss_mask")))
        )
    # Every token of every document (chunked ones included) appears once, with its next token as
    # target; the separator's target would be the next document, so it is not trained.
    expected = collections.Counter()
    for d, n in enumerate(DOC_LENGTHS):
        ids = doc_ids(d + 1, n) + [SEP]
        expected.update((t, nxt, 1.0) for t, nxt in zip(ids[:-1], ids[1:]))
        expected[(SEP, 0, 0.0)] += 1
    assert triples == expected


def test_first_fit_cuts_only_documents_longer_than_a_row(text_jsonl):
    """The module doc's promise: a document (with its separator) of at most L tokens lands whole in
    one row; a longer one is cut into L-token pieces."""
    out = batches(config(paths=text_jsonl, packing="first_fit"), WordIdTokenizer())
    pieces = sorted(tokens.tolist() for row in rows(out) for tokens, *_ in segments(row))
    expected = []
    for d, n in enumerate(DOC_LENGTHS):
        ids = doc_ids(d + 1, n) + [SEP]
        expected += [ids[i : i + 8] for i in range(0, len(ids), 8)]
    assert pieces == sorted(expected)


def test_concat_then_split_keeps_stream_order(text_jsonl):
    out = batches(config(paths=text_jsonl, packing="concat_then_split"), WordIdTokenizer())
    stream = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows(out)]).tolist()
    assert stream == [t for d, n in enumerate(DOC_LENGTHS) for t in doc_ids(d + 1, n) + [SEP]]


def test_long_document_chunks(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(map(str, doc_ids(5, 20)))}])
    (row0, row1, row2) = rows(batches(config(paths=path, batch_size=3), WordIdTokenizer()))
    # 20 tokens + separator = 8 + 8 + 5, each chunk its own segment from position 0; the chunk's
    # last target is the next chunk's first token and is trained.
    np.testing.assert_array_equal(row0["tokens"], doc_ids(5, 8))
    assert row0["targets"][-1] == 5008 and row0["loss_mask"][-1] == 1
    np.testing.assert_array_equal(row2["tokens"][:5], doc_ids(5, 20)[16:] + [SEP])
    np.testing.assert_array_equal(row2["positions"], [0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(row2["loss_mask"], [1, 1, 1, 1, 0, 0, 0, 0])
    assert (row1["positions"] == np.arange(8)).all() and (row1["segment_ids"] == 1).all()


def test_last_partial_batch_padded_with_empty_rows(text_jsonl):
    out = batches(config(paths=text_jsonl, batch_size=16), WordIdTokenizer())
    assert len(out) == 1 and out[0]["tokens"].shape == (16, 8)
    assert not out[0]["segment_ids"][-1].any() and not out[0]["loss_mask"][-1].any()


def test_synthetic_source_is_learnable():
    cfg = config(
        format="synthetic", synthetic_vocab_size=64, synthetic_num_docs=50, seq_len=16,
        num_epochs=None,
    )
    for row in rows(batches(cfg, None, limit=4)):
        assert row["tokens"].max() < 64
        for tokens, targets, mask, _ in segments(row):
            assert mask[:-1].all()  # every token but a document's last is trained
            steps = (targets[mask > 0] - tokens[mask > 0]) % 64
            assert len(set(steps.tolist())) == int(mask.any())  # one arithmetic progression per document
    with pytest.raises(data.DataConfigError, match="synthetic_vocab_size"):
        batches(config(format="synthetic"), None)


@pytest.mark.parametrize("tokenizer_name", ["sp_tokenizer", "qwen3_tokenizer"])
def test_text_documents_end_with_endoftext(tmp_path, request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    separator = data.document_separator_id(tokenizer)
    assert tokenizer.decode([separator]) == "<|endoftext|>"
    if tokenizer_name == "qwen3_tokenizer":
        assert separator == 151643
    text = "the quick brown fox jumps over the lazy dog 42 times."
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": text}])
    (b,) = batches(config(paths=path, seq_len=64, batch_size=1), tokenizer)
    ids = tokenizer.encode(text) + [separator]
    np.testing.assert_array_equal(b["tokens"][0, : len(ids)], ids)
    np.testing.assert_array_equal(b["loss_mask"][0], [1] * (len(ids) - 1) + [0] * (65 - len(ids)))


# ---- SFT -------------------------------------------------------------------------------------

CONVERSATIONS = {
    "thinking": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "what is two plus three?"},
        {"role": "assistant", "content": "five", "reasoning_content": "two plus three is five"},
    ],
    "non_thinking": [
        {"role": "user", "content": "hello /no_think"},
        {"role": "assistant", "content": "hello! the answer is 42."},
    ],
    "multi_turn": [
        {"role": "user", "content": "what is two plus three?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nfive"},
        {"role": "user", "content": "and plus one?"},
        {"role": "assistant", "content": "<think>\nfive plus one\n</think>\n\nsix"},
    ],
    "tools": [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21.", "reasoning_content": "the tool says 21"},
    ],
}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


def chat_record(name: str) -> dict:
    return {"messages": CONVERSATIONS[name], **({"tools": TOOLS} if name == "tools" else {})}


@pytest.mark.parametrize("tokenizer_name", ["sp_tokenizer", "qwen3_tokenizer"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_segmentwise_tokens_equal_whole_text(request, tokenizer_name, name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    record = chat_record(name)
    ids, trained = data.chat_tokens(tokenizer, record["messages"], record.get("tools"))
    assert ids == tokenizer.encode(render(record["messages"], tools=record.get("tools")))
    assert len(trained) == len(ids)


@pytest.mark.parametrize("tokenizer_name", ["sp_tokenizer", "qwen3_tokenizer"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_sft_loss_mask_covers_exactly_the_assistant_answer(tmp_path, request, tokenizer_name, name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    path = write_jsonl(tmp_path / "chat.jsonl", [chat_record(name)])
    (b,) = batches(config(paths=path, kind="chat", seq_len=2048, batch_size=1), tokenizer)
    trained_targets = b["targets"][0][b["loss_mask"][0] > 0].tolist()
    record = chat_record(name)
    parts = render_for_training(record["messages"], tools=record.get("tools"))
    answer = "".join(text for text, trained in parts if trained)
    assert answer.startswith("<think>\n") and answer.endswith("<|im_end|>")
    assert trained_targets == tokenizer.encode(answer)
    if tokenizer_name == "qwen3_tokenizer":
        assert tokenizer.decode(trained_targets) == answer
    # The trained targets are one contiguous run ending in <|im_end|>; the header and "\n" are not.
    mask = b["loss_mask"][0]
    on = np.flatnonzero(mask)
    assert (np.diff(on) == 1).all()
    n = int((b["segment_ids"][0] > 0).sum())
    assert on[-1] == n - 3  # targets: ..., <|im_end|>, "\n"; last position has no target


# ---- order, sharding, resuming ----------------------------------------------------------------


def first_tokens(cfg, n=6, **kw) -> list[list[int]]:
    return [b["tokens"].tolist() for b in batches(cfg, WordIdTokenizer(), limit=n, **kw)]


def test_shuffle_is_deterministic_per_seed(text_jsonl):
    def stream(**fields):
        return first_tokens(config(paths=text_jsonl, num_epochs=None, **fields))

    assert stream(shuffle=True, seed=1) == stream(shuffle=True, seed=1)
    assert stream(shuffle=True, seed=1) != stream(shuffle=True, seed=2)
    assert stream(shuffle=True, seed=1) != stream(shuffle=False)


def document_ids(batch_list) -> set[int]:
    return {t // 1000 for row in rows(batch_list) for t in row["tokens"].tolist() if t >= 1000}


def test_process_shards_are_disjoint_and_cover_the_data(text_jsonl):
    cfg = config(paths=text_jsonl, shuffle=True, batch_size=3)
    shards = [document_ids(batches(cfg, WordIdTokenizer(), p, 3)) for p in range(3)]
    assert all(shards)
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert set.union(*shards) == {d + 1 for d, n in enumerate(DOC_LENGTHS) if n}
    with pytest.raises(data.DataConfigError, match=r"batch_size=4 .* process_count=3"):
        batches(config(paths=text_jsonl, batch_size=4), WordIdTokenizer(), 0, 3)


def test_fixed_shards_give_the_same_global_batches_on_any_number_of_processes(text_jsonl):
    cfg = config(paths=text_jsonl, shuffle=True, num_epochs=None, batch_size=4, shards=4)
    one = batches(cfg, WordIdTokenizer(), 0, 1, limit=3)
    for count in (2, 4):
        per_process = [batches(cfg, WordIdTokenizer(), p, count, limit=3) for p in range(count)]
        for step, want in enumerate(one):
            for k in data.ROW_FEATURES:  # process 0's rows first, as global_batch assembles them
                np.testing.assert_array_equal(np.concatenate([b[step][k] for b in per_process]), want[k])
    with pytest.raises(data.DataConfigError, match=r"data.shards=3 is not a multiple of process_count=2"):
        batches(config(paths=text_jsonl, batch_size=6, shards=3), WordIdTokenizer(), 0, 2)
    with pytest.raises(data.DataConfigError, match=r"data.batch_size=4 is not divisible by data.shards=8"):
        batches(config(paths=text_jsonl, batch_size=4, shards=8), WordIdTokenizer(), 0, 1)


RESTORE_SKIPS = (0, 1, 2, 5)  # steps before the saved state
RESTORE_CHECKED = 3  # steps compared after it (skips and checks span several epochs)


@pytest.mark.parametrize("packing", data.PACKINGS)
@pytest.mark.parametrize("shards, process_count", [(None, 1), (None, 2), (4, 2), (None, 4)])
def test_iterator_state_restores_the_exact_stream(text_jsonl, packing, shards, process_count):
    """On every process, an iterator restored from the JSON state saved after any of
    RESTORE_SKIPS steps yields the batches the saved one went on to yield (reshuffled epochs)."""
    cfg = config(paths=text_jsonl, shuffle=True, seed=3, num_epochs=None, packing=packing, shards=shards,
                 batch_size=4, packing_bins=2)
    for process_index in range(process_count):
        it = data.make_dataset(cfg, WordIdTokenizer(), process_index=process_index, process_count=process_count)
        states, stream = [], []
        for _ in range(RESTORE_SKIPS[-1] + RESTORE_CHECKED):
            states.append(data.iterator_state(it))
            stream.append(next(it))
        resumed = data.make_dataset(cfg, WordIdTokenizer(), process_index=process_index, process_count=process_count)
        for skip in RESTORE_SKIPS:
            data.restore_iterator_state(resumed, states[skip])
            for step in range(skip, skip + RESTORE_CHECKED):
                got = next(resumed)
                for k in data.ROW_FEATURES:
                    np.testing.assert_array_equal(
                        got[k], stream[step][k], err_msg=f"process {process_index}, step {step}, restored at {skip}: {k}"
                    )


@pytest.mark.parametrize("packing", data.PACKINGS)
def test_orbax_checkpoint_of_iterator(tmp_path, text_jsonl, packing):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = config(paths=text_jsonl, shuffle=True, num_epochs=None, packing=packing)
    it = data.make_dataset(cfg, WordIdTokenizer(), process_index=0, process_count=1)
    next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(1, args=ocp.args.Composite(data=data.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = next(it)
        resumed = data.make_dataset(cfg, WordIdTokenizer(), process_index=0, process_count=1)
        mngr.restore(1, args=ocp.args.Composite(data=data.CheckpointRestore(resumed)))
    np.testing.assert_array_equal(next(resumed)["tokens"], want["tokens"])


# ---- sources ----------------------------------------------------------------------------------


def write_all_formats(tmp_path, records) -> dict[str, list[str]]:
    half = len(records) // 2
    parts = [records[:half], records[half:]]  # two files each: file order must be kept
    paths = {"jsonl": [], "parquet": [], "arrayrecord": []}
    for i, part in enumerate(parts):
        paths["jsonl"].append(write_jsonl(tmp_path / f"p{i}.jsonl", part))
        pq_path = str(tmp_path / f"p{i}.parquet")
        columns = sorted({k for r in records for k in r})  # from_pylist keeps row 0's keys only
        table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in part])
        pq.write_table(table, pq_path, row_group_size=2)
        paths["parquet"].append(pq_path)
        ar_path = str(tmp_path / f"p{i}.array_record")
        assert data.write_arrayrecord(ar_path, part) == len(part)
        paths["arrayrecord"].append(ar_path)
    return paths


@pytest.mark.parametrize("kind", data.KINDS)
def test_jsonl_parquet_arrayrecord_give_the_same_batches(tmp_path, sp_tokenizer, kind):
    if kind == "text":
        records, tokenizer = TEXT_RECORDS, WordIdTokenizer()
    else:  # Parquet stores messages as structs and fills absent keys with null
        records, tokenizer = [chat_record(name) for name in CONVERSATIONS], sp_tokenizer
    paths = write_all_formats(tmp_path, records)
    seq_len = 8 if kind == "text" else 1024  # chat: no sample is cut, so every one must fit
    outs = {
        fmt: batches(
            config(format=fmt, paths=p, kind=kind, shuffle=True, seed=7, seq_len=seq_len), tokenizer
        )
        for fmt, p in paths.items()
    }
    assert outs["jsonl"]
    for fmt in ("parquet", "arrayrecord"):
        assert len(outs[fmt]) == len(outs["jsonl"])
        for want, got in zip(outs["jsonl"], outs[fmt]):
            for k in data.ROW_FEATURES:
                np.testing.assert_array_equal(want[k], got[k], err_msg=f"{fmt} {k}")


def test_glob_and_missing_files(tmp_path, text_jsonl):
    glob_cfg = config(paths=[os.path.join(os.path.dirname(text_jsonl), "*.jsonl")])
    assert document_ids(batches(glob_cfg, WordIdTokenizer())) == document_ids(
        batches(config(paths=text_jsonl), WordIdTokenizer())
    )
    for pattern in (str(tmp_path / "nothing-*.jsonl"), str(tmp_path / "absent.jsonl")):
        with pytest.raises(FileNotFoundError, match="nothing-|absent"):
            batches(config(paths=[text_jsonl, pattern]), WordIdTokenizer())


def test_missing_fields_are_named(tmp_path, text_jsonl):
    with pytest.raises(data.DataError, match=r"docs.jsonl:1: the record has no field 'body'"):
        batches(config(paths=text_jsonl, text_field="body"), WordIdTokenizer())
    pq_path = str(tmp_path / "t.parquet")
    pq.write_table(pa.Table.from_pylist(TEXT_RECORDS), pq_path)
    with pytest.raises(KeyError, match="body"):
        batches(config(format="parquet", paths=pq_path, text_field="body"), WordIdTokenizer())


@pytest.mark.parametrize(
    "field, value",
    [
        ("format", "csv"), ("kind", "dialogue"), ("seq_len", 1), ("seq_len", 8.0),
        ("batch_size", 0), ("seed", -1), ("num_epochs", 0), ("shuffle", "yes"),
        ("packing", "best_fit"), ("paths", []), ("seqlen", 8), ("on_bad_record", "ignore"),
        ("allow_changed_data", "yes"),
    ],
)
def test_bad_config_values_are_named(text_jsonl, field, value):
    cfg = config(**{"paths": text_jsonl, field: value})
    with pytest.raises(data.DataConfigError, match=field):
        data.make_dataset(cfg, WordIdTokenizer(), process_index=0, process_count=1)


# ---- bad records and changed files -------------------------------------------------------------

GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "five"}]})
BAD_CHAT = {  # one JSONL line each, and what its error says
    "not_json": (b'{"messages": [', r"not JSON \(Expecting"),
    "not_utf8": (b'{"messages": "\xff"}', r"not UTF-8 \('utf-8' codec can't decode byte 0xff"),
    "not_an_object": (b"[1, 2]", r"a data record must be a JSON object, got list"),
    "no_messages": (b'{"text": "hi"}', r"the chat record has no 'messages' field \(fields: \['text'\]\)"),
    "unknown_role": (json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
                     r"message 0 has unknown role 'robot'"),
    "missing_content": (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}),
                        r"message 0 \(user\) needs a string 'content', got None"),
    "no_assistant_turn": (json.dumps({"messages": [{"role": "user", "content": "x"}]}),
                          r"a training conversation must end with an assistant turn .* its last message is a user message"),
    "longer_than_seq_len": (json.dumps({"messages": [{"role": "user", "content": "the dog " * 40},
                                                     {"role": "assistant", "content": "five"}]}),
                            r"the conversation has \d+ tokens, more than data.seq_len=64; an SFT sample is never cut"),
}


def write_lines(path, lines) -> str:
    with open(path, "wb") as f:
        f.writelines((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    return str(path)


def documents(batch_list) -> int:
    return sum(int(row["segment_ids"].max()) for row in rows(batch_list))


@pytest.mark.parametrize("fault", list(BAD_CHAT))
def test_bad_chat_record_is_named_by_file_and_line_or_skipped_and_counted(tmp_path, sp_tokenizer, fault):
    line, message = BAD_CHAT[fault]
    path = write_lines(tmp_path / "chat.jsonl", [GOOD_CHAT, GOOD_CHAT, line, GOOD_CHAT])
    cfg = config(paths=path, kind="chat", seq_len=64)
    with pytest.raises(data.DataError, match=re.escape(path) + ":3: " + message):
        batches(cfg, sp_tokenizer)
    cfg.data.on_bad_record = "skip"
    bad = data.BadRecords("skip")
    out = list(data.make_dataset(cfg, sp_tokenizer, process_index=0, process_count=1, bad_records=bad))
    assert documents(out) == 3 and bad.count == 1


@pytest.mark.parametrize("fmt", ["parquet", "arrayrecord"])
def test_bad_records_in_parquet_and_arrayrecord_are_named_by_record_index(tmp_path, sp_tokenizer, fmt):
    records = [json.loads(GOOD_CHAT), json.loads(BAD_CHAT["unknown_role"][0]), json.loads(GOOD_CHAT)]
    records = [{"messages": json.dumps(r["messages"])} for r in records]  # JSON strings: one Parquet schema
    path = str(tmp_path / f"chat.{fmt}")
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)  # record 1 in the first group
    else:
        data.write_arrayrecord(path, records)
    with pytest.raises(data.DataError, match=re.escape(path) + ", record index 1: message 0 has unknown role"):
        batches(config(format=fmt, paths=path, kind="chat", seq_len=64), sp_tokenizer)


def test_empty_file_is_named_or_skipped(tmp_path, text_jsonl):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")  # blank lines only: no records
    with pytest.raises(data.DataError, match=re.escape(str(empty)) + ": the file holds no records"):
        batches(config(paths=[text_jsonl, str(empty)]), WordIdTokenizer())
    bad = data.BadRecords("skip")
    cfg = config(paths=[text_jsonl, str(empty)], on_bad_record="skip")
    out = list(data.make_dataset(cfg, WordIdTokenizer(), process_index=0, process_count=1, bad_records=bad))
    assert document_ids(out) == document_ids(batches(config(paths=text_jsonl), WordIdTokenizer()))
    assert bad.empty_files == [str(empty)] and bad.count == 0
    assert "1 empty files" in bad.summary()


def test_prompt_source_applies_the_same_policy(tmp_path):
    prompt = json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": 5})
    long = json.dumps({"messages": [{"role": "user", "content": "x" * 50}]})
    path = write_lines(tmp_path / "prompts.jsonl", [prompt, GOOD_CHAT, b"{oops", prompt, long])
    section = ml_collections.ConfigDict({**data.prompt_default_config().to_dict(), "paths": path, "batch_size": 1,
                                         "shuffle": False, "num_epochs": 1})

    def too_long(record):
        if len(record["messages"][0]["content"]) > 20:
            raise ValueError("the prompt is longer than rollout.max_prompt_len")

    def prompts(**kw):
        return [r for batch in data.make_prompt_dataset(section, process_index=0, process_count=1, **kw) for r in batch]

    with pytest.raises(data.DataError, match=re.escape(path) + ":2: a prompt must not end with an assistant turn"):
        prompts()
    section.on_bad_record = "skip"
    bad = data.BadRecords("skip")
    kept = prompts(bad_records=bad, check=too_long)
    assert [r["answer"] for r in kept] == [5, 5] and bad.count == 3  # lines 2, 3 and 5
    section.on_bad_record, section.paths = "error", write_lines(tmp_path / "long.jsonl", [prompt, "", prompt, long])
    with pytest.raises(data.DataError, match=r"long.jsonl:4: the prompt is longer than rollout.max_prompt_len"):
        prompts(check=too_long)  # line numbers count the blank line too


def test_resume_names_changed_data_files_unless_allowed(tmp_path):
    paths = [write_jsonl(tmp_path / f"{name}.jsonl", TEXT_RECORDS) for name in ("a", "b")]
    cfg = config(paths=str(tmp_path / "*.jsonl"), num_epochs=None)
    saved = data.make_stream(cfg, WordIdTokenizer(), process_index=0, process_count=1).checkpoint_info()
    saved["skipped_records"] = 7

    def resume(**fields):
        stream = data.make_stream(config(paths=str(tmp_path / "*.jsonl"), num_epochs=None, **fields),
                                  WordIdTokenizer(), process_index=0, process_count=1)
        stream.resume(saved, "checkpoint step 4")
        return stream

    assert resume().bad_records.count == 7  # unchanged files: the count carries over
    with open(paths[0], "r+b") as f:  # same size, other content
        f.write(b" ")
    with pytest.raises(data.DataChangedError, match=r"a.jsonl changed content \(same size\)"):
        resume()
    with open(paths[1], "a") as f:
        f.write(json.dumps({"text": "1 2"}) + "\n")
    write_jsonl(tmp_path / "c.jsonl", TEXT_RECORDS)
    with pytest.raises(data.DataChangedError, match=(
            r"the data files differ from those checkpoint step 4 was written with: .*c.jsonl was added; .*a.jsonl "
            r"changed content \(same size\); .*b.jsonl changed size \(\d+ -> \d+ bytes\)\. .*allow_changed_data")):
        resume()
    assert resume(allow_changed_data=True).bad_records.count == 7


# ---- spm --------------------------------------------------------------------------------------


def test_spm_cli_trains_model_with_control_tokens(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the cat sat on the mat, {i * 7}." for i in range(300)))
    prefix = tmp_path / "out" / "spm"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--model_prefix", str(prefix), "--vocab_size", "300"]
    cmd = [sys.executable, "-m", "train.spm", "--input", str(corpus), *args]
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
