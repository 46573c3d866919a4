"""Accounts, plans and API keys, from a YAML keys file that stores only SHA-256 hashes.

Guarantees:
- A key is never stored or logged: the file holds ``sha256`` hex digests; lookups hash the
  presented key and compare digests with ``hmac.compare_digest``.
- A malformed file is refused with a message naming the problem (``KeysFileError``).
- Without a keys file, ``KeyStore.open_mode`` serves one anonymous account with a fixed
  budget, so a fresh ``make serve`` works (the launcher logs a warning).

File format::

    plans:
      starter: {concurrency: 2}
      clinic:  {concurrency: 8, queue: {max_waiting: 16, timeout_s: 30}}
    accounts:
      st-marys: {plan: clinic}
    keys:
      - {sha256: 9f86d0..., account: st-marys, label: "radiology PACS"}
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import yaml

KEY_PREFIX = "mgk_"
OPEN_ACCOUNT = "anonymous"
OPEN_PLAN = "open"


class KeysFileError(ValueError):
    """The keys file cannot be used; the message says why."""


@dataclass(frozen=True)
class PlanQueue:
    """Lets an account's requests wait at its own limit instead of a 429."""

    max_waiting: int
    timeout_s: float


@dataclass(frozen=True)
class Plan:
    name: str
    concurrency: int
    queue: PlanQueue | None = None


@dataclass(frozen=True)
class Account:
    name: str
    plan: Plan


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass
class KeyStore:
    accounts: dict[str, Account]
    key_hashes: dict[str, str] = field(default_factory=dict)  # sha256 hex -> account name
    open_mode: bool = False

    @classmethod
    def open(cls, budget: int) -> KeyStore:
        plan = Plan(OPEN_PLAN, budget)
        return cls({OPEN_ACCOUNT: Account(OPEN_ACCOUNT, plan)}, open_mode=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> KeyStore:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise KeysFileError(f"cannot read keys file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise KeysFileError(f"keys file {path} is not valid YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: object, source: str = "keys file") -> KeyStore:
        if not isinstance(data, dict):
            raise KeysFileError(f"{source}: expected a mapping with plans, accounts and keys")
        plans = {name: _plan(name, spec, source) for name, spec in (data.get("plans") or {}).items()}
        accounts = {}
        for name, spec in (data.get("accounts") or {}).items():
            plan_name = (spec or {}).get("plan")
            if plan_name not in plans:
                raise KeysFileError(f"{source}: account {name!r} has unknown plan {plan_name!r}")
            accounts[str(name)] = Account(str(name), plans[plan_name])
        hashes: dict[str, str] = {}
        for i, entry in enumerate(data.get("keys") or []):
            digest = str((entry or {}).get("sha256", "")).lower()
            account = (entry or {}).get("account")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise KeysFileError(f"{source}: keys[{i}] needs a sha256 hex digest")
            if account not in accounts:
                raise KeysFileError(f"{source}: keys[{i}] names unknown account {account!r}")
            if digest in hashes:
                raise KeysFileError(f"{source}: keys[{i}] repeats a key")
            hashes[digest] = account
        return cls(accounts, hashes)

    def __post_init__(self) -> None:
        # Candidates are found by a short digest prefix, then every candidate's full digest
        # is compared with hmac.compare_digest: no early-exit comparison on secret bytes.
        self._buckets: dict[str, list[tuple[str, str]]] = {}
        for digest, account in self.key_hashes.items():
            self._buckets.setdefault(digest[:4], []).append((digest, account))

    def authenticate(self, key: str | None) -> Account | None:
        """The account ``key`` belongs to, or None. Open mode accepts any key or none."""
        if self.open_mode:
            return self.accounts[OPEN_ACCOUNT]
        if not key:
            return None
        digest = hash_key(key)
        found = None
        for candidate, account in self._buckets.get(digest[:4], ()):
            if hmac.compare_digest(candidate, digest):
                found = account
        return self.accounts[found] if found is not None else None


def _plan(name: str, spec: object, source: str) -> Plan:
    if not isinstance(spec, dict) or not isinstance(spec.get("concurrency"), int):
        raise KeysFileError(f"{source}: plan {name!r} needs an integer concurrency")
    if spec["concurrency"] < 1:
        raise KeysFileError(f"{source}: plan {name!r} concurrency must be at least 1")
    queue = spec.get("queue")
    plan_queue = None
    if queue:
        try:
            plan_queue = PlanQueue(int(queue["max_waiting"]), float(queue["timeout_s"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise KeysFileError(
                f"{source}: plan {name!r} queue needs max_waiting and timeout_s"
            ) from exc
        if plan_queue.max_waiting < 1 or plan_queue.timeout_s <= 0:
            raise KeysFileError(f"{source}: plan {name!r} queue values must be positive")
    return Plan(str(name), spec["concurrency"], plan_queue)


def add_key(
    path: str | os.PathLike, account: str, plan: str, label: str | None = None
) -> str:
    """Add a key for ``account`` (created on ``plan`` if new) and return the key, shown once."""
    file = Path(path)
    data = yaml.safe_load(file.read_text()) if file.exists() else None
    data = data or {}
    data.setdefault("plans", {})
    data.setdefault("accounts", {})
    data.setdefault("keys", [])
    if plan not in data["plans"]:
        raise KeysFileError(
            f"plan {plan!r} is not in {file}; add it under plans: with a concurrency first"
        )
    existing = data["accounts"].get(account)
    if existing and existing.get("plan") != plan:
        raise KeysFileError(f"account {account!r} is on plan {existing.get('plan')!r}, not {plan!r}")
    data["accounts"][account] = {"plan": plan}
    key = new_key()
    entry = {"sha256": hash_key(key), "account": account}
    if label:
        entry["label"] = label
    data["keys"].append(entry)
    KeyStore.from_dict(data, source=str(file))  # never write a file we could not load
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.chmod(tmp, 0o600)
    os.replace(tmp, file)
    return key
