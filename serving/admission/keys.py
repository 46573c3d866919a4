"""Accounts, plans and API keys, from a YAML keys file that stores only SHA-256 hashes.

Guarantees:
- A key is never stored or logged: the file holds ``sha256`` hex digests; lookups hash the
  presented key and compare digests with ``hmac.compare_digest``.
- The file has one schema (``serving.admission.keysfile``), used at start-up and on every
  reload: a malformed file of any shape is refused with a message naming the problem
  (``KeysFileError``), never half-loaded.
- A revoked key (``disabled: true``), a key past its ``expires`` and every key of a
  ``suspended`` account authenticate as None (401). Expiry is checked on each request
  against ``now()`` (wall-clock epoch seconds), so a key stops at its instant without a
  reload; the check is a set lookup and one float comparison, no date parsing.
- Without a keys file, ``KeyStore.open_mode`` serves one anonymous account with a fixed
  budget, so a fresh ``make serve`` works (the launcher logs a warning).

Editing the file (add, revoke, rotate, ...) lives in ``serving.admission.keyadmin``.

File format::

    plans:
      starter: {concurrency: 2}
      clinic:  {concurrency: 8, queue: {max_waiting: 16, timeout_s: 30},
                priority: {max: stat, default: interactive}}
    accounts:
      st-marys: {plan: clinic}
      old-client: {plan: starter, suspended: true}
    keys:
      - {sha256: 9f86d0..., account: st-marys, label: "radiology PACS",
         created: "2025-06-01T09:00:00Z", expires: "2026-06-01T09:00:00Z"}
      - {sha256: 3c1b7e..., account: st-marys, label: "overnight drafts",
         priority: {max: batch, default: batch}}
      - {sha256: 5d41a4..., account: st-marys, disabled: true, disabled_at: "2025-06-02T10:00:00Z"}

A plan's ``priority`` names the most urgent class its requests may ask for and the class
they get unasked (both ``interactive`` when absent); a key's ``priority`` replaces its
plan's for that key alone (``serving.admission.priority``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from serving.admission.keysfile import KEY_ID_CHARS, KeysFileError, parse_keys_file
from serving.admission.priority import PriorityClass

KEY_PREFIX = "mgk_"
OPEN_ACCOUNT = "anonymous"
OPEN_PLAN = "open"


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
    max_class: PriorityClass = PriorityClass.INTERACTIVE  # the most urgent class it may ask for
    default_class: PriorityClass = PriorityClass.INTERACTIVE  # what a request gets unasked


@dataclass(frozen=True)
class Account:
    """An account as one key sees it: its plan, and the classes that key may use."""

    name: str
    plan: Plan
    max_class: PriorityClass | None = None  # None: the plan's
    default_class: PriorityClass | None = None
    key_id: str | None = None  # the key's short public id (``key_id``); None: no key (open mode)

    def __post_init__(self) -> None:
        if self.max_class is None:
            object.__setattr__(self, "max_class", self.plan.max_class)
        if self.default_class is None:
            object.__setattr__(self, "default_class", self.plan.default_class)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(digest: str) -> str:
    """A key's short public id: the first 12 hex digits of its stored SHA-256 digest. It
    names the key in usage records, audit lines and ``keys revoke``; 48 bits of a hash of
    a 256-bit random key say nothing useful about the key."""
    return digest[:KEY_ID_CHARS]


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass
class KeyStore:
    accounts: dict[str, Account]
    key_hashes: dict[str, str] = field(default_factory=dict)  # sha256 hex -> account name (every key in the file)
    open_mode: bool = False
    refused: frozenset[str] = frozenset()  # digests refused outright: revoked, or of a suspended account
    expires_at: dict[str, float] = field(default_factory=dict)  # digest -> epoch seconds it stops working
    now: Callable[[], float] = time.time  # wall clock for expiry; tests inject their own
    suspended: frozenset[str] = frozenset()  # accounts suspended in the file
    revoked: frozenset[str] = frozenset()  # digests of revoked keys (disabled in the file)

    @classmethod
    def open(cls, budget: int) -> KeyStore:
        """Open mode (development): one anonymous account that may use every class."""
        plan = Plan(OPEN_PLAN, budget, max_class=PriorityClass.STAT)
        return cls({OPEN_ACCOUNT: Account(OPEN_ACCOUNT, plan)}, open_mode=True)

    @classmethod
    def load(cls, path: str | os.PathLike, now: Callable[[], float] = time.time) -> KeyStore:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise KeysFileError(f"cannot read keys file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise KeysFileError(f"keys file {path} is not valid YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path), now=now)

    @classmethod
    def from_dict(cls, data: object, source: str = "keys file", now: Callable[[], float] = time.time) -> KeyStore:
        spec = parse_keys_file(data, source)
        plans = {
            name: Plan(
                name,
                plan.concurrency,
                PlanQueue(plan.queue.max_waiting, plan.queue.timeout_s) if plan.queue else None,
                PriorityClass(plan.priority.max),
                PriorityClass(plan.priority.default),
            )
            for name, plan in spec.plans.items()
        }
        accounts = {name: Account(name, plans[account.plan]) for name, account in spec.accounts.items()}
        suspended = {name for name, account in spec.accounts.items() if account.suspended}
        store = cls(
            accounts, {key.sha256: key.account for key in spec.keys},
            refused=frozenset(key.sha256 for key in spec.keys if key.disabled or key.account in suspended),
            expires_at={key.sha256: key.expires.timestamp() for key in spec.keys if key.expires is not None},
            now=now, suspended=frozenset(suspended),
            revoked=frozenset(key.sha256 for key in spec.keys if key.disabled),
        )  # fmt: skip
        for key in spec.keys:  # each key's view: its id, and its classes when they differ from its plan's
            store._key_accounts[key.sha256] = Account(
                key.account, plans[spec.accounts[key.account].plan],
                PriorityClass(key.priority.max) if key.priority else None,
                PriorityClass(key.priority.default) if key.priority else None,
                key_id=key_id(key.sha256),
            )  # fmt: skip
        return store

    def __post_init__(self) -> None:
        # Candidates are found by a short digest prefix, then every candidate's full digest
        # is compared with hmac.compare_digest: no early-exit comparison on secret bytes.
        self._buckets: dict[str, list[tuple[str, str]]] = {}
        for digest, account in self.key_hashes.items():
            self._buckets.setdefault(digest[:4], []).append((digest, account))
        self._key_accounts: dict[str, Account] = {}  # digest -> the account as that key sees it

    def authenticate(self, key: str | None) -> Account | None:
        """The account ``key`` belongs to, or None (unknown, revoked, expired, or its account
        suspended). Open mode accepts any key or none."""
        if self.open_mode:
            return self.accounts[OPEN_ACCOUNT]
        if not key:
            return None
        digest = hash_key(key)
        found = None
        for candidate, account in self._buckets.get(digest[:4], ()):
            if hmac.compare_digest(candidate, digest):
                found = candidate, account
        if found is None or found[0] in self.refused:
            return None
        expires = self.expires_at.get(found[0])
        if expires is not None and self.now() >= expires:
            return None
        return self._key_accounts.get(found[0]) or self.accounts[found[1]]

