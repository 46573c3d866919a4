"""``medgemma-serve keys ...`` through ``serving.cli.main``: a key is printed once, listings never show one."""

import json
import time
from datetime import UTC, datetime

import pytest
import yaml

from serving import cli
from serving.admission.keys import KeyStore, hash_key, key_id
from serving.keyscli import parse_duration, parse_when


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"plans": {"small": {"concurrency": 2}}}))
    return path


def keys(capsys, *args: str) -> tuple[int, str, str]:
    status = cli.main(["keys", *args])
    out, err = capsys.readouterr()
    return status, out, err


def add(capsys, path, account="acme", *extra: str) -> str:
    status, out, err = keys(capsys, "add", "--file", str(path), "--account", account, "--plan", "small", *extra)
    assert status == 0 and "only time it is shown" in err
    return out.strip()


def test_add_prints_the_key_once_and_list_never_shows_it(keys_file, capsys):
    key = add(capsys, keys_file, "acme", "--label", "PACS", "--expires", "30d")
    other = add(capsys, keys_file, "beta")
    status, table, _ = keys(capsys, "list", "--file", str(keys_file))
    assert status == 0
    header, *rows = table.splitlines()
    assert header.split() == ["KEY", "ID", "ACCOUNT", "PLAN", "LABEL", "CREATED", "EXPIRES", "STATE"]
    assert rows[0].split()[:4] == [key_id(hash_key(key)), "acme", "small", "PACS"] and rows[0].endswith("active")
    assert rows[1].split()[:4] == [key_id(hash_key(other)), "beta", "small", "-"]
    status, listing, _ = keys(capsys, "list", "--file", str(keys_file), "--format", "json")
    infos = json.loads(listing)
    assert [i["key_id"] for i in infos] == [key_id(hash_key(key)), key_id(hash_key(other))]
    assert abs(datetime.fromisoformat(infos[0]["expires"]).timestamp() - (time.time() + 30 * 86400)) < 5
    for text in (table, listing):
        assert key not in text and hash_key(key) not in text and hash_key(other) not in text


def test_rotate_prints_only_the_new_key_and_when_the_old_ones_stop(keys_file, capsys):
    old = add(capsys, keys_file)
    status, out, err = keys(capsys, "rotate", "--file", str(keys_file), "--account", "acme", "--grace", "24h")
    assert status == 0
    [new] = out.splitlines()
    assert new.startswith("mgk_") and new != old and (out + err).count(new) == 1 and old not in out + err
    assert "keep working until" in err and "(in 24h)" in err
    store = KeyStore.load(keys_file)
    assert store.authenticate(old).name == store.authenticate(new).name == "acme"
    status, _, err = keys(capsys, "rotate", "--file", str(keys_file), "--account", "acme", "--grace", "0")
    assert status == 0 and "stop working now" in err
    assert KeyStore.load(keys_file).authenticate(new) is None


def test_revoke_restore_expire_suspend_resume(keys_file, capsys):
    key = add(capsys, keys_file)
    kid = key_id(hash_key(key))
    audit = keys_file.with_name("audit.jsonl")
    args = ["--file", str(keys_file), "--audit-file", str(audit)]
    status, out, _ = keys(capsys, "revoke", kid, *args)
    assert status == 0 and f"revoked key {kid} of account 'acme'" in out
    assert KeyStore.load(keys_file).authenticate(key) is None
    status, _, err = keys(capsys, "revoke", kid, *args)
    assert status == 0 and "nothing changed" in err
    assert keys(capsys, "restore", kid, *args)[0] == 0 and KeyStore.load(keys_file).authenticate(key)
    status, out, _ = keys(capsys, "expire", kid, "--at", "2020-01-01T00:00:00Z", *args)
    assert status == 0 and "expires at 2020-01-01T00:00:00Z" in out
    assert KeyStore.load(keys_file).authenticate(key) is None
    assert keys(capsys, "expire", kid, "--at", "never", *args)[0] == 0 and KeyStore.load(keys_file).authenticate(key)
    assert keys(capsys, "suspend", "--account", "acme", *args)[0] == 0
    assert KeyStore.load(keys_file).authenticate(key) is None
    assert keys(capsys, "resume", "--account", "acme", *args)[0] == 0 and KeyStore.load(keys_file).authenticate(key)
    actions = [json.loads(line)["action"] for line in audit.read_text().splitlines()]
    assert actions == ["revoked", "restored", "expiry_set", "expiry_set", "account_suspended", "account_resumed"]
    assert key not in audit.read_text() and hash_key(key) not in audit.read_text()


@pytest.mark.parametrize("args, message", [
    (["revoke", "0123456789ab"], "no key with id '0123456789ab'"),
    (["restore", "xyz"], "12 hex digits"),
    (["expire", "0123456789ab", "--at", "2030-01-01T00:00:00"], "has no timezone"),
    (["expire", "0123456789ab", "--at", "2030-01-01"], "has no timezone"),
    (["expire", "0123456789ab", "--at", "soon"], "ISO 8601"),
    (["rotate", "--account", "acme", "--grace", "24"], "a duration is a number and a unit"),
    (["rotate", "--account", "acme", "--grace=-1h"], "a duration"),
    (["rotate", "--account", "nobody", "--grace", "1h"], "no account 'nobody'"),
    (["suspend", "--account", "nobody"], "no account 'nobody'"),
    (["add", "--account", "acme", "--plan", "gold"], "plan 'gold'"),
    (["add", "--account", "acme", "--plan", "small", "--expires", "2030-01-01T00:00"], "has no timezone"),
])  # fmt: skip
def test_bad_input_exits_2_with_the_reason(keys_file, capsys, args, message):
    key = add(capsys, keys_file)
    before = keys_file.read_text()
    status, out, err = keys(capsys, args[0], "--file", str(keys_file), *args[1:])
    assert status == 2 and message in err and out == ""
    assert keys_file.read_text() == before


def test_a_pasted_key_is_never_echoed(keys_file, capsys):
    key = add(capsys, keys_file)
    status, out, err = keys(capsys, "revoke", key, "--file", str(keys_file))
    assert status == 2 and key not in out + err


def test_durations_and_times():
    assert [parse_duration(t) for t in ("0", "90s", "30m", "24h", "7d", "2w", "1.5h")] == [
        0, 90, 1800, 86400, 604800, 1209600, 5400,
    ]
    assert parse_when("never", allow_never=True) is None
    assert parse_when("2030-01-01T02:00:00+02:00", allow_never=False) == datetime(2030, 1, 1, tzinfo=UTC)
    assert abs(parse_when("1h", allow_never=False).timestamp() - (time.time() + 3600)) < 2
