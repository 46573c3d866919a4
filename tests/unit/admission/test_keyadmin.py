"""Key lifecycle edits: each one's effect on authentication, its audit record, and what it refuses."""

import json
import os
import re
import stat
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest
import yaml

from serving.admission.keyadmin import (
    add_key, list_keys, restore_key, resume_account, revoke_key, rotate_key, set_expiry, suspend_account,
)  # fmt: skip
from serving.admission.keyaudit import key_change_record
from serving.admission.keys import KeysFileError, KeyStore, hash_key, key_id

SCHEMA = json.loads((Path(__file__).parents[3] / "serving/usage/usage-record.schema.json").read_text())
KEY_CHANGE = jsonschema.Draft202012Validator({**SCHEMA, "oneOf": [{"$ref": "#/$defs/key_change"}]})
UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PLANS = {"plans": {"small": {"concurrency": 2}, "clinic": {"concurrency": 8}}}


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(PLANS))
    return path


def audit_lines(path: Path) -> list[dict]:
    audit = path.with_name(path.name + ".audit.jsonl")
    return [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []


def load(path: Path, at: float | None = None) -> KeyStore:
    store = KeyStore.load(path, now=time.time if at is None else (lambda: at))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    return store


def name(store: KeyStore, key: str) -> str | None:
    account = store.authenticate(key)
    return account and account.name


def assert_secret_free(path: Path, *keys: str) -> None:
    """Neither the keys file nor its audit file holds a key; the audit file holds no full digest."""
    audit = path.with_name(path.name + ".audit.jsonl").read_text()
    for key in keys:
        assert key not in path.read_text() and key not in audit
        assert hash_key(key) not in audit
    for record in audit_lines(path):
        KEY_CHANGE.validate(record)
        assert UTC_MS.match(record["time"]) and record["source"] == "cli" and record["v"] == 1


def test_add_writes_created_and_one_audit_record(keys_file):
    before = time.time()
    key = add_key(keys_file, "acme", "small", label="PACS")
    entry = yaml.safe_load(keys_file.read_text())["keys"][0]
    assert before - 1 <= datetime.fromisoformat(entry["created"]).timestamp() <= time.time()
    [record] = audit_lines(keys_file)
    assert record["action"] == "added" and record["account"] == "acme" and record["plan"] == "small"
    assert record["key_id"] == hash_key(key)[:12] and record["label"] == "PACS" and "actor" in record
    assert name(load(keys_file), key) == "acme"
    assert_secret_free(keys_file, key)


def test_add_with_expiry_and_into_a_suspended_account(keys_file):
    soon = datetime.now(UTC) + timedelta(hours=1)
    key = add_key(keys_file, "acme", "small", expires=soon)
    assert name(load(keys_file), key) == "acme"
    assert name(load(keys_file, at=soon.timestamp() + 1), key) is None
    with pytest.raises(KeysFileError, match="in the past"):
        add_key(keys_file, "acme", "small", expires=datetime.now(UTC) - timedelta(seconds=5))
    suspend_account(keys_file, "acme")
    later = add_key(keys_file, "acme", "small")  # an existing account keeps its suspension
    assert name(load(keys_file), later) is None


def test_rotate_with_grace_keeps_both_keys_until_the_grace_ends(keys_file):
    old = add_key(keys_file, "acme", "small")
    other = add_key(keys_file, "beta", "clinic")
    new = rotate_key(keys_file, "acme", 3600, label="rotated")
    store = load(keys_file)
    assert name(store, old) == name(store, new) == "acme" and name(store, other) == "beta"
    after = load(keys_file, at=time.time() + 3601)
    assert name(after, old) is None and name(after, new) == "acme" and name(after, other) == "beta"
    added, expiry = audit_lines(keys_file)[2:]
    assert added["action"] == "added" and added["key_id"] == key_id(hash_key(new))
    assert expiry["action"] == "expiry_set" and expiry["key_id"] == key_id(hash_key(old))
    assert abs(datetime.fromisoformat(expiry["expires"]).timestamp() - (time.time() + 3600)) < 5
    assert_secret_free(keys_file, old, other, new)


def test_rotate_with_no_grace_stops_the_old_keys_now(keys_file):
    old = [add_key(keys_file, "acme", "small") for _ in range(2)]
    new = rotate_key(keys_file, "acme", 0)
    store = load(keys_file)
    assert [name(store, key) for key in old] == [None, None] and name(store, new) == "acme"
    assert [i.state for i in list_keys(keys_file)] == ["expired", "expired", "active"]


def test_rotate_leaves_sooner_expiries_and_dead_keys_alone(keys_file):
    soon, revoked, open_ended = (add_key(keys_file, "acme", "small") for _ in range(3))
    soon_at = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=1)
    set_expiry(keys_file, key_id(hash_key(soon)), soon_at)
    revoke_key(keys_file, key_id(hash_key(revoked)))
    rotate_key(keys_file, "acme", 86400)
    by_id = {i.key_id: i for i in list_keys(keys_file)}
    assert by_id[key_id(hash_key(soon))].expires == soon_at
    assert by_id[key_id(hash_key(revoked))].expires is None and by_id[key_id(hash_key(revoked))].state == "revoked"
    assert by_id[key_id(hash_key(open_ended))].expires > soon_at + timedelta(hours=23)
    changed = [r["key_id"] for r in audit_lines(keys_file) if r["action"] == "expiry_set"]
    assert changed == [key_id(hash_key(soon)), key_id(hash_key(open_ended))]  # set_expiry, then rotate's one


