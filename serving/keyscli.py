"""``medgemma-serve keys``: add, list, revoke, restore, rotate, expire, suspend, resume.

Guarantees:
- Each subcommand is one call into ``serving.admission.keyadmin`` (which validates, writes
  atomically and appends the audit record); this module only parses and prints.
- A key is printed once, on stdout, by ``add`` and ``rotate`` and by nothing else;
  ``list`` shows key ids (12 hex digits), never a key or a full digest.
- Bad input (a duration, a time without a timezone, an unknown key id or account, a broken
  keys file) exits 2 with the reason on stderr, and changes nothing.
- A running server picks every change up at its next reload (within about 2 s, or at once
  on SIGHUP); an expiry takes effect at its instant without one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime

from serving.admission import keyadmin
from serving.admission.keysfile import KeysFileError, aware_time

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
SHOWN_ONCE = "(stored only as a SHA-256 hash in {file}; this is the only time it is shown)"
RELOAD_NOTE = "a running server applies it at its next reload (within about 2 s)"


def parse_duration(text: str) -> float:
    """``30m``, ``24h``, ``7d``, ``90s``, ``2w`` or ``0``, in seconds; KeysFileError otherwise."""
    text = text.strip().lower()
    if text == "0":
        return 0.0
    match = _DURATION.match(text)
    if not match:
        raise KeysFileError("a duration is a number and a unit: 90s, 30m, 24h, 7d, 2w (or 0)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def parse_when(text: str, allow_never: bool) -> datetime | None:
    """An ISO 8601 time with a timezone, a duration from now (``7d``), or ``never``."""
    text = text.strip()
    if allow_never and text.lower() == "never":
        return None
    if _DURATION.match(text.lower()) or text == "0":
        return datetime.fromtimestamp(time.time() + parse_duration(text), UTC).replace(microsecond=0)
    try:
        return aware_time(text)
    except ValueError as exc:
        raise KeysFileError(f"the time {exc}" + (", a duration like 7d, or never" if allow_never else "")) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``keys`` subcommand and its own subcommands, on ``medgemma-serve``'s parser."""
    keys = sub.add_parser("keys", help="Manage API keys in a keys file (no server restart needed).")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    def command(name: str, help_text: str, file_help: str = "The keys file.") -> argparse.ArgumentParser:
        parser = keys_sub.add_parser(name, help=help_text)
        parser.add_argument("--file", required=True, help=file_help)
        parser.add_argument("--audit-file", default=None,
                            help="Append the key_change record here (default: <keys file>.audit.jsonl).")  # fmt: skip
        return parser

    add = command("add", "Create a key for an account; prints it once.", "The keys file (created if missing).")
    add.add_argument("--account", required=True, help="Account the key belongs to.")
    add.add_argument("--plan", required=True, help="The account's plan (must exist in the file).")
    add.add_argument("--label", default=None, help="Free-text label stored beside the hash.")
    add.add_argument("--expires", default=None, help="When it stops: ISO time with a timezone, or a duration (90d).")
    listing = command("list", "Show every key: id, account, plan, label, times, state. Never a key.")
    listing.add_argument("--format", choices=("table", "json"), default="table", help="Output format.")
    for name, help_text in (("revoke", "Refuse a key from the next reload on."), ("restore", "Undo a revoke.")):
        command(name, help_text).add_argument("key_id", help="The key's id (12 hex digits, from `keys list`).")
    rotate = command("rotate", "Add a new key for an account; its other keys stop after a grace period.")
    rotate.add_argument("--account", required=True, help="The account whose keys rotate.")
    rotate.add_argument("--grace", required=True, help="How long the old keys keep working: 30m, 24h, 7d, or 0.")
    rotate.add_argument("--label", default=None, help="Label of the new key.")
    expire = command("expire", "Set or clear the time a key stops working.")
    expire.add_argument("key_id", help="The key's id (12 hex digits, from `keys list`).")
    expire.add_argument("--at", required=True, help="ISO time with a timezone, a duration from now (7d), or never.")
    for name, help_text in (("suspend", "Refuse every key of an account."), ("resume", "Undo a suspend.")):
        command(name, help_text).add_argument("--account", required=True, help="The account.")


