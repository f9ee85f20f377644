"""Batch generation from a JSONL prompt file into SFT chat records (off-policy distillation's teacher side).

    python -m infer.batch --checkpoint DIR --prompts in.jsonl --out out.jsonl [--mode think|no_think|both] ...

Each prompt gets --samples samples per mode, asked by the soft and hard switch together (`Switch.BOTH`)
with Qwen's sampling for the mode and each sample's own seed (`rollout.row_seed`), so a sample does not
depend on its batch. Rows decode by continuous batching, --batch_size at a time. A rerun of the same
command resumes OUT (OUT.progress beside it); malformed input lines are reported as FILE:LINE and
skipped. Record and progress formats: README, "Batch generation".
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
from absl import app, flags
from tqdm import tqdm

from infer import checks, cli_common, rollout
from infer.engine import Engine
from infer.rollout import MODES, Mode, Switch
from qwen3_jax.errors import ConfigError, DataError
from qwen3_jax.tokenizer import Tokenizer

# Written by this tool into every record; an input field of the same name would be lost.
RECORD_FIELDS = ("mode", "sample", "prompt_line", "num_tokens", "finished")
PROGRESS_SUFFIX = ".progress"
_BLOCK = 1 << 16


@dataclasses.dataclass(frozen=True)
class Settings:
    """What determines the samples; recorded in OUT.progress so a resume cannot mix settings.

    modes: a non-empty subset of MODES. samples: per prompt and mode. max_new_tokens: per sample.
    thinking_budget: tokens inside <think> for think rows (None: unlimited). sampling: overrides of
    the per-mode defaults (temperature, top_k, top_p, min_p, presence_penalty). seed: any int.
    keep: "module:function" or None. keep_unfinished: write samples that hit max_new_tokens.
    """

    modes: tuple[Mode, ...] = MODES
    samples: int = 1
    max_new_tokens: int = 1024
    thinking_budget: int | None = None
    sampling: Mapping[str, float] = dataclasses.field(default_factory=dict)
    seed: int = 0
    keep: str | None = None
    keep_unfinished: bool = False

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "modes": [str(m) for m in self.modes], "sampling": dict(self.sampling)}


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
    mode: Mode
    sample: int
    prompt_ids: list[int]
    record: dict[str, Any]  # the input record with the flagged messages


# ------------------------------------------------------------------------------- the work


def generate_file(
    engine: Engine, tokenizer: Tokenizer, prompts_path: str, out_path: str, settings: Settings = Settings(), *,
    batch_size: int = 8, progress: bool = False,
) -> Summary:
    """Generates `settings.samples` samples per prompt of `prompts_path` and mode, appending the
    records to `out_path` (see the module docstring: formats, resuming, filtering).

    `engine` should speak `tokenizer`'s vocabulary for the thinking budget (`Engine.for_tokenizer`,
    as `infer.cli_common.load` builds it).
    `batch_size`: rows (prompt x mode x sample) decoded together, by continuous batching
    (`rollout.stream_chat`): a finished row's slot takes the next row at once. The output does not
    depend on it (per-row seeds; records written in input order, once the rows before them are).
    `progress`: show a progress bar over prompts (stderr). Malformed lines are reported on stderr.
    Raises ConfigError (see `check`) before generating anything.
    """
    check(prompts_path, out_path, settings, batch_size)
    keep = load_keep(settings.keep) if settings.keep else None
    max_prompt = engine.context - settings.max_new_tokens
    if max_prompt < 1:
        raise ConfigError(
            f"--max_new_tokens {settings.max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{engine.context} positions"
        )
    if not tokenizer.eos_ids:
        raise ConfigError("the tokenizer has no stop token (<|im_end|> or <|endoftext|>): no sample could finish")
    if tokenizer.vocab_size > engine.cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {engine.cfg.vocab_size}")
    done, present = _resume_state(out_path, settings)
    summary = Summary(kept_unfinished=settings.keep_unfinished)
    remaining: dict[int, int] = {}  # prompt line -> its rows not generated yet
    completed: list[int] = []  # prompt lines to append to the progress file at the next flush

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

        def rows():
            """(number, prompt ids, mode, seed) for every sample still to generate, read line by line."""
            for line, raw in enumerate(src, start=1):
                if line in done:
                    summary.resumed += 1
                    bar.update()
                    continue
                try:
                    line_rows = _rows(raw, line, tokenizer, settings, max_prompt, present.get(line, set()))
                except DataError as e:
                    tqdm.write(f"{prompts_path}:{line}: {e}", file=sys.stderr)
                    summary.malformed += 1
                    bar.update()
                    continue
                if line_rows is None:  # an empty line
                    bar.update()
                    continue
                if not line_rows:  # every sample is already in OUT
                    completed.append(line)
                    continue
                remaining[line] = len(line_rows)
                for r in line_rows:
                    read.append(r)
                    yield len(read) - 1, r.prompt_ids, r.mode, rollout.row_seed(settings.seed, r.line, r.mode, r.sample)

        # Rows finish out of order; they are written in input order, so that OUT does not depend on
        # --batch_size (the SFT loader's shuffle reads it in file order).
        read: list[_Row | None] = []
        replies: dict[int, rollout.Completion] = {}
        written = 0
        for finished in rollout.stream_chat(engine, tokenizer, rows(), slots=batch_size,
                                            max_new_tokens=settings.max_new_tokens,
                                            thinking_budget=settings.thinking_budget, sampling=settings.sampling):
            replies.update(finished)
            records = []
            while written in replies:
                row, reply = read[written], replies.pop(written)
                read[written] = None  # written rows are not kept
                written += 1
                record = _output_record(row, reply)
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
        flush([])
    return summary


def check(prompts_path: str, out_path: str, settings: Settings, batch_size: int = 1) -> None:
    """Everything that can be checked without the model: the settings, the paths, the --keep
    import, and that OUT can be resumed with these settings. Raises ConfigError naming the problem."""
    if not settings.modes or any(m not in MODES for m in settings.modes) or len(set(settings.modes)) < len(settings.modes):
        raise ConfigError(f"modes must be distinct values of {MODES}, got {settings.modes!r}")
    for name, value in (("samples", settings.samples), ("max_new_tokens", settings.max_new_tokens),
                        ("batch_size", batch_size)):
        if not checks.is_int(value) or value < 1:
            raise ConfigError(f"--{name} must be a positive int, got {value!r}")
    budget = settings.thinking_budget
    if budget is not None and (not checks.is_int(budget) or budget < 0):
        raise ConfigError(f"--thinking_budget must be an int >= 0, got {budget!r}")
    if not checks.is_int(settings.seed):
        raise ConfigError(f"--seed must be an int, got {settings.seed!r}")
    rollout.check_sampling(settings.sampling)
    if not os.path.isfile(prompts_path):
        raise ConfigError(f"--prompts {prompts_path} is not a file")
    if os.path.getsize(prompts_path) == 0:
        raise ConfigError(f"--prompts {prompts_path} is empty: there is no prompt to generate for")
    if os.path.abspath(prompts_path) == os.path.abspath(out_path):
        raise ConfigError("--out must not be the --prompts file")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"the directory of --out {out_path} does not exist")
    if settings.keep:
        load_keep(settings.keep)
    _read_progress(out_path, settings)


def load_keep(spec: str) -> Callable[[dict], bool]:
    """The callable `spec` ("module:function", dots allowed in both) names, imported from sys.path
    (`python -m` puts the current directory there). Raises ConfigError if it cannot be imported or
    is not callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--keep {spec!r} must be module:function")
    try:
        fn: Any = importlib.import_module(module_name)
    except Exception as e:  # a verifier module may fail in any way at import
        raise ConfigError(f"--keep {spec}: cannot import {module_name}: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"--keep {spec}: {module_name} has no attribute {attr}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"--keep {spec}: {attr} is a {type(fn).__name__}, not a callable")
    return fn