def test_revoke_and_restore(keys_file):
    key = add_key(keys_file, "acme", "small")
    kid = key_id(hash_key(key))
    [record] = revoke_key(keys_file, kid.upper())
    assert record["action"] == "revoked" and name(load(keys_file), key) is None
    entry = yaml.safe_load(keys_file.read_text())["keys"][0]
    assert entry["disabled"] is True and datetime.fromisoformat(entry["disabled_at"]).tzinfo
    assert revoke_key(keys_file, kid) == [] and len(audit_lines(keys_file)) == 2  # a no-op records nothing
    assert restore_key(keys_file, kid)[0]["action"] == "restored"
    assert name(load(keys_file), key) == "acme" and "disabled" not in keys_file.read_text()
    assert restore_key(keys_file, kid) == []
    assert_secret_free(keys_file, key)


def test_suspend_refuses_every_key_of_the_account_only(keys_file):
    a1, a2 = add_key(keys_file, "acme", "small"), add_key(keys_file, "acme", "small")
    other = add_key(keys_file, "beta", "small")
    [record] = suspend_account(keys_file, "acme")
    assert record["action"] == "account_suspended" and record["key_id"] is None and record["plan"] == "small"
    store = load(keys_file)
    assert name(store, a1) is None and name(store, a2) is None and name(store, other) == "beta"
    assert {i.key_id: i.state for i in list_keys(keys_file)}[key_id(hash_key(a1))] == "suspended"
    assert suspend_account(keys_file, "acme") == []
    assert resume_account(keys_file, "acme")[0]["action"] == "account_resumed"
    store = load(keys_file)
    assert name(store, a1) == name(store, a2) == "acme"
    assert_secret_free(keys_file, a1, a2, other)


def test_expiry_is_checked_when_the_key_is_used_not_when_loaded(keys_file):
    key = add_key(keys_file, "acme", "small")
    kid = key_id(hash_key(key))
    at = datetime.now(UTC) + timedelta(minutes=5)
    [record] = set_expiry(keys_file, kid, at.astimezone(timezone(timedelta(hours=2))))
    assert record["action"] == "expiry_set" and record["expires"].endswith("Z")
    clock = [time.time()]
    store = KeyStore.load(keys_file, now=lambda: clock[0])  # loaded once, never reloaded
    assert name(store, key) == "acme"
    clock[0] = at.timestamp()
    assert name(store, key) is None
    assert set_expiry(keys_file, kid, at) == []  # the same instant, another offset: no change
    set_expiry(keys_file, kid, None)
    assert name(load(keys_file, at=at.timestamp() + 10**6), key) == "acme"
    assert audit_lines(keys_file)[-1]["expires"] is None
    set_expiry(keys_file, kid, datetime.now(UTC) - timedelta(seconds=1))
    assert name(load(keys_file), key) is None and list_keys(keys_file)[0].state == "expired"


