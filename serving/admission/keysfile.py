"""The keys file's one schema: what start-up and every reload accept, and nothing else.

Guarantees:
- ``parse_keys_file`` either returns a fully validated ``KeysFile`` or raises
  ``KeysFileError`` naming every problem by its place in the file (``plans.clinic.
  concurrency: ...``); it never raises anything else, whatever the YAML held (a list where
  a mapping belongs, a string for a number, a boolean for a count).
- Counts are strict integers: ``concurrency: true`` or ``"2"`` is refused, not read as 1/2.
- Cross-references hold: every account's plan exists, every key's account exists, and no
  key digest appears twice.
- Times (``created``, ``expires``, ``disabled_at``) are timezone-aware: an ISO 8601 string
  or a YAML timestamp with an offset (``2025-07-01T00:00:00Z``); a naive time or a bare
  date is refused, since the server could not tell which instant it names.
- Flags are strict booleans: ``disabled: "no"`` or ``suspended: 1`` is refused.
- Messages never quote a value (a value could be a pasted secret); the file holds hashes.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator,
    model_validator,
)  # fmt: skip


NAME_MAX = 256  # plan and account names, as usage records allow them
KEY_ID_CHARS = 12  # a key's public id: this many leading hex digits of its digest (``keys.key_id``)


class KeysFileError(ValueError):
    """The keys file cannot be used; the message says why."""


def aware_time(value: object) -> datetime:
    """A timezone-aware datetime from YAML's timestamp or an ISO 8601 string; ValueError
    (never quoting the value) for anything else."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError("must be an ISO 8601 date-time with a timezone, like 2025-07-01T00:00:00Z") from None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("has no timezone; write it with one, like 2025-07-01T00:00:00Z or +02:00")
        return value
    if isinstance(value, date):
        raise ValueError("is a date without a time; write a date-time with a timezone, like 2025-07-01T00:00:00Z")
    raise ValueError("must be an ISO 8601 date-time with a timezone, like 2025-07-01T00:00:00Z")


AwareTime = Annotated[datetime, BeforeValidator(aware_time)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlanQueueSpec(_Strict):
    """Requests of an account at its limit wait (up to ``max_waiting``, ``timeout_s``) instead of a 429."""

    max_waiting: Annotated[StrictInt, Field(ge=1)]
    timeout_s: Annotated[float, Field(gt=0)]

    @field_validator("timeout_s", mode="before")
    @classmethod
    def _a_number(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number of seconds")
        return value


PriorityName = Literal["stat", "interactive", "batch"]
_RANK = {"stat": 0, "interactive": 1, "batch": 2}


class PrioritySpec(_Strict):
    """The most urgent class requests may ask for (``max``) and what they get unasked (``default``)."""

    max: PriorityName = "interactive"
    default: PriorityName = "interactive"

    @model_validator(mode="after")
    def _default_within_max(self) -> PrioritySpec:
        if _RANK[self.default] < _RANK[self.max]:
            raise ValueError(f"default {self.default!r} is more urgent than max {self.max!r}")
        return self


class PlanSpec(_Strict):
    concurrency: Annotated[StrictInt, Field(ge=1)]
    queue: PlanQueueSpec | None = None
    priority: PrioritySpec = Field(default_factory=PrioritySpec)


class AccountSpec(_Strict):
    plan: Annotated[str, Field(min_length=1, strict=True)]
    suspended: StrictBool = False  # every key of a suspended account is refused


class KeySpec(_Strict):
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$", strict=True)]
    account: Annotated[str, Field(min_length=1, strict=True)]
    label: Annotated[str, Field(strict=True)] | None = None
    priority: PrioritySpec | None = None  # this key's classes, in place of its plan's
    created: AwareTime | None = None
    expires: AwareTime | None = None  # refused from this instant on (checked per request)
    disabled: StrictBool = False  # revoked
    disabled_at: AwareTime | None = None

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class KeysFile(_Strict):
    plans: dict[str, PlanSpec] = Field(default_factory=dict)
    accounts: dict[str, AccountSpec] = Field(default_factory=dict)
    keys: list[KeySpec] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: object) -> object:
        # "plans:" with nothing under it is YAML's null: an empty section.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @model_validator(mode="after")
    def _references(self) -> KeysFile:
        problems = []
        for section, names in (("plans", self.plans), ("accounts", self.accounts)):
            long = [n for n in names if len(n) > NAME_MAX]
            if long:  # names land in usage records and metric labels: keep them bounded
                problems.append(f"{section}: a name is longer than {NAME_MAX} characters")
        for name, account in self.accounts.items():
            if account.plan not in self.plans:
                problems.append(f"account {name!r} has unknown plan {account.plan!r}")
        seen: set[str] = set()
        ids: set[str] = set()
        for i, key in enumerate(self.keys):
            if key.account not in self.accounts:
                problems.append(f"keys[{i}] names unknown account {key.account!r}")
            if key.sha256 in seen:
                problems.append(f"keys[{i}] repeats a key")
            elif key.sha256[:KEY_ID_CHARS] in ids:
                problems.append(f"keys[{i}] has the same key id (first {KEY_ID_CHARS} hex digits) as another key")
            seen.add(key.sha256)
            ids.add(key.sha256[:KEY_ID_CHARS])
        if problems:
            raise ValueError("; ".join(problems))
        return self


def parse_keys_file(data: object, source: str = "keys file") -> KeysFile:
    """Validate a loaded keys file (YAML's result) against the one schema."""
    if not isinstance(data, dict):
        raise KeysFileError(f"{source}: expected a mapping with plans, accounts and keys")
    try:
        return KeysFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise KeysFileError(f"{source}: " + "; ".join(problems)) from None