# ------------------------------------------------------------------------------- helpers


def _rows(raw: bytes, line: int, tokenizer: Tokenizer, settings: Settings, max_prompt: int,
          present: set[tuple[str, int]]) -> list[_Row] | None:
    """The samples still to generate for one input line; None for an empty line."""
    try:
        text = raw.decode("utf-8-sig" if line == 1 else "utf-8")  # a byte order mark may open the file
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8: {e}") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not JSON: {e}") from None
    if not isinstance(record, dict):
        raise DataError(f"a JSON {type(record).__name__}, not an object")
    messages, tools = record.get("messages"), record.get("tools")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"no non-empty 'messages' list (got {messages!r:.80})")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"'tools' must be a list, got {type(tools).__name__}")
    taken = [f for f in RECORD_FIELDS if f in record]
    if taken:
        raise DataError(f"field(s) {taken} would be overwritten by the output's own; rename them")
    rows = []
    for mode in map(Mode, settings.modes):
        try:
            ids = rollout.render_prompt(tokenizer, messages, mode, Switch.BOTH, tools=tools)
        except DataError as e:
            raise DataError(f"messages: {e}") from None
        if len(ids) > max_prompt:
            raise DataError(
                f"the {mode} prompt has {len(ids)} tokens; the model's context leaves room for {max_prompt} "
                f"with --max_new_tokens {settings.max_new_tokens}"
            )
        out_record = {**record, "messages": rollout.with_switch(messages, mode, Switch.BOTH)}
        rows += [_Row(line, mode, k, ids, out_record) for k in range(settings.samples) if (mode, k) not in present]
    return rows