def test_list_shows_ids_and_states_never_a_key_or_digest(keys_file):
    keys = [add_key(keys_file, "acme", "small", label="PACS"), add_key(keys_file, "beta", "clinic")]
    revoke_key(keys_file, key_id(hash_key(keys[1])))
    infos = list_keys(keys_file)
    assert [(i.key_id, i.account, i.plan, i.label, i.state) for i in infos] == [
        (key_id(hash_key(keys[0])), "acme", "small", "PACS", "active"),
        (key_id(hash_key(keys[1])), "beta", "clinic", None, "revoked"),
    ]
    text = json.dumps([i.as_json() for i in infos])
    assert all(key not in text and hash_key(key) not in text for key in keys)
    assert UTC_MS.match(infos[0].as_json()["created"])


def test_a_running_servers_reload_picks_up_each_change(keys_file):
    from prometheus_client import CollectorRegistry

    from serving.admission.keyreload import KeyReloader
    from serving.metrics import ServingMetrics

    class Holder:
        keys = None

    key = add_key(keys_file, "acme", "small")
    holder = Holder()
    reloader = KeyReloader(keys_file, holder, ServingMetrics(CollectorRegistry()))
    assert reloader.reload() and name(holder.keys, key) == "acme"
    revoke_key(keys_file, key_id(hash_key(key)))
    assert reloader.check() and name(holder.keys, key) is None
    restore_key(keys_file, key_id(hash_key(key)))
    assert reloader.check() and name(holder.keys, key) == "acme"
    new = rotate_key(keys_file, "acme", 0)
    assert reloader.check() and name(holder.keys, key) is None and name(holder.keys, new) == "acme"


def test_naive_times_are_refused(keys_file):
    key = add_key(keys_file, "acme", "small")
    naive = datetime.now() + timedelta(hours=1)
    with pytest.raises(KeysFileError, match="timezone"):
        add_key(keys_file, "acme", "small", expires=naive)
    with pytest.raises(KeysFileError, match="timezone"):
        set_expiry(keys_file, key_id(hash_key(key)), naive)
    data = yaml.safe_load(keys_file.read_text())
    data["keys"][0]["expires"] = naive  # YAML writes it without an offset
    keys_file.write_text(yaml.safe_dump(data))
    with pytest.raises(KeysFileError, match=r"keys\.0\.expires: has no timezone"):
        KeyStore.load(keys_file)


@pytest.mark.parametrize("operation", [
    lambda path: revoke_key(path, "0123456789ab"),
    lambda path: restore_key(path, "0123456789ab"),
    lambda path: set_expiry(path, "0123456789ab", None),
])  # fmt: skip
def test_unknown_key_ids_are_refused(keys_file, operation):
    add_key(keys_file, "acme", "small")
    before = keys_file.read_text()
    with pytest.raises(KeysFileError, match="no key with id '0123456789ab'"):
        operation(keys_file)
    assert keys_file.read_text() == before and len(audit_lines(keys_file)) == 1


def test_a_pasted_key_is_refused_without_being_echoed(keys_file):
    key = add_key(keys_file, "acme", "small")
    for wrong in (key, hash_key(key)):
        with pytest.raises(KeysFileError) as info:
            revoke_key(keys_file, wrong)
        assert "12 hex digits" in str(info.value) and key not in str(info.value) and hash_key(key) not in str(info.value)


