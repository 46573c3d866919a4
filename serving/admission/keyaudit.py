"""Audit records of key changes: one JSON line per change, in the usage record format.

Guarantees:
- ``key_change_record`` builds a record that validates against the ``key_change``
  definition of ``serving/usage/usage-record.schema.json``: ``v`` 1, ``kind``
  ``key_change``, the time in UTC with milliseconds and a ``Z``, only the properties the
  schema names (anything else is a ``ValueError``, a bug in the caller, not written).
- A record names a key by its public ``key_id`` (12 hex digits) and never holds a key or a
  full digest: a ``key_id`` of any other shape is refused.
- ``append_records`` writes whole lines with one unbuffered ``write`` to a file opened for
  append and created with mode 0600, so concurrent writers never interleave within a line.
- The default audit file sits beside the keys file: ``<keys file>.audit.jsonl``.
- ``store_changes`` names every difference between two loaded key stores (what a server's
  reload saw, however the file was edited): keys added, removed, revoked, restored or given
  another expiry, accounts suspended, resumed or moved to another plan.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

KEY_CHANGE_ACTIONS = frozenset({
    "added", "revoked", "restored", "expiry_set", "removed", "account_suspended", "account_resumed",
    "account_plan_changed", "reloaded",
})  # fmt: skip
KEY_CHANGE_SOURCES = frozenset({"cli", "reload"})
_OPTIONAL = frozenset({"expires", "plan", "label", "replica", "actor", "time"})
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
_NAME_MAX = 256  # the schema's maxLength for plan and label
_ACTOR_MAX = 128


def utc_iso(when: datetime | float) -> str:
    """``2025-07-01T09:00:00.000Z``: UTC, milliseconds, a Z (the records' one time format)."""
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(when, UTC)
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def os_user() -> str | None:
    """Who is running this process, for ``actor``; None when the OS cannot say."""
    try:
        return getpass.getuser()[:_ACTOR_MAX]
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (a bare container)
        return None


def key_change_record(action: str, account: str | None, key_id: str | None, source: str, **extra: object) -> dict:
    """One ``key_change`` record. ``extra`` may hold ``expires`` (a datetime, epoch seconds,
    an ISO string or None), ``plan``, ``label``, ``replica``, ``actor`` and ``time`` (default: now)."""
    if action not in KEY_CHANGE_ACTIONS:
        raise ValueError(f"unknown key_change action {action!r}")
    if source not in KEY_CHANGE_SOURCES:
        raise ValueError(f"unknown key_change source {source!r}")
    if key_id is not None and not _KEY_ID.match(key_id):
        raise ValueError("key_id must be a key's 12-hex-digit public id, never a key or a full digest")
    unknown = set(extra) - _OPTIONAL
    if unknown:
        raise ValueError(f"key_change records have no {sorted(unknown)}")
    when = extra.pop("time", None)
    record: dict = {"v": 1, "kind": "key_change", "time": utc_iso(time.time() if when is None else when),
                    "action": action, "account": account, "key_id": key_id, "source": source}  # fmt: skip
    if "expires" in extra:
        expires = extra.pop("expires")
        record["expires"] = expires if expires is None or isinstance(expires, str) else utc_iso(expires)
    for name in ("plan", "label"):
        if name in extra:
            value = extra.pop(name)
            record[name] = None if value is None else str(value)[:_NAME_MAX]
    record.update(extra)
    return record


def default_audit_path(keys_path: str | os.PathLike) -> Path:
    keys_path = Path(keys_path)
    return keys_path.with_name(keys_path.name + ".audit.jsonl")


def open_audit_file(path: str | os.PathLike):
    """The audit file opened for append (created 0600); OSError when it cannot be written."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return os.fdopen(fd, "ab", buffering=0)


def append_records(audit_file, records: Iterable[dict]) -> None:
    """Append ``records`` as JSON lines to an open audit file (``open_audit_file``), one write."""
    text = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
    if text:
        audit_file.write(text.encode())


def store_changes(old, new, source: str = "reload", **extra: object) -> list[dict]:
    """The ``key_change`` records that turn key store ``old`` into ``new`` (``KeyStore``s)."""
    records = []

    def key_record(action: str, digest: str, store, **more: object) -> None:
        records.append(key_change_record(action, store.key_hashes[digest], digest[:12], source, **extra, **more))

    for digest in new.key_hashes.keys() - old.key_hashes.keys():
        key_record("added", digest, new, expires=new.expires_at.get(digest))
    for digest in old.key_hashes.keys() - new.key_hashes.keys():
        key_record("removed", digest, old)
    for digest in new.key_hashes.keys() & old.key_hashes.keys():
        if (digest in new.revoked) != (digest in old.revoked):
            key_record("revoked" if digest in new.revoked else "restored", digest, new)
        if new.expires_at.get(digest) != old.expires_at.get(digest):
            key_record("expiry_set", digest, new, expires=new.expires_at.get(digest))
    for name in sorted(new.suspended ^ old.suspended):
        action = "account_suspended" if name in new.suspended else "account_resumed"
        records.append(key_change_record(action, name, None, source, **extra))
    for name in sorted(new.accounts.keys() & old.accounts.keys()):
        if new.accounts[name].plan.name != old.accounts[name].plan.name:
            records.append(key_change_record("account_plan_changed", name, None, source, **extra,
                                             plan=new.accounts[name].plan.name))  # fmt: skip
    return records
