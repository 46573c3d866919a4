"""Editing the keys file: add, list, revoke, restore, rotate, expire, suspend and resume.

Guarantees:
- Every operation reads the file and validates it against the one schema
  (``serving.admission.keysfile``) before touching it: a broken file is refused with
  ``KeysFileError`` and left as it is.
- An unknown key id or account is refused with ``KeysFileError``. A message quotes a key
  id only when it has a key id's shape, so a key pasted by mistake is never echoed.
- The edited file is loaded with ``KeyStore.from_dict`` before it is written, then written
  atomically (a temporary file created 0600, then ``os.replace``): a server reloading it
  (``serving.admission.keyreload``, within about 2 s) sees the old file or the new one,
  never half of one and never one it would refuse. An ``expires`` needs no reload at all.
- Each change appends one ``key_change`` record (``serving.admission.keyaudit``) to the
  audit file, by default ``<keys file>.audit.jsonl``. An audit file that cannot be opened
  stops the operation before the keys file changes. A no-op (revoking a revoked key)
  writes nothing and records nothing.
- Edits made through this module are serialized by an exclusive ``flock`` on the keys
  file's folder, so two commands at once never lose each other's change.
- A key leaves only as the return value of ``add_key`` and ``rotate_key`` (shown once);
  the file holds its SHA-256 digest, records and listings only its 12-digit id.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from serving.admission.keyaudit import (
    append_records, default_audit_path, key_change_record, open_audit_file, os_user, utc_iso,
)  # fmt: skip
from serving.admission.keys import KeyStore, hash_key, key_id, new_key
from serving.admission.keysfile import AccountSpec, KeysFile, KeysFileError, KeySpec, parse_keys_file

KEY_STATES = ("active", "expired", "revoked", "suspended")
_KEY_ID_SHAPE = re.compile(r"^[0-9a-f]{12}$")


@dataclass(frozen=True)
class KeyInfo:
    """One key as ``keys list`` shows it: never the key, never more of its digest than the id."""

    key_id: str
    account: str
    plan: str
    label: str | None
    created: datetime | None
    expires: datetime | None
    disabled: bool
    disabled_at: datetime | None
    account_suspended: bool
    state: str  # one of KEY_STATES: what authenticate does with it now

    def as_json(self) -> dict:
        return {name: utc_iso(value) if isinstance(value, datetime) else value for name, value in asdict(self).items()}


def key_state(key: KeySpec, account_suspended: bool, now: float) -> str:
    """What ``KeyStore.authenticate`` does with this key at ``now`` (epoch seconds), by the
    first reason that applies: revoked, suspended, expired, else active."""
    if key.disabled:
        return "revoked"
    if account_suspended:
        return "suspended"
    if key.expires is not None and now >= key.expires.timestamp():
        return "expired"
    return "active"


def list_keys(path: str | os.PathLike, *, now: float | None = None) -> list[KeyInfo]:
    """Every key in the file, in file order, with its state at ``now`` (default: the clock)."""
    file = Path(path)
    _, spec = _read(file, missing_ok=False)
    now = time.time() if now is None else now
    infos = []
    for key in spec.keys:
        account = spec.accounts[key.account]
        infos.append(KeyInfo(
            key_id(key.sha256), key.account, account.plan, key.label, key.created, key.expires,
            key.disabled, key.disabled_at, account.suspended, key_state(key, account.suspended, now),
        ))  # fmt: skip
    return infos


def add_key(
    path: str | os.PathLike, account: str, plan: str, label: str | None = None,
    expires: datetime | None = None, *, audit_file: str | os.PathLike | None = None,
) -> str:  # fmt: skip
    """Add a key for ``account`` (created on ``plan`` if new) and return the key, shown once.
    The file is created if missing; ``expires`` must be timezone-aware and in the future."""
    expires = _aware(expires, "expires")
    with _editing(path, audit_file, missing_ok=True) as edit:
        if plan not in edit.data["plans"]:
            raise KeysFileError(f"plan {plan!r} is not in {edit.file}; add it under plans: with a concurrency first")
        existing = edit.spec.accounts.get(account)
        if existing and existing.plan != plan:
            raise KeysFileError(f"account {account!r} is on plan {existing.plan!r}, not {plan!r}")
        if expires is not None and expires.timestamp() <= edit.now:
            raise KeysFileError("expires is in the past: the key would never work")
        if existing is None:
            edit.data["accounts"][account] = {"plan": plan}
        return edit.add(account, plan, label, expires)


def rotate_key(
    path: str | os.PathLike, account: str, grace_s: float, label: str | None = None,
    *, audit_file: str | os.PathLike | None = None,
) -> str:  # fmt: skip
    """Add a new key for ``account`` and return it (shown once). Every other key of the
    account still in use (not revoked, not expired) stops ``grace_s`` seconds from now,
    unless it already stops sooner; grace 0 stops them now."""
    if isinstance(grace_s, bool) or not isinstance(grace_s, int | float) or not math.isfinite(grace_s) or grace_s < 0:
        raise KeysFileError("the grace period must be 0 or more seconds")
    with _editing(path, audit_file) as edit:
        plan = edit.account(account).plan
        stop = datetime.fromtimestamp(edit.now + grace_s, UTC).replace(microsecond=0)
        ending = [
            i for i, key in enumerate(edit.spec.keys)
            if key.account == account and key_state(key, False, edit.now) == "active"
            and (key.expires is None or key.expires > stop)
        ]  # fmt: skip
        new = edit.add(account, plan, label, None)
        for i in ending:
            edit.data["keys"][i]["expires"] = _file_time(stop)
            edit.record("expiry_set", account, key_id(edit.spec.keys[i].sha256), expires=stop, plan=plan)
        return new


def set_expiry(
    path: str | os.PathLike, key: str, when: datetime | None, *, audit_file: str | os.PathLike | None = None
) -> list[dict]:
    """Make the key with id ``key`` stop at ``when`` (timezone-aware; a past time stops it
    now), or never (None). Returns the records written (none if nothing changed)."""
    when = _aware(when, "the expiry")
    with _editing(path, audit_file) as edit:
        i, spec = edit.key(key)
        entry = edit.data["keys"][i]
        if (spec.expires is None and when is None) or (spec.expires and when and spec.expires == when):
            return []
        if when is None:
            entry.pop("expires", None)
        else:
            entry["expires"] = _file_time(when)
        return edit.record("expiry_set", spec.account, key_id(spec.sha256), expires=when)


def revoke_key(path: str | os.PathLike, key: str, *, audit_file: str | os.PathLike | None = None) -> list[dict]:
    """Revoke the key with id ``key``: refused from the next reload on, until ``restore_key``."""
    with _editing(path, audit_file) as edit:
        i, spec = edit.key(key)
        if spec.disabled:
            return []
        edit.data["keys"][i].update(disabled=True, disabled_at=_file_time(edit.at()))
        return edit.record("revoked", spec.account, key_id(spec.sha256))


def restore_key(path: str | os.PathLike, key: str, *, audit_file: str | os.PathLike | None = None) -> list[dict]:
    """Undo ``revoke_key`` (an expiry stays as it is)."""
    with _editing(path, audit_file) as edit:
        i, spec = edit.key(key)
        if not spec.disabled:
            return []
        for name in ("disabled", "disabled_at"):
            edit.data["keys"][i].pop(name, None)
        return edit.record("restored", spec.account, key_id(spec.sha256), expires=spec.expires)


def suspend_account(path: str | os.PathLike, account: str, *, audit_file: str | os.PathLike | None = None) -> list[dict]:
    """Refuse every key of ``account`` (from the next reload on) until ``resume_account``."""
    return _set_suspended(path, account, True, audit_file)


def resume_account(path: str | os.PathLike, account: str, *, audit_file: str | os.PathLike | None = None) -> list[dict]:
    """Undo ``suspend_account``: its keys work again, except revoked or expired ones."""
    return _set_suspended(path, account, False, audit_file)


def _set_suspended(path, account: str, suspended: bool, audit_file) -> list[dict]:
    with _editing(path, audit_file) as edit:
        spec = edit.account(account)
        if spec.suspended == suspended:
            return []
        entry = edit.data["accounts"][account]
        if suspended:
            entry["suspended"] = True
        else:
            entry.pop("suspended", None)
        action = "account_suspended" if suspended else "account_resumed"
        return edit.record(action, account, None, plan=spec.plan)


@dataclass
class _Edit:
    """One edit in progress: the file's data as loaded (changed in place), its validated
    spec as it was, the time the edit started and the records of what changed."""

    file: Path
    data: dict
    spec: KeysFile
    now: float = field(default_factory=time.time)
    records: list[dict] = field(default_factory=list)
    actor: str | None = field(default_factory=os_user)
    added: list[str] = field(default_factory=list)  # digests of the keys this edit adds

    def key(self, wanted: str) -> tuple[int, KeySpec]:
        wanted = wanted.strip().lower()
        if not _KEY_ID_SHAPE.match(wanted):
            raise KeysFileError("a key id is the 12 hex digits that `medgemma-serve keys list` shows; that is not one")
        for i, key in enumerate(self.spec.keys):
            if key_id(key.sha256) == wanted:
                return i, key
        raise KeysFileError(f"no key with id {wanted!r} in {self.file}")

    def at(self) -> datetime:
        """When this edit happened, to the second (how ``created`` and ``disabled_at`` are written)."""
        return datetime.fromtimestamp(self.now, UTC).replace(microsecond=0)

    def account(self, name: str) -> AccountSpec:
        if name not in self.spec.accounts:
            raise KeysFileError(f"no account {name!r} in {self.file}")
        return self.spec.accounts[name]

    def add(self, account: str, plan: str, label: str | None, expires: datetime | None) -> str:
        taken = {key_id(digest) for digest in [*(k.sha256 for k in self.spec.keys), *self.added]}
        key = new_key()
        while key_id(hash_key(key)) in taken:  # 48 bits: never in practice, but ids must stay unique
            key = new_key()
        entry: dict = {"sha256": hash_key(key), "account": account}
        if label:
            entry["label"] = label
        entry["created"] = _file_time(self.at())
        if expires is not None:
            entry["expires"] = _file_time(expires)
        self.data["keys"].append(entry)
        self.added.append(entry["sha256"])
        self.record("added", account, key_id(entry["sha256"]), plan=plan, label=label, expires=expires)
        return key

    def record(self, action: str, account: str | None, key: str | None, **extra) -> list[dict]:
        record = key_change_record(action, account, key, "cli", actor=self.actor, time=self.now, **extra)
        self.records.append(record)
        return [record]


@contextmanager
def _editing(path: str | os.PathLike, audit_file, missing_ok: bool = False) -> Iterator[_Edit]:
    file = Path(path)
    with _folder_lock(file.parent):
        data, spec = _read(file, missing_ok)
        edit = _Edit(file, data, spec)
        yield edit
        if not edit.records:
            return
        KeyStore.from_dict(edit.data, source=str(file))  # never write a file a server would refuse
        audit = Path(audit_file) if audit_file is not None else default_audit_path(file)
        try:
            log = open_audit_file(audit)
        except OSError as exc:
            raise KeysFileError(f"cannot write the audit file {audit}: {exc.strerror}; nothing changed") from exc
        with log:
            _write(file, edit.data)
            append_records(log, edit.records)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        raise KeysFileError(f"cannot open the keys file's folder {folder}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read(file: Path, missing_ok: bool) -> tuple[dict, KeysFile]:
    """The file's data (sections present, empty ones as {} / []) and its validated spec."""
    try:
        data = yaml.safe_load(file.read_text()) if (file.exists() or not missing_ok) else None
    except OSError as exc:
        raise KeysFileError(f"cannot read keys file {file}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise KeysFileError(f"keys file {file} is not valid YAML: {exc}") from exc
    spec = parse_keys_file({} if data is None else data, str(file))  # the file as it is must load first
    data = dict(data or {})
    for section, empty in (("plans", {}), ("accounts", {}), ("keys", [])):
        if data.get(section) is None:
            data[section] = empty
    return data, spec


def _write(file: Path, data: dict) -> None:
    tmp = file.with_name(file.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(yaml.safe_dump(data, sort_keys=False))
    os.chmod(tmp, 0o600)  # an existing tmp file keeps its mode through O_CREAT
    os.replace(tmp, file)


def _aware(when: datetime | None, what: str) -> datetime | None:
    if when is not None and (not isinstance(when, datetime) or when.utcoffset() is None):
        raise KeysFileError(f"{what} needs a timezone, like 2025-07-01T00:00:00Z")
    return when


def _file_time(when: datetime) -> str:
    """How the file stores a time: ISO 8601 in UTC with a Z (YAML may read it back either way)."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")