@pytest.mark.parametrize("operation", [
    lambda path: rotate_key(path, "nobody", 60),
    lambda path: suspend_account(path, "nobody"),
    lambda path: resume_account(path, "nobody"),
])  # fmt: skip
def test_unknown_accounts_are_refused(keys_file, operation):
    with pytest.raises(KeysFileError, match="no account 'nobody'"):
        operation(keys_file)
    assert audit_lines(keys_file) == []


@pytest.mark.parametrize("grace", [-1, float("nan"), float("inf"), True])
def test_rotate_refuses_a_bad_grace(keys_file, grace):
    add_key(keys_file, "acme", "small")
    with pytest.raises(KeysFileError, match="grace"):
        rotate_key(keys_file, "acme", grace)


@pytest.mark.parametrize("operation", [
    lambda path: add_key(path, "acme", "small"),
    lambda path: list_keys(path),
    lambda path: revoke_key(path, "0123456789ab"),
    lambda path: rotate_key(path, "acme", 0),
    lambda path: suspend_account(path, "acme"),
])  # fmt: skip
def test_a_broken_file_is_refused_and_left_alone(tmp_path, operation):
    path = tmp_path / "keys.yaml"
    path.write_text("plans: {small: {concurrency: many}}\naccounts: {acme: {plan: small}}\n")
    with pytest.raises(KeysFileError, match="plans.small.concurrency"):
        operation(path)
    assert path.read_text().startswith("plans: {small: {concurrency: many}}") and audit_lines(path) == []


def test_missing_file_is_refused_except_by_add(tmp_path):
    with pytest.raises(KeysFileError, match="cannot read"):
        revoke_key(tmp_path / "missing.yaml", "0123456789ab")
    with pytest.raises(KeysFileError, match="plan 'small' is not in"):
        add_key(tmp_path / "missing.yaml", "acme", "small")
    assert not (tmp_path / "missing.yaml").exists()


def test_audit_file_can_be_elsewhere_and_must_be_writable(keys_file, tmp_path):
    elsewhere = tmp_path / "audit" / "keys.jsonl"
    elsewhere.parent.mkdir()
    key = add_key(keys_file, "acme", "small", audit_file=elsewhere)
    assert json.loads(elsewhere.read_text())["action"] == "added" and audit_lines(keys_file) == []
    assert stat.S_IMODE(os.stat(elsewhere).st_mode) == 0o600
    before = keys_file.read_text()
    with pytest.raises(KeysFileError, match="cannot write the audit file"):
        revoke_key(keys_file, key_id(hash_key(key)), audit_file=tmp_path / "no-such-folder" / "a.jsonl")
    assert keys_file.read_text() == before and name(load(keys_file), key) == "acme"


def test_concurrent_edits_lose_nothing(keys_file):
    keys: list[str] = []

    def add_some(account):
        keys.extend(add_key(keys_file, account, "small") for _ in range(8))

    threads = [threading.Thread(target=add_some, args=(f"acct-{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store = load(keys_file)
    assert len(keys) == 24 and all(store.authenticate(key) for key in keys)
    assert len(audit_lines(keys_file)) == 24


def test_key_change_record_refuses_keys_digests_and_unknown_fields():
    record = key_change_record("reloaded", None, None, "reload", replica="host-1:42", time=0)
    KEY_CHANGE.validate(record)
    assert record["time"] == "1970-01-01T00:00:00.000Z"
    with pytest.raises(ValueError, match="12-hex-digit"):
        key_change_record("revoked", "acme", "a" * 64, "cli")
    with pytest.raises(ValueError, match="no"):
        key_change_record("revoked", "acme", "a" * 12, "cli", sha256="a" * 64)
    with pytest.raises(ValueError, match="action"):
        key_change_record("deleted", "acme", "a" * 12, "cli")
    long_label = key_change_record("added", "acme", "a" * 12, "cli", label="x" * 1000)
    KEY_CHANGE.validate(long_label)
