"""The capacity a replica is sold at: its engine's batch limit, or what it serves at an SLO.

By default the admission gate lets ``max_num_seqs`` (plus headroom) requests into the
engine and the autoscaler counts ``max_num_seqs`` units per replica: the engine's batch
limit, not what it serves within a response-time promise. ``--capacity-file`` replaces both
with a number of units, given as a number or as ``capacity.json`` from
``medgemma-loadtest capacity`` (the highest concurrency at which the SLO held for a workload).

Guarantees (checked before the model loads; ``SettingsError`` otherwise):
- A capacity file was measured on this engine profile and this vLLM version: capacity
  measured on another GPU or engine does not carry over, so it is refused, naming both.
- The units are a whole number from 1 to ``max_num_seqs`` (more could not run at once) and
  at least one per API process.
- The gate then holds exactly that many requests in the engine (no headroom: the search
  measured that many in flight, preprocessing included) and queues the rest;
  ``medgemma_capacity_units`` reports it and ``medgemma_capacity_source`` says where it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from serving.layers import SettingsError

ENGINE_LIMIT, SETTING, CAPACITY_FILE = "max_num_seqs", "setting", "capacity_file"
SOURCES = (ENGINE_LIMIT, SETTING, CAPACITY_FILE)
FILE_FORMAT = 1
REMEASURE = "measure it again on this server with `medgemma-loadtest capacity`"


@dataclass(frozen=True)
class SoldCapacity:
    """Units per replica (None: the engine's own limit) and where they came from."""

    units: int | None = None
    source: str = ENGINE_LIMIT


def read_capacity(value: str | None, *, profile: str, vllm_version: str, max_num_seqs: int,
                  api_processes: int = 1) -> SoldCapacity:  # fmt: skip
    """``value`` (a number of units or a capacity file's path), checked against the engine."""
    if value is None or not str(value).strip():
        return SoldCapacity()
    text = str(value).strip()
    if text.isdigit():
        sold = SoldCapacity(int(text), SETTING)
    else:
        sold = SoldCapacity(_units_from_file(Path(text), profile, vllm_version), CAPACITY_FILE)
    if not 1 <= sold.units <= max_num_seqs:
        raise SettingsError(f"capacity_file: {sold.units} units is outside 1..{max_num_seqs} (the engine's "
                            "max_num_seqs: more requests than that cannot run at once)")  # fmt: skip
    if sold.units < api_processes:
        raise SettingsError(f"capacity_file: {sold.units} units cannot be shared by {api_processes} API processes "
                            "(each needs at least one)")  # fmt: skip
    return sold


def load_capacity_file(path: Path) -> dict:
    """A capacity file's contents (what ``medgemma-loadtest capacity`` wrote), refused unless
    it is one and holds a capacity; shared by the server and ``medgemma-loadtest plan``."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"capacity_file: {path} does not exist (give a capacity.json or a number)") from None
    except (OSError, ValueError) as exc:
        raise SettingsError(f"capacity_file: {path} is not a readable capacity file: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        raise SettingsError(f"capacity_file: {path} is not a capacity file of format {FILE_FORMAT} "
                            "(written by `medgemma-loadtest capacity`)")  # fmt: skip
    units = doc.get("units_per_replica")
    if not isinstance(units, int) or isinstance(units, bool) or units < 1:
        raise SettingsError(f"capacity_file: {path} holds no capacity (units_per_replica {units!r}): the SLO did "
                            "not hold even at the search's first concurrency")  # fmt: skip
    return doc


def _units_from_file(path: Path, profile: str, vllm_version: str) -> int:
    doc = load_capacity_file(path)
    engine = doc.get("engine") if isinstance(doc.get("engine"), dict) else {}
    measured = {"engine profile": (engine.get("profile"), profile),
                "vLLM version": (engine.get("vllm_version"), vllm_version)}  # fmt: skip
    for what, (theirs, ours) in measured.items():
        if theirs is None:
            raise SettingsError(f"capacity_file: {path} does not say which {what} it was measured on; {REMEASURE}")
        if theirs != ours:
            raise SettingsError(f"capacity_file: {path} was measured on {what} {theirs}, and this server runs "
                                f"{ours}: capacity does not carry over; {REMEASURE}")  # fmt: skip
    return doc["units_per_replica"]
