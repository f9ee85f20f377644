"""What a checkpoint records about a stream besides grain's iterator position: the files' fingerprint
and the skipped-record count, checked and carried over on resume (`DataStream`)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain

from qwen3_jax.errors import DataError
from train.data.documents import BadRecords

log = logging.getLogger(__name__)

_FINGERPRINT_BYTES = 1 << 20


def fingerprint(paths: Sequence[str]) -> tuple[dict[str, Any], ...]:
    """Per file, in reading order: its absolute path, size in bytes and the sha256 of its first
    and last MiB (of the whole file up to 2 MiB). Cheap for any corpus; it tells a file added,
    removed, grown, truncated or rewritten, though not an edit that keeps the size and lies more
    than a MiB from both ends."""
    out = []
    for path in paths:
        size = os.path.getsize(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(_FINGERPRINT_BYTES))
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            digest.update(f.read())
        out.append({"path": os.path.abspath(path), "size": size, "sha256": digest.hexdigest()})
    return tuple(out)


def fingerprint_changes(saved: Sequence[Mapping[str, Any]], now: Sequence[Mapping[str, Any]]) -> list[str]:
    """What differs between two `fingerprint`s, one phrase per file; [] when they are equal."""
    old, new = {f["path"]: f for f in saved}, {f["path"]: f for f in now}
    changes = [f"{p} was removed" for p in old if p not in new]
    changes += [f"{p} was added" for p in new if p not in old]
    for path in (p for p in new if p in old):  # in reading order: the message is the same every time
        if old[path]["size"] != new[path]["size"]:
            changes.append(f"{path} changed size ({old[path]['size']} -> {new[path]['size']} bytes)")
        elif old[path]["sha256"] != new[path]["sha256"]:
            changes.append(f"{path} changed content (same size)")
    if not changes and list(old) != list(new):
        changes.append(f"the files are read in another order (now {list(new)})")
    return changes


@dataclasses.dataclass(frozen=True)
class DataStream:
    """A trainer's input: the checkpointable `iterator` (grain's `get_state()` is a small JSON-able
    dict), the `fingerprint` of the files it reads (empty for synthetic data), its `bad_records`
    policy and count, and whether a resume may go on with changed files. `section` ('data' or
    'prompts') names the config section in errors."""

    iterator: grain.DatasetIterator
    files: tuple[dict[str, Any], ...]
    bad_records: BadRecords
    allow_changed_data: bool
    section: str

    def checkpoint_info(self) -> dict[str, Any]:
        """What a checkpoint records beside the iterator's position (JSON-able)."""
        return {"files": list(self.files), "skipped_records": self.bad_records.count}

    def resume(self, saved: Mapping[str, Any] | None, where: str) -> None:
        """Checks the files against `saved` (a `checkpoint_info()` of the checkpoint `where`) and
        carries its skipped count over. `saved=None` (a checkpoint written before this record
        existed) is taken as it is.

        Raises DataError listing every difference, unless allow_changed_data (then it logs them).
        """
        if saved is None:
            return
        changes = fingerprint_changes(saved["files"], self.files)
        if changes:
            message = f"the {self.section} files differ from those {where} was written with: {'; '.join(changes)}"
            if not self.allow_changed_data:
                raise DataError(
                    f"{message}. The restored position would point into other records: restore the files, or set "
                    f"{self.section}.allow_changed_data=True to go on with them"
                )
            log.warning("%s; going on (%s.allow_changed_data=True)", message, self.section)
        self.bad_records.count = int(saved["skipped_records"])