def run(ns: argparse.Namespace) -> int:
    """Run one ``keys`` subcommand; 0 done (or nothing to change), 2 refused."""
    try:
        return _COMMANDS[ns.keys_command](ns)
    except KeysFileError as exc:
        print(f"medgemma-serve: {exc}", file=sys.stderr)
        return 2


def _add(ns: argparse.Namespace) -> int:
    expires = parse_when(ns.expires, allow_never=False) if ns.expires else None
    key = keyadmin.add_key(ns.file, ns.account, ns.plan, ns.label, expires, audit_file=ns.audit_file)
    print(key)
    print(SHOWN_ONCE.format(file=ns.file), file=sys.stderr)
    return 0


def _list(ns: argparse.Namespace) -> int:
    infos = keyadmin.list_keys(ns.file)
    if ns.format == "json":
        print(json.dumps([info.as_json() for info in infos], indent=2))
        return 0
    header = ("KEY ID", "ACCOUNT", "PLAN", "LABEL", "CREATED", "EXPIRES", "STATE")
    rows = [(i.key_id, i.account, i.plan, i.label or "-", _show(i.created), _show(i.expires), i.state) for i in infos]
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _revoke(ns: argparse.Namespace) -> int:
    return _report(keyadmin.revoke_key(ns.file, ns.key_id, audit_file=ns.audit_file),
                   f"key {ns.key_id} is already revoked", "revoked key {key_id} of account {account!r}")  # fmt: skip


def _restore(ns: argparse.Namespace) -> int:
    return _report(keyadmin.restore_key(ns.file, ns.key_id, audit_file=ns.audit_file),
                   f"key {ns.key_id} is not revoked", "restored key {key_id} of account {account!r}")  # fmt: skip


def _rotate(ns: argparse.Namespace) -> int:
    grace_s = parse_duration(ns.grace)
    key = keyadmin.rotate_key(ns.file, ns.account, grace_s, ns.label, audit_file=ns.audit_file)
    print(key)
    print(SHOWN_ONCE.format(file=ns.file), file=sys.stderr)
    if grace_s == 0:
        print(f"the other keys of account {ns.account!r} stop working now ({RELOAD_NOTE})", file=sys.stderr)
    else:
        stop = _show(datetime.fromtimestamp(time.time() + grace_s, UTC))
        print(f"the other keys of account {ns.account!r} keep working until {stop} (in {ns.grace}), "
              "then only the new key does", file=sys.stderr)  # fmt: skip
    return 0


def _expire(ns: argparse.Namespace) -> int:
    when = parse_when(ns.at, allow_never=True)
    records = keyadmin.set_expiry(ns.file, ns.key_id, when, audit_file=ns.audit_file)
    stops = "never expires" if when is None else f"expires at {_show(when)}"
    return _report(records, f"key {ns.key_id} already {stops}", "key {key_id} of account {account!r} now " + stops)


def _suspend(ns: argparse.Namespace) -> int:
    return _report(keyadmin.suspend_account(ns.file, ns.account, audit_file=ns.audit_file),
                   f"account {ns.account!r} is already suspended", "suspended account {account!r}")  # fmt: skip


def _resume(ns: argparse.Namespace) -> int:
    return _report(keyadmin.resume_account(ns.file, ns.account, audit_file=ns.audit_file),
                   f"account {ns.account!r} is not suspended", "resumed account {account!r}")  # fmt: skip


def _report(records: list[dict], unchanged: str, changed: str) -> int:
    if not records:
        print(f"{unchanged}; nothing changed", file=sys.stderr)
        return 0
    print(changed.format(**records[0]) + f"; {RELOAD_NOTE}")
    return 0


def _show(when: datetime | None) -> str:
    return "-" if when is None else when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


_COMMANDS = {
    "add": _add, "list": _list, "revoke": _revoke, "restore": _restore, "rotate": _rotate,
    "expire": _expire, "suspend": _suspend, "resume": _resume,
}  # fmt: skip