def _output_record(row: _Row, reply: rollout.Completion) -> dict[str, Any]:
    message = {"role": "assistant", "content": reply.answer, "reasoning_content": reply.thinking}
    return {
        **row.record, "messages": [*row.record["messages"], message], "mode": row.mode.value, "sample": row.sample,
        "prompt_line": row.line, "num_tokens": len(reply.token_ids), "finished": reply.finished,
    }


def _accepts(keep: Callable[[dict], Any], spec: str, record: dict[str, Any]) -> bool:
    where = f"prompt line {record['prompt_line']} ({record['mode']}, sample {record['sample']})"
    try:
        verdict = keep(copy.deepcopy(record))  # a copy: the callable cannot change what is written
    except Exception as e:  # a verifier may fail in any way; name it and the record
        raise ConfigError(f"--keep {spec} raised on {where}: {type(e).__name__}: {e}") from e
    if not isinstance(verdict, (bool, np.bool_)):
        raise ConfigError(f"--keep {spec} returned {verdict!r} on {where}; it must return True or False")
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
    or only a torn first line). Raises ConfigError if OUT cannot be resumed with `settings`."""
    progress_path = out_path + PROGRESS_SUFFIX
    has_out = os.path.isfile(out_path) and os.path.getsize(out_path) > 0
    lines = []
    if os.path.isfile(progress_path):
        with open(progress_path, encoding="utf-8") as f:
            lines = f.read().split("\n")[:-1]  # without a torn last line (no newline)
    if not lines:
        if has_out:
            raise ConfigError(
                f"{out_path} exists without {progress_path}, so infer.batch cannot resume it: remove it or "
                "choose another --out"
            )
        return None
    try:
        saved = json.loads(lines[0])["settings"]
        done = {int(x) for x in lines[1:]}
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{progress_path} is not a progress file of infer.batch") from None
    now = settings.as_json()
    if saved != now:
        diff = ", ".join(f"{k} {saved.get(k)!r}, now {now.get(k)!r}" for k in now if saved.get(k) != now.get(k))
        raise ConfigError(
            f"{out_path} was written with other settings ({diff}): rerun with the same ones or choose another --out"
        )
    if done and not has_out:
        raise ConfigError(f"{progress_path} lists {len(done)} done prompts but {out_path} is missing or empty")
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
                raise ConfigError(f"{out_path}:{number}: not a record written by infer.batch ({e})") from None
            if key[0] not in done:
                present.setdefault(key[0], set()).add(key[1])
    return done, present


# ------------------------------------------------------------------------------- command line


def define_flags() -> None:
    """Defines the command line's flags, `infer.cli_common`'s included (once per process)."""
    cli_common.define_flags()
    flags.DEFINE_string("prompts", None, "JSONL prompt file: one {\"messages\": [...], ...} per line.", required=True)
    flags.DEFINE_string("out", None, "JSONL output (appended to; a rerun resumes it); OUT.progress beside it.",
                        required=True)
    flags.DEFINE_enum("mode", "both", ["think", "no_think", "both"], "Samples in thinking mode, non-thinking mode or both.")
    flags.DEFINE_integer("samples", 1, "Samples per prompt and mode.")
    flags.DEFINE_integer("batch_size", 8, "Rows (prompt x mode x sample) generated together.")
    flags.DEFINE_string("keep", None, "module:function, a callable (record) -> bool: only accepted records are written.")
    flags.DEFINE_bool("keep_unfinished", False, "Also write samples that hit --max_new_tokens without a stop token.")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if f.no_thinking:
        sys.exit("error: infer.batch chooses the mode with --mode (think, no_think or both), not --no_thinking")
    settings = Settings(
        modes=MODES if f.mode == "both" else (Mode(f.mode),), samples=f.samples, max_new_tokens=f.max_new_tokens,
        thinking_budget=f.thinking_budget, sampling=cli_common.sampling_overrides(), seed=f.seed, keep=f.keep,
        keep_unfinished=f.keep_unfinished,
    )
    try:
        check(f.prompts, f.out, settings, f.batch_size)  # before the (slow) model load
    except ConfigError as e:
        sys.exit(f"error: {e}")
    engine, tokenizer = cli_common.load()
    try:
        summary = generate_file(engine, tokenizer, f.prompts, f.out, settings, batch_size=f.batch_size, progress=True)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # what is written is kept; the records of unfinished prompts are regenerated
        print(f"\ninterrupted: {f.out} keeps what was written; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    print(f"{f.out}: {summary}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
