"""Batch generation from a prompt file into SFT chat records (off-policy distillation's teacher side).

    python -m infer.batch --checkpoint DIR [--step N] --prompts in.jsonl --out out.jsonl \
        [--mode think|no_think|both] [--samples K] [--batch_size ROWS] [--thinking_budget N] \
        [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P] [--min_p P] [--presence_penalty X] \
        [--seed S] [--keep module:function] [--keep_unfinished] [--dtype float32|bfloat16]

Input: JSONL, one prompt per line: {"messages": [...], "tools": [...] (optional), ...}. The other
fields (e.g. the reference answer a verifier needs) pass through unchanged into every output record.

Modes. Each prompt gives --samples samples per mode (`both`: think and no_think, as Qwen3's
distillation does). The mode is written into the messages as Qwen3's soft switch: " /think" or
" /no_think" is appended to the last user message (unless it already ends with that flag), so SFT
on the records teaches the switch (Qwen3 report §4.3). no_think prompts are also rendered with the
hard switch (the empty think block), so the teacher cannot think. Sampling follows Qwen's settings
for each row's mode (`infer.sampling.THINKING_SAMPLING` / `NON_THINKING_SAMPLING`); a sampling flag
overrides them for every row. --thinking_budget applies to think rows.

Output: JSONL chat records that the SFT loader (train/data/, kind='chat') reads as they are:
  messages      the flagged input messages + {"role": "assistant", "content": answer,
                "reasoning_content": thinking}; no_think records train the empty think block
  tools         as in the input, when present
  mode, sample  "think" | "no_think", 0..K-1
  prompt_line   the prompt's 1-based line in the input file
  num_tokens    generated tokens, the stop token included
  finished      whether a stop token ended the sample
  ...           the input's other fields
Samples that reach --max_new_tokens without a stop token are dropped unless --keep_unfinished.
--keep module:function names a callable (record) -> bool, imported with the current directory on
sys.path; only the records it accepts are written (rejection sampling against a verifier, as the
Qwen3 report filters wrong answers). A malformed input line (not JSON, not an object, no non-empty
`messages` list, messages the chat template rejects, a prompt the context cannot hold) is reported
as FILE:LINE: reason and skipped. The counts of all three are printed at the end.

Resuming. Rerunning the same command continues where OUT stops: no sample twice, no prompt lost.
Each sample's seed derives from (--seed, prompt line, mode, sample), so a sample has the same tokens
whatever batch it lands in. After each batch's records are flushed to OUT, the prompt lines the batch
completed are appended to OUT.progress (its first line records the settings; a rerun with other
settings is refused). A rerun cuts a torn last line of OUT, skips the prompts OUT.progress lists and,
for a prompt partly in OUT (killed between the two writes), generates only its missing samples.
Prompts stream through in batches of --batch_size rows (prompt x mode x sample); only the line count
(for the progress bar) reads the whole file.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
from absl import app, flags
from tqdm import tqdm

from infer import request
from infer.engine import Engine
from infer.messages import prompt_ids, sampling_defaults
from infer.sampling import THINKING_SAMPLING, SamplingParams
from qwen3_jax import chat
from qwen3_jax.tokenizer import Tokenizer

MODES = ("think", "no_think")
# Written by this tool into every record; an input field of the same name would be lost.
RECORD_FIELDS = ("mode", "sample", "prompt_line", "num_tokens", "finished")
PROGRESS_SUFFIX = ".progress"
_BLOCK = 1 << 16


class BatchError(ValueError):
    """Bad settings or paths, a --keep that cannot be imported or misbehaves, or an output that
    cannot be resumed."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What determines the samples; recorded in OUT.progress so a resume cannot mix settings.

    modes: a non-empty subset of MODES. samples: per prompt and mode. max_new_tokens: per sample.
    thinking_budget: tokens inside <think> for think rows (None: unlimited). sampling: overrides of
    the per-mode defaults (temperature, top_k, top_p, min_p, presence_penalty). seed: any int.
    keep: "module:function" or None. keep_unfinished: write samples that hit max_new_tokens.
    """

    modes: tuple[str, ...] = MODES
    samples: int = 1
    max_new_tokens: int = 1024
    thinking_budget: int | None = None
    sampling: Mapping[str, float] = dataclasses.field(default_factory=dict)
    seed: int = 0
    keep: str | None = None
    keep_unfinished: bool = False

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "modes": list(self.modes), "sampling": dict(self.sampling)}


@dataclasses.dataclass
class Summary:
    """Counts of one `generate_file` call."""

    prompts: int = 0  # prompts completed by this call
    resumed: int = 0  # prompts an earlier call had completed (skipped)
    written: int = 0  # records written
    unfinished: int = 0  # samples that hit max_new_tokens without a stop token
    kept_unfinished: bool = False  # whether those were written (else dropped)
    rejected: int = 0  # records the --keep callable rejected
    malformed: int = 0  # input lines skipped as malformed

    def __str__(self) -> str:
        return (
            f"{self.prompts} prompts done ({self.resumed} done by an earlier run), {self.written} records written; "
            f"{self.unfinished} unfinished samples {'kept' if self.kept_unfinished else 'dropped'}, "
            f"{self.rejected} rejected by --keep, {self.malformed} malformed lines skipped"
        )


class _Row(NamedTuple):
    """One sample to generate."""

    line: int
    mode: str
    sample: int
    prompt_ids: list[int]
    record: dict[str, Any]  # the input record with the flagged messages


class _Malformed(Exception):
    """An input line that cannot be a prompt; the message says why."""


# ------------------------------------------------------------------------------- the work


def generate_file(
    engine: Engine, tokenizer: Tokenizer, prompts_path: str, out_path: str, settings: Settings = Settings(), *,
    batch_size: int = 8, progress: bool = False,
) -> Summary:
    """Generates `settings.samples` samples per prompt of `prompts_path` and mode, appending the
    records to `out_path` (see the module docstring: formats, resuming, filtering).

    `engine` should speak `tokenizer`'s vocabulary for the thinking budget (`Engine.for_tokenizer`,
    as `infer.cli_common.load` builds it).
    `batch_size`: rows (prompt x mode x sample) per engine call; the output does not depend on it.
    `progress`: show a progress bar over prompts (stderr). Malformed lines are reported on stderr.
    Raises BatchError (see `check`) before generating anything.
    """
    check(prompts_path, out_path, settings, batch_size)
    keep = load_keep(settings.keep) if settings.keep else None
    max_prompt = engine.context - settings.max_new_tokens
    if max_prompt < 1:
        raise BatchError(
            f"--max_new_tokens {settings.max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{engine.context} positions"
        )
    if not tokenizer.eos_ids:
        raise BatchError("the tokenizer has no stop token (<|im_end|> or <|endoftext|>): no sample could finish")
    if tokenizer.vocab_size > engine.cfg.vocab_size:
        raise BatchError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {engine.cfg.vocab_size}")
    done, present = _resume_state(out_path, settings)
    summary = Summary(kept_unfinished=settings.keep_unfinished)
    remaining: dict[int, int] = {}  # prompt line -> its rows not generated yet
    completed: list[int] = []  # prompt lines to append to the progress file at the next flush
    queue: list[_Row] = []

    with (
        open(prompts_path, "rb") as src,
        open(out_path, "a", encoding="utf-8") as out,
        open(out_path + PROGRESS_SUFFIX, "a", encoding="utf-8") as log,
        tqdm(total=_count_lines(prompts_path), unit="prompt", disable=not progress, dynamic_ncols=True) as bar,
    ):

        def flush(records: list[str]) -> None:
            """Records first (synced), then the prompts they complete: a kill in between leaves
            records whose prompt is not listed, and a resume then generates only what is missing."""
            out.writelines(records)
            out.flush()
            os.fsync(out.fileno())
            log.writelines(f"{line}\n" for line in completed)
            log.flush()
            summary.written += len(records)
            summary.prompts += len(completed)
            bar.update(len(completed))
            completed.clear()

        def run(rows: list[_Row]) -> None:
            records = []
            for row, ids in zip(rows, _generate(engine, tokenizer, rows, settings)):
                record = _output_record(row, ids, tokenizer)
                summary.unfinished += not record["finished"]
                if record["finished"] or settings.keep_unfinished:
                    if keep is None or _accepts(keep, settings.keep, record):
                        records.append(json.dumps(record, ensure_ascii=False) + "\n")
                    else:
                        summary.rejected += 1
                remaining[row.line] -= 1
                if not remaining[row.line]:
                    del remaining[row.line]
                    completed.append(row.line)
            flush(records)

        for line, raw in enumerate(src, start=1):
            if line in done:
                summary.resumed += 1
                bar.update()
                continue
            try:
                rows = _rows(raw, line, tokenizer, settings, max_prompt, present.get(line, set()))
            except _Malformed as e:
                tqdm.write(f"{prompts_path}:{line}: {e}", file=sys.stderr)
                summary.malformed += 1
                bar.update()
                continue
            if rows is None:  # an empty line
                bar.update()
                continue
            if not rows:  # every sample is already in OUT
                completed.append(line)
                continue
            remaining[line] = len(rows)
            queue.extend(rows)
            while len(queue) >= batch_size:
                run(queue[:batch_size])
                queue = queue[batch_size:]
        if queue:
            run(queue)
        flush([])
    return summary


def check(prompts_path: str, out_path: str, settings: Settings, batch_size: int = 1) -> None:
    """Everything that can be checked without the model: the settings, the paths, the --keep
    import, and that OUT can be resumed with these settings. Raises BatchError naming the problem."""
    if not settings.modes or any(m not in MODES for m in settings.modes) or len(set(settings.modes)) < len(settings.modes):
        raise BatchError(f"modes must be distinct values of {MODES}, got {settings.modes!r}")
    for name, value in (("samples", settings.samples), ("max_new_tokens", settings.max_new_tokens),
                        ("batch_size", batch_size)):
        if not request.is_int(value) or value < 1:
            raise BatchError(f"--{name} must be a positive int, got {value!r}")
    budget = settings.thinking_budget
    if budget is not None and (not request.is_int(budget) or budget < 0):
        raise BatchError(f"--thinking_budget must be an int >= 0, got {budget!r}")
    if not request.is_int(settings.seed):
        raise BatchError(f"--seed must be an int, got {settings.seed!r}")
    unknown = sorted(set(settings.sampling) - {"temperature", "top_k", "top_p", "min_p", "presence_penalty"})
    if unknown:
        raise BatchError(f"unknown sampling settings {unknown}")
    try:
        SamplingParams.make(1, **{**THINKING_SAMPLING, **settings.sampling})
    except ValueError as e:
        raise BatchError(str(e)) from e
    if not os.path.isfile(prompts_path):
        raise BatchError(f"--prompts {prompts_path} is not a file")
    if os.path.getsize(prompts_path) == 0:
        raise BatchError(f"--prompts {prompts_path} is empty: there is no prompt to generate for")
    if os.path.abspath(prompts_path) == os.path.abspath(out_path):
        raise BatchError("--out must not be the --prompts file")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise BatchError(f"the directory of --out {out_path} does not exist")
    if settings.keep:
        load_keep(settings.keep)
    _read_progress(out_path, settings)


def load_keep(spec: str) -> Callable[[dict], bool]:
    """The callable `spec` ("module:function", dots allowed in both) names, imported with the
    current directory on sys.path. Raises BatchError if it cannot be imported or is not callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise BatchError(f"--keep {spec!r} must be module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn: Any = importlib.import_module(module_name)
    except Exception as e:  # a verifier module may fail in any way at import
        raise BatchError(f"--keep {spec}: cannot import {module_name}: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise BatchError(f"--keep {spec}: {module_name} has no attribute {attr}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise BatchError(f"--keep {spec}: {attr} is a {type(fn).__name__}, not a callable")
    return fn


def sample_seed(seed: int, line: int, mode: str, sample: int) -> int:
    """The engine seed of one sample, in [0, 2**32): a function of these four values only, so a
    regenerated sample has the same tokens whatever batch it lands in."""
    digest = hashlib.sha256(f"{seed}:{line}:{mode}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ------------------------------------------------------------------------------- helpers


def _rows(raw: bytes, line: int, tokenizer: Tokenizer, settings: Settings, max_prompt: int,
          present: set[tuple[str, int]]) -> list[_Row] | None:
    """The samples still to generate for one input line; None for an empty line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed(f"not UTF-8: {e}") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Malformed(f"not JSON: {e}") from None
    if not isinstance(record, dict):
        raise _Malformed(f"a JSON {type(record).__name__}, not an object")
    messages, tools = record.get("messages"), record.get("tools")
    if not isinstance(messages, list) or not messages:
        raise _Malformed(f"no non-empty 'messages' list (got {messages!r:.80})")
    if tools is not None and not isinstance(tools, list):
        raise _Malformed(f"'tools' must be a list, got {type(tools).__name__}")
    taken = [f for f in RECORD_FIELDS if f in record]
    if taken:
        raise _Malformed(f"field(s) {taken} would be overwritten by the output's own; rename them")
    last = messages[-1].get("role") if isinstance(messages[-1], dict) else None
    if last not in ("user", "tool"):
        raise _Malformed(f"the last message must be a user or tool message for the assistant to answer, got {last!r}")
    if not any(isinstance(m, dict) and m.get("role") == "user" for m in messages):
        raise _Malformed("no user message to carry the /think or /no_think flag")
    rows = []
    for mode in settings.modes:
        flagged = chat.with_soft_switch(messages, mode == "think")
        try:
            ids = prompt_ids(tokenizer, flagged, enable_thinking=mode == "think", tools=tools)
        except ValueError as e:  # the chat template's checks name the message and the problem
            raise _Malformed(f"messages: {e}") from None
        if len(ids) > max_prompt:
            raise _Malformed(
                f"the {mode} prompt has {len(ids)} tokens; the model's context leaves room for {max_prompt} "
                f"with --max_new_tokens {settings.max_new_tokens}"
            )
        out_record = {**record, "messages": flagged}
        rows += [_Row(line, mode, k, ids, out_record) for k in range(settings.samples) if (mode, k) not in present]
    return rows


def _generate(engine: Engine, tokenizer: Tokenizer, rows: Sequence[_Row], settings: Settings) -> list[list[int]]:
    """One engine call for `rows`, each with its mode's sampling defaults, budget and own seed."""
    per_row = [
        {**sampling_defaults(r.record["messages"], r.mode == "think"), **settings.sampling} for r in rows
    ]
    columns = {name: [s[name] for s in per_row] for name in per_row[0]}
    return engine.generate(
        [r.prompt_ids for r in rows], max_new_tokens=settings.max_new_tokens, stop_token_ids=tokenizer.eos_ids,
        thinking_budget=[settings.thinking_budget if r.mode == "think" else None for r in rows],
        seed=[sample_seed(settings.seed, r.line, r.mode, r.sample) for r in rows], **columns,
    )


def _output_record(row: _Row, ids: list[int], tokenizer: Tokenizer) -> dict[str, Any]:
    thinking, answer = chat.parse_completion_ids(ids, tokenizer)
    reply = {"role": "assistant", "content": answer, "reasoning_content": thinking}
    return {
        **row.record, "messages": [*row.record["messages"], reply], "mode": row.mode, "sample": row.sample,
        "prompt_line": row.line, "num_tokens": len(ids), "finished": bool(ids) and ids[-1] in tokenizer.eos_ids,
    }


def _accepts(keep: Callable[[dict], Any], spec: str, record: dict[str, Any]) -> bool:
    where = f"prompt line {record['prompt_line']} ({record['mode']}, sample {record['sample']})"
    try:
        verdict = keep(copy.deepcopy(record))  # a copy: the callable cannot change what is written
    except Exception as e:  # a verifier may fail in any way; name it and the record
        raise BatchError(f"--keep {spec} raised on {where}: {type(e).__name__}: {e}") from e
    if not isinstance(verdict, (bool, np.bool_)):
        raise BatchError(f"--keep {spec} returned {verdict!r} on {where}; it must return True or False")
    return bool(verdict)


def _count_lines(path: str) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")  # an unterminated last line counts too


def _cut_torn_line(path: str) -> None:
    """Truncates `path` after its last newline (a write killed mid-line leaves a torn line)."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - _BLOCK)
            f.seek(start)
            newline = f.read(pos - start).rfind(b"\n")
            if newline >= 0:
                pos = start + newline + 1
                break
            pos = start
        if pos < end:
            f.truncate(pos)


def _read_progress(out_path: str, settings: Settings) -> set[int] | None:
    """The prompt lines OUT.progress lists as done; None when there is no progress yet (no file,
    or only a torn first line). Raises BatchError if OUT cannot be resumed with `settings`."""
    progress_path = out_path + PROGRESS_SUFFIX
    has_out = os.path.isfile(out_path) and os.path.getsize(out_path) > 0
    lines = []
    if os.path.isfile(progress_path):
        with open(progress_path, encoding="utf-8") as f:
            lines = f.read().split("\n")[:-1]  # without a torn last line (no newline)
    if not lines:
        if has_out:
            raise BatchError(
                f"{out_path} exists without {progress_path}, so infer.batch cannot resume it: remove it or "
                "choose another --out"
            )
        return None
    try:
        saved = json.loads(lines[0])["settings"]
        done = {int(x) for x in lines[1:]}
    except (ValueError, KeyError, TypeError):
        raise BatchError(f"{progress_path} is not a progress file of infer.batch") from None
    now = settings.as_json()
    if saved != now:
        diff = ", ".join(f"{k} {saved.get(k)!r}, now {now.get(k)!r}" for k in now if saved.get(k) != now.get(k))
        raise BatchError(
            f"{out_path} was written with other settings ({diff}): rerun with the same ones or choose another --out"
        )
    if done and not has_out:
        raise BatchError(f"{progress_path} lists {len(done)} done prompts but {out_path} is missing or empty")
    return done


def _resume_state(out_path: str, settings: Settings) -> tuple[set[int], dict[int, set[tuple[str, int]]]]:
    """(prompt lines done, {prompt line: (mode, sample) keys in OUT} for the others), after cutting
    torn last lines; starts the progress file with the settings when there is none."""
    progress_path = out_path + PROGRESS_SUFFIX
    done = _read_progress(out_path, settings)
    if done is None:
        with open(progress_path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"settings": settings.as_json()}) + "\n")
        return set(), {}
    _cut_torn_line(progress_path)
    present: dict[int, set[tuple[str, int]]] = {}
    if not os.path.isfile(out_path):
        return done, present
    _cut_torn_line(out_path)
    with open(out_path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            try:
                record = json.loads(text)
                key = record["prompt_line"], (record["mode"], record["sample"])
            except (ValueError, KeyError, TypeError) as e:
                raise BatchError(f"{out_path}:{number}: not a record written by infer.batch ({e})") from None
            if key[0] not in done:
                present.setdefault(key[0], set()).add(key[1])
    return done, present


# ------------------------------------------------------------------------------- command line


@functools.cache
def define_flags() -> SimpleNamespace:
    """The command line's flags, `infer.cli_common`'s shared ones included. Defined on demand (once
    per process) rather than at import: `train.distill` imports this module as a library, and
    required flags defined at import would break its own command line."""
    from infer import cli_common

    return SimpleNamespace(
        common=cli_common,
        prompts=flags.DEFINE_string("prompts", None, "JSONL prompt file: one {\"messages\": [...], ...} per line.",
                                    required=True),
        out=flags.DEFINE_string("out", None, "JSONL output (appended to; a rerun resumes it); OUT.progress beside it.",
                                required=True),
        mode=flags.DEFINE_enum("mode", "both", ["think", "no_think", "both"],
                               "Samples in thinking mode, non-thinking mode or both."),
        samples=flags.DEFINE_integer("samples", 1, "Samples per prompt and mode."),
        batch_size=flags.DEFINE_integer("batch_size", 8, "Rows (prompt x mode x sample) generated together."),
        keep=flags.DEFINE_string("keep", None,
                                 "module:function, a callable (record) -> bool: only accepted records are written."),
        keep_unfinished=flags.DEFINE_bool("keep_unfinished", False,
                                          "Also write samples that hit --max_new_tokens without a stop token."),
    )


def main(argv: list[str]) -> None:
    del argv
    cli = define_flags()
    common = cli.common
    if common.NO_THINKING.value:
        sys.exit("error: infer.batch chooses the mode with --mode (think, no_think or both), not --no_thinking")
    settings = Settings(
        modes=MODES if cli.mode.value == "both" else (cli.mode.value,), samples=cli.samples.value,
        max_new_tokens=common.MAX_NEW_TOKENS.value, thinking_budget=common.THINKING_BUDGET.value,
        sampling=common.sampling_overrides(), seed=common.SEED.value, keep=cli.keep.value,
        keep_unfinished=cli.keep_unfinished.value,
    )
    try:
        check(cli.prompts.value, cli.out.value, settings, cli.batch_size.value)  # before the (slow) model load
    except BatchError as e:
        sys.exit(f"error: {e}")
    engine, tokenizer = common.load()
    try:
        summary = generate_file(engine, tokenizer, cli.prompts.value, cli.out.value, settings,
                                batch_size=cli.batch_size.value, progress=True)
    except BatchError as e:
        sys.exit(f"error: {e}")
    print(f"{cli.out.value}: {summary}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
