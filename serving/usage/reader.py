"""Reading usage files: paths -> the files to read -> one record (dict) per readable line.

Guarantees:
- ``find_usage_files``: a file is read as given; a directory means every ``usage*.jsonl*``
  file in it (``usage.jsonl``, a replica's ``usage-<host>-<pid>.jsonl``, and their
  rotations ``.1``, ``.2``, ...); any other
  path with ``*``, ``?`` or ``[`` is a glob. Each file is read once, however many paths name
  it. A path that is missing, unreadable or matches nothing is refused up front
  (``UsageFileError``), before anything is read.
- ``UsageReader`` streams line by line (constant memory, any file size; ``.gz`` rotations are
  read through gzip). A line that is not a JSON object with a string ``kind`` and a ``time``
  with a time zone, or a request record whose counted fields have the wrong types, is
  skipped and counted in ``skipped_lines`` (a truncated last line after a crash, garbage),
  never raised. Blank lines are neither records nor counted.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

USAGE_FILE_PATTERN = "usage*.jsonl*"  # usage.jsonl, usage-<host>-<pid>.jsonl, and their rotations
GLOB_CHARACTERS = frozenset("*?[")
# Request fields the report sums or ranks: each must be one of these types (bool is not an int here).
COUNTED_INTEGERS = ("images", "prompt_tokens", "completion_tokens", "status")
COUNTED_NUMBERS = ("unit_seconds", "ttft_s", "e2e_s")


class UsageFileError(OSError):
    """A usage path was refused (missing, unreadable, matched nothing); the message names it."""


def find_usage_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files the given paths name, in order, each once; raises UsageFileError."""
    found: list[Path] = []
    for raw in paths:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            matches = sorted(p for p in path.glob(USAGE_FILE_PATTERN) if p.is_file())
            if not matches:
                raise UsageFileError(f"{text}: no {USAGE_FILE_PATTERN} files in this directory")
        elif path.exists():
            matches = [path]
        elif GLOB_CHARACTERS & set(text):
            matches = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
            if not matches:
                raise UsageFileError(f"{text}: the pattern matches no file")
        else:
            raise UsageFileError(f"{text}: no such file or directory")
        for match in matches:
            if not os.access(match, os.R_OK):
                raise UsageFileError(f"{match}: not readable")
            if not any(_same_file(match, seen) for seen in found):
                found.append(match)
    return found


def _same_file(one: Path, other: Path) -> bool:
    try:
        return one.samefile(other)
    except OSError:
        return one.resolve() == other.resolve()


def parse_record_time(record: dict) -> datetime | None:
    """The record's ``time`` as an aware datetime; None when missing, malformed or without a zone."""
    text = record.get("time")
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a usage record holds")


def parse_record_line(line: bytes | str) -> dict | None:
    """One line -> its record, or None when the line is not a readable record."""
    try:
        record = json.loads(line, parse_constant=_refuse_constant)
    except ValueError:  # bad JSON, bad UTF-8, NaN/Infinity
        return None
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        return None
    if parse_record_time(record) is None:
        return None
    if record["kind"] == "request" and not _has_countable_fields(record):
        return None
    return record


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _has_countable_fields(record: dict) -> bool:
    integers_ok = all(
        record.get(name) is None or (isinstance(record[name], int) and not isinstance(record[name], bool))
        for name in COUNTED_INTEGERS
    )
    numbers_ok = all(record.get(name) is None or _is_number(record[name]) for name in COUNTED_NUMBERS)
    return integers_ok and numbers_ok


class UsageReader:
    """Iterates the records of some usage files once; ``skipped_lines`` counts the unreadable lines."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.files = list(files)
        self.skipped_lines = 0

    def __iter__(self) -> Iterator[dict]:
        for path in self.files:
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as lines:
                try:
                    for line in lines:
                        if not line.strip():
                            continue
                        record = parse_record_line(line)
                        if record is None:
                            self.skipped_lines += 1
                        else:
                            yield record
                except (EOFError, gzip.BadGzipFile, zlib.error):  # a truncated or corrupt .gz: its tail
                    self.skipped_lines += 1
