"""infer.batch: SFT-ready records, per-mode rendering and sampling, resuming, filtering, bad lines."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
from absl import flags

import qwen3_jax as q
from infer import batch, continuous, rollout
from infer.engine import Engine
from infer.sampling import NON_THINKING_SAMPLING, THINKING_SAMPLING
from qwen3_jax.chat import EMPTY_THINK_BLOCK, render
from qwen3_jax.errors import ConfigError
from qwen3_jax.ids import IM_END_ID
from qwen3_jax.tokenizer import Tokenizer
from train import data as data_lib

CONTEXT, MAX_NEW = 256, 8
SETTINGS = batch.Settings(samples=2, max_new_tokens=MAX_NEW, keep_unfinished=True)  # a random model rarely stops

VALID = {
    1: {"messages": [{"role": "user", "content": "What is 1+1?"}], "answer": "2"},
    3: {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        "id": "c1"},
    9: {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": "And 2+2? /think"}]},
    12: {"messages": [{"role": "user", "content": "Spell cat."}], "meta": {"source": "x", "n": [1, 2]}},
}
MALFORMED = {  # line -> (text, what the report says)
    2: ("not json", "not JSON"),
    4: ("[1, 2]", "a JSON list, not an object"),
    5: ('{"messages": []}', "no non-empty 'messages' list"),
    6: ('{"messages": [{"role": "user", "content": 5}]}', "messages: message 0 (user) needs a string 'content'"),
    7: (json.dumps({"messages": [{"role": "user", "content": "word " * 300}]}), "the model's context leaves room for"),
    10: ('{"messages": [{"role": "user", "content": "x"}], "mode": "think"}', "field(s) ['mode'] would be overwritten"),
    11: ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}',
         "a prompt must not end with an assistant turn"),
    13: ('{"messages": [{"role": "user", "content": "a \\ud800"}]}', "messages: message 0 is not Unicode text"),
}
NUM_LINES = 13  # line 8 is empty: skipped without a report


def key(record: dict) -> tuple:
    return record["prompt_line"], record["mode"], record["sample"]


def read_records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def by_key(records: list[dict]) -> dict[tuple, dict]:
    keyed = {key(r): r for r in records}
    assert len(keyed) == len(records), "duplicate samples"
    return keyed


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.qwen3()


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory) -> str:
    """Tiny layers over the real Qwen3 vocabulary, with a short context for the over-long line."""
    cfg = q.preset("tiny-dense", vocab_size=151936, hidden_size=32, intermediate_size=48, num_layers=2,
                   max_position_embeddings=CONTEXT)
    path = str(tmp_path_factory.mktemp("checkpoint"))
    q.to_hf(q.init_model(cfg, seed=5), path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return q.load_any(checkpoint)  # as the command line loads it, so both share compiled executables


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return Engine.for_tokenizer(model, tokenizer)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    lines = [""] * NUM_LINES
    for line, record in VALID.items():
        lines[line - 1] = json.dumps(record)
    for line, (text, _) in MALFORMED.items():
        lines[line - 1] = text
    path = tmp_path_factory.mktemp("prompts") / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def reference(engine, tokenizer, prompts, tmp_path_factory):
    """An uninterrupted run in batches of 3 rows (a prompt's 4 rows span batches): its summary,
    output path, records and stderr."""
    out = str(tmp_path_factory.mktemp("reference") / "out.jsonl")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        summary = batch.generate_file(engine, tokenizer, prompts, out, SETTINGS, batch_size=3)
    return summary, out, read_records(out), err.getvalue()


# ------------------------------------------------------------------------------- records


class ScriptedContinuous:
    """Stands in for `infer.continuous.ContinuousEngine`: each step replies to every waiting request
    with a fixed well-formed completion for its mode (read off the prompt's end), so the records
    can be checked against exactly known tokens; `requests` keeps what was submitted."""

    requests: list = []
    in_order = True  # False: each step finishes only the newest request, so rows finish out of order

    def __init__(self, engine, *, max_len, **_):
        self.context, self._waiting = max_len, []

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def idle(self) -> bool:
        return not self._waiting

    def submit(self, request):
        self.requests.append(request)
        self._waiting.append(request)

    def step(self) -> bool:
        finishing, self._waiting = (self._waiting, []) if self.in_order else (self._waiting[-1:], self._waiting[:-1])
        for r in finishing:
            reply = REPLIES["no_think" if r.prompt[-len(THINKING_OFF):] == THINKING_OFF else "think"]
            r.on_tokens(reply, [False] * len(reply), True)
        return True


THINKING_OFF = Tokenizer.qwen3().encode(EMPTY_THINK_BLOCK)
REPLIES = {"think": Tokenizer.qwen3().encode("<think>\nOne plus one is two.\n</think>\n\nIt is 2.") + [IM_END_ID],
           "no_think": Tokenizer.qwen3().encode("It is 2.") + [IM_END_ID]}


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(continuous, "ContinuousEngine", ScriptedContinuous)
    monkeypatch.setattr(ScriptedContinuous, "requests", [])
    return ScriptedContinuous


def test_rows_that_finish_out_of_order_are_written_in_input_order(engine, scripted, tokenizer, prompts, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(scripted, "in_order", False)
    out = str(tmp_path / "out.jsonl")
    with contextlib.redirect_stderr(io.StringIO()):
        batch.generate_file(engine, tokenizer, prompts, out, SETTINGS, batch_size=3)
    records = read_records(out)
    assert [key(r) for r in records] == [(line, m, k) for line in sorted(VALID) for m in rollout.MODES for k in range(2)]
    assert list(map(int, open(out + batch.PROGRESS_SUFFIX).read().splitlines()[1:])) == sorted(VALID)


def test_records_round_trip_into_the_sft_loader(engine, scripted, tokenizer, tmp_path):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    inputs = [
        {"messages": [{"role": "user", "content": "What is 1+1?"}], "tools": tools, "answer": "2"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1? /no_think"}]},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inputs))
    settings = batch.Settings(samples=1, max_new_tokens=MAX_NEW, thinking_budget=5, sampling={"presence_penalty": 1.5})
    summary = batch.generate_file(engine, tokenizer, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), settings,
                                  batch_size=8)
    assert (summary.prompts, summary.written, summary.unfinished, summary.malformed) == (2, 4, 0, 0)
    records = read_records(tmp_path / "out.jsonl")
    assert [key(r) for r in records] == [(1, "think", 0), (1, "no_think", 0), (2, "think", 0), (2, "no_think", 0)]

    # Per-row settings: the mode's Qwen sampling, the budget on think rows only, the row's own seed.
    requests, modes = scripted.requests, [r["mode"] for r in records]
    assert [r.sampling["temperature"] for r in requests] == [
        (THINKING_SAMPLING if m == "think" else NON_THINKING_SAMPLING)["temperature"] for m in modes]
    assert [r.sampling["top_p"] for r in requests] == [0.95, 0.8, 0.95, 0.8]
    assert [r.sampling["presence_penalty"] for r in requests] == [1.5] * 4
    assert [r.thinking_budget for r in requests] == [5, None, 5, None]
    assert [r.seed for r in requests] == [rollout.row_seed(0, *key(r)) for r in records]

    for record, source in zip(records, [inputs[0], inputs[0], inputs[1], inputs[1]]):
        flag = "/think" if record["mode"] == "think" else "/no_think"
        *prompt_messages, reply = record["messages"]
        assert prompt_messages[-1]["content"].endswith(flag)
        assert prompt_messages[-1]["content"].count(flag) == 1  # "1+1? /no_think" gets no second /no_think
        assert prompt_messages[:-1] == source["messages"][:-1]
        assert {k: record[k] for k in source if k != "messages"} == {k: v for k, v in source.items() if k != "messages"}
        assert record["finished"] and record["num_tokens"] == len(REPLIES[record["mode"]])
        assert reply == {"role": "assistant", "content": "It is 2.",
                         "reasoning_content": "One plus one is two." if record["mode"] == "think" else ""}

    # The loader reads the output file as it is: its tokens are the rendered prompt + the generated
    # completion (+ the "\n" after <|im_end|>), and the loss covers the completion; for no_think
    # records also the empty think block, which the hard switch put in the prompt but the model must
    # learn to write itself under /no_think.
    cfg = data_lib.DataConfig(format="jsonl", paths=str(tmp_path / "out.jsonl"), kind="chat", seq_len=512,
                              batch_size=1, num_epochs=1, shuffle=False, packing_bins=1, num_threads=1)
    docs = []
    for b in data_lib.make_dataset(cfg, tokenizer, process_index=0, process_count=1):
        seg = b["segment_ids"][0]
        docs += [{k: b[k][0][seg == s] for k in ("tokens", "targets", "loss_mask")} for s in range(1, seg.max() + 1)]
    assert len(docs) == len(records)
    for doc, record in zip(docs, records):
        think = record["mode"] == "think"
        prompt = tokenizer.encode(render(record["messages"][:-1], tools=record.get("tools"), add_generation_prompt=True,
                                         enable_thinking=think))
        completion = REPLIES[record["mode"]]
        assert doc["tokens"].tolist() == prompt + completion + tokenizer.encode("\n")
        trained = completion if think else THINKING_OFF + completion
        assert doc["targets"][doc["loss_mask"] > 0].tolist() == trained
        first = len(prompt) - 1 - (0 if think else len(THINKING_OFF))
        assert np.flatnonzero(doc["loss_mask"]).tolist() == list(range(first, first + len(trained)))


# --------------------------------------------------------------------- the real decode engine


def test_malformed_lines_are_named_and_counted(reference, prompts):
    summary, _, records, stderr = reference
    assert (summary.prompts, summary.malformed, summary.resumed) == (len(VALID), len(MALFORMED), 0)
    assert summary.written == len(records) == len(VALID) * 2 * 2 and summary.unfinished == summary.written
    assert sorted(by_key(records)) == sorted((line, m, k) for line in VALID for m in rollout.MODES for k in range(2))
    reports = stderr.splitlines()
    assert len(reports) == len(MALFORMED)
    for report, (line, (_, reason)) in zip(reports, sorted(MALFORMED.items())):
        assert report.startswith(f"{prompts}:{line}: ") and reason in report, report
    for r in records:  # the input's fields pass through; the mode is in the messages
        assert {k: v for k, v in r.items() if k not in (*batch.RECORD_FIELDS, "messages")} == \
               {k: v for k, v in VALID[r["prompt_line"]].items() if k != "messages"}
        assert r["messages"][-2]["content"].endswith("/" + r["mode"])


def test_a_byte_order_mark_opening_the_file_is_not_a_malformed_line(tokenizer):
    raw = '\ufeff{"messages": [{"role": "user", "content": "x"}]}\r\n'.encode()
    (row,) = batch._rows(raw, 1, tokenizer, batch.Settings(modes=(rollout.Mode.THINK,)), 100, set())
    assert row.record["messages"][0]["content"].startswith("x")
    with pytest.raises(batch.DataError, match="not JSON"):  # past the first line it is a stray character
        batch._rows(raw, 2, tokenizer, batch.Settings(), 100, set())


def test_a_sample_does_not_depend_on_its_batch(reference, engine, tokenizer, prompts, tmp_path):
    """Per-row seeds: 5 rows decoding together put every sample beside other rows than 3 do, and
    rows finish in another order; the file is the same, in input order."""
    _, _, records, _ = reference
    out = tmp_path / "out.jsonl"
    with contextlib.redirect_stderr(io.StringIO()):
        batch.generate_file(engine, tokenizer, prompts, str(out), SETTINGS, batch_size=5)
    assert read_records(out) == records
    assert [key(r) for r in records] == sorted(map(key, records), key=lambda k: (k[0], rollout.MODES.index(k[1]), k[2]))


def test_resume_cuts_a_torn_line_and_generates_only_what_is_missing(reference, engine, tokenizer, prompts, tmp_path):
    """Killed while writing a batch's records, before their prompts reached the progress file."""
    _, ref_out, records, _ = reference
    out = str(tmp_path / "out.jsonl")
    lines = open(ref_out).read().splitlines(keepends=True)
    done = open(ref_out + batch.PROGRESS_SUFFIX).read().splitlines(keepends=True)
    with open(out, "w") as f:  # the last two prompts' records: some kept, one torn, the rest lost
        f.writelines(lines[:-5])
        f.write(lines[-5][: len(lines[-5]) // 2])
    with open(out + batch.PROGRESS_SUFFIX, "w") as f:
        f.writelines(done[:-2])  # the settings line, then all prompts but the last two
    with contextlib.redirect_stderr(io.StringIO()):
        summary = batch.generate_file(engine, tokenizer, prompts, out, SETTINGS, batch_size=3)
    assert (summary.resumed, summary.prompts, summary.written) == (len(VALID) - 2, 2, 5)
    assert by_key(read_records(out)) == by_key(records)
    assert sorted(map(int, open(out + batch.PROGRESS_SUFFIX).read().splitlines()[1:])) == sorted(VALID)


def test_resume_after_an_exception_mid_run(reference, engine, tokenizer, prompts, tmp_path, monkeypatch):
    _, _, records, _ = reference
    step = continuous.ContinuousEngine.step
    steps = iter(range(100))

    def fails_on_the_third_step(self):
        if next(steps) == 2:
            raise RuntimeError("killed")
        return step(self)

    monkeypatch.setattr(continuous.ContinuousEngine, "step", fails_on_the_third_step)
    out = str(tmp_path / "out.jsonl")
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(RuntimeError, match="killed"):
        batch.generate_file(engine, tokenizer, prompts, out, SETTINGS, batch_size=3)
    monkeypatch.undo()
    written = len(read_records(out))
    assert 0 < written < len(records)  # rows finished in the first two steps
    with contextlib.redirect_stderr(io.StringIO()):
        summary = batch.generate_file(engine, tokenizer, prompts, out, SETTINGS, batch_size=3)
    assert summary.resumed + summary.prompts == len(VALID) and summary.written == len(records) - written
    assert by_key(read_records(out)) == by_key(records)


def test_unfinished_samples_are_dropped_and_counted(engine, tokenizer, prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    settings = batch.Settings(samples=2, max_new_tokens=MAX_NEW)
    with contextlib.redirect_stderr(io.StringIO()):
        summary = batch.generate_file(engine, tokenizer, prompts, str(out), settings, batch_size=3)
    written = read_records(out)
    assert all(r["finished"] for r in written)
    assert summary.written == len(written) and summary.written + summary.unfinished == len(VALID) * 4
    assert summary.unfinished > 0 and "dropped" in str(summary)


# ------------------------------------------------------------------------------- --keep


@pytest.fixture
def verifier(tmp_path, monkeypatch):
    """A module in the current directory, which `python -m` puts on sys.path, as a user's verifier would be."""
    (tmp_path / "my_verifier.py").write_text(
        "def first_sample(record):\n    return record['sample'] == 0\n"
        "def broken(record):\n    return record['no_such_field']\n"
        "def not_bool(record):\n    return 'yes'\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_verifier", None)


def test_keep_writes_only_accepted_records(verifier, reference, engine, tokenizer, prompts):
    _, _, records, _ = reference
    settings = batch.Settings(samples=2, max_new_tokens=MAX_NEW, keep="my_verifier:first_sample", keep_unfinished=True)
    with contextlib.redirect_stderr(io.StringIO()):
        summary = batch.generate_file(engine, tokenizer, prompts, "out.jsonl", settings, batch_size=3)
    kept = read_records(verifier / "out.jsonl")
    assert summary.rejected == len(records) // 2 and summary.written == len(kept) == len(records) // 2
    assert by_key(kept) == {k: r for k, r in by_key(records).items() if k[2] == 0}  # the same samples


@pytest.mark.parametrize("spec, message", [
    ("my_verifier", "must be module:function"),
    ("no_such_module:keep", "cannot import no_such_module: ModuleNotFoundError"),
    ("my_verifier:missing", "my_verifier has no attribute missing"),
    ("my_verifier:NOT_CALLABLE", "NOT_CALLABLE is a int, not a callable"),
])
def test_keep_that_cannot_be_imported_is_named_before_any_generation(verifier, engine, tokenizer, prompts, spec,
                                                                     message):
    settings = batch.Settings(keep=spec)
    with pytest.raises(ConfigError, match=message):
        batch.generate_file(engine, tokenizer, prompts, "out.jsonl", settings)
    assert not os.path.exists(verifier / "out.jsonl")


@pytest.mark.parametrize("spec, message", [
    ("my_verifier:broken", r"raised on prompt line 1 \(think, sample 0\): KeyError"),
    ("my_verifier:not_bool", "returned 'yes' on prompt line 1 .* it must return True or False"),
])
def test_keep_that_fails_is_named(verifier, engine, scripted, tokenizer, prompts, spec, message):
    settings = batch.Settings(max_new_tokens=MAX_NEW, keep=spec)
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(ConfigError, match=message):
        batch.generate_file(engine, tokenizer, prompts, "out.jsonl", settings)


# ------------------------------------------------------------------------------- errors


def test_settings_and_outputs_that_cannot_be_resumed_are_named(reference, prompts, tmp_path):
    _, ref_out, _, _ = reference
    out = str(tmp_path / "out.jsonl")
    shutil.copy(ref_out, out)
    with pytest.raises(ConfigError, match="exists without .*progress, so infer.batch cannot resume it"):
        batch.check(prompts, out, SETTINGS)
    shutil.copy(ref_out + batch.PROGRESS_SUFFIX, out + batch.PROGRESS_SUFFIX)
    batch.check(prompts, out, SETTINGS)
    with pytest.raises(ConfigError, match="written with other settings \\(samples 2, now 3\\)"):
        batch.check(prompts, out, batch.Settings(samples=3, max_new_tokens=MAX_NEW, keep_unfinished=True))
    os.remove(out)
    with pytest.raises(ConfigError, match="lists 4 done prompts but .* is missing"):
        batch.check(prompts, out, SETTINGS)
    for settings, message in [
        (batch.Settings(modes=("think", "maybe")), "modes must be distinct values of"),
        (batch.Settings(samples=0), "--samples must be a positive int"),
        (batch.Settings(thinking_budget=-1), "--thinking_budget must be an int >= 0"),
        (batch.Settings(sampling={"top_p": 1.5}), r"top_p must be in \(0, 1\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            batch.check(prompts, str(tmp_path / "new.jsonl"), settings)
    with pytest.raises(ConfigError, match="is not a file"):
        batch.check(str(tmp_path / "missing.jsonl"), str(tmp_path / "new.jsonl"), SETTINGS)


@pytest.mark.parametrize("settings, message", [
    (batch.Settings(max_new_tokens=4.0), r"--max_new_tokens must be a positive int, got 4.0"),
    (batch.Settings(max_new_tokens=True), r"--max_new_tokens must be a positive int, got True"),
    (batch.Settings(thinking_budget=2.5), r"--thinking_budget must be an int >= 0, got 2.5"),
    (batch.Settings(sampling={"temperature": float("nan")}), r"temperature must be finite"),
    (batch.Settings(seed="7"), r"--seed must be an int, got '7'"),
    (None, r"--prompts .*empty.jsonl is empty: there is no prompt to generate for"),
])
def test_generate_file_names_a_bad_request_before_generating(engine, tokenizer, prompts, tmp_path, settings, message):
    source = prompts
    if settings is None:  # an empty prompt file
        source, settings = str(tmp_path / "empty.jsonl"), SETTINGS
        open(source, "w").close()
    with pytest.raises(ConfigError, match=message):
        batch.generate_file(engine, tokenizer, source, str(tmp_path / "out.jsonl"), settings)
    assert not os.path.exists(tmp_path / "out.jsonl")


# ------------------------------------------------------------------------------- command line


def run_main(argv: list[str]) -> None:
    """`python -m infer.batch ARGV` in this process (absl flags are global: defined once, reset here)."""
    if "prompts" not in flags.FLAGS:
        batch.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["infer.batch", *argv])
    batch.main([])


def test_command_line(checkpoint, reference, prompts, tmp_path, capsys):
    """The command line writes what `generate_file` writes with the same settings."""
    _, _, records, _ = reference
    out = str(tmp_path / "out.jsonl")
    argv = ["--checkpoint", checkpoint, "--prompts", prompts, "--out", out, "--samples", "2", "--keep_unfinished",
            "--max_new_tokens", str(MAX_NEW), "--batch_size", "3"]
    run_main(argv)
    assert by_key(read_records(out)) == by_key(records)
    assert f"{out}: {len(VALID)} prompts done" in capsys.readouterr().out
    for extra, message in [(["--temperature", "0"], "written with other settings"),
                           (["--no_thinking"], "chooses the mode with --mode"),
                           (["--keep", "no_such_module:f"], "cannot import no_such_module"),
                           (["--step", "9"], "step=9 picks a step of a trainer checkpoint, but .* is a hf checkpoint")]:
        with pytest.raises(SystemExit, match=f"error: .*{message}"):
            run_main(argv + extra)
    flags.FLAGS.unparse_flags()


def test_command_line_interrupted_says_how_to_resume(checkpoint, prompts, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "generate_file", interrupted)
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--checkpoint", checkpoint, "--prompts", prompts, "--out", out])
    flags.FLAGS.unparse_flags()
    assert exit_info.value.code == 130
    assert f"interrupted: {out} keeps what was written; rerun the same command to resume" in capsys.readouterr().err
