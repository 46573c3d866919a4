import os
import stat
from datetime import UTC, datetime

import pytest
import yaml

from serving.admission.keyadmin import add_key
from serving.admission.keys import KeysFileError, KeyStore, hash_key

PLANS = {"plans": {"small": {"concurrency": 2}, "clinic": {"concurrency": 8, "queue": {"max_waiting": 4, "timeout_s": 5}}}}


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(PLANS))
    return path


def test_add_key_stores_only_the_hash_and_authenticates(keys_file):
    key = add_key(keys_file, "st-marys", "clinic", label="PACS")
    text = keys_file.read_text()
    assert key.startswith("mgk_") and len(key) > 40
    assert key not in text and hash_key(key) in text
    assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600
    store = KeyStore.load(keys_file)
    account = store.authenticate(key)
    assert account.name == "st-marys" and account.plan.concurrency == 8
    assert account.plan.queue.max_waiting == 4
    assert store.authenticate(key + "x") is None
    assert store.authenticate("") is None and store.authenticate(None) is None


def test_accounts_share_a_budget_across_keys(keys_file):
    k1 = add_key(keys_file, "acme", "small")
    k2 = add_key(keys_file, "acme", "small")
    store = KeyStore.load(keys_file)
    a1, a2 = store.authenticate(k1), store.authenticate(k2)
    assert k1 != k2 and a1.name == a2.name == "acme" and a1.plan is a2.plan  # one ledger budget
    assert a1.key_id != a2.key_id and a1.key_id == hash_key(k1)[:12]  # each key its own public id


def test_add_key_refuses_unknown_plan_and_plan_change(keys_file):
    with pytest.raises(KeysFileError, match="plan 'gold'"):
        add_key(keys_file, "acme", "gold")
    add_key(keys_file, "acme", "small")
    with pytest.raises(KeysFileError, match="is on plan 'small'"):
        add_key(keys_file, "acme", "clinic")


PLAN = {"p": {"concurrency": 1}}
ACCOUNT = {"a": {"plan": "p"}}
DIGEST = "a" * 64
_KEY = f"plans: {{p: {{concurrency: 1}}}}\naccounts: {{a: {{plan: p}}}}\nkeys: [{{sha256: {DIGEST}, account: a"

# Every shape a hand-edited file can take that is not a keys file: (YAML text, what the
# message must name). The same table drives the reload test (tests/unit/admission/test_keyreload.py).
MALFORMED = [
    ("[1, 2]", "mapping"),
    ("just a string", "mapping"),
    ("plans: [{concurrency: 1}]", "plans: Input should be a valid dictionary"),
    ("plans: {p: [1]}", "plans.p"),
    ("plans: {p: 3}", "plans.p"),
    ("plans: {p: {concurrency: two}}", "plans.p.concurrency"),
    ("plans: {p: {concurrency: true}}", "plans.p.concurrency"),
    ("plans: {p: {concurrency: '2'}}", "plans.p.concurrency"),
    ("plans: {p: {concurrency: 1.5}}", "plans.p.concurrency"),
    ("plans: {p: {concurrency: 0}}", "greater than or equal to 1"),
    ("plans: {p: {concurrency: 1, burst: 4}}", "plans.p.burst"),
    ("plans: {p: {concurrency: 1, queue: {max_waiting: 2}}}", "plans.p.queue.timeout_s"),
    ("plans: {p: {concurrency: 1, queue: [2, 30]}}", "plans.p.queue"),
    ("plans: {p: {concurrency: 1, queue: {max_waiting: 2, timeout_s: true}}}", "plans.p.queue.timeout_s"),
    ("plans: {p: {concurrency: 1, queue: {max_waiting: 0, timeout_s: 3}}}", "plans.p.queue.max_waiting"),
    ("plans: {p: {concurrency: 1}}\naccounts: [a]", "accounts: Input should be a valid dictionary"),
    ("plans: {p: {concurrency: 1}}\naccounts: {a: p}", "accounts.a"),
    ("plans: {p: {concurrency: 1}}\naccounts: {a: {plan: q}}", "unknown plan"),
    ("plans: {p: {concurrency: 1}}\naccounts: {a: {plan: [p]}}", "accounts.a.plan"),
    (f"plans: {{p: {{concurrency: 1}}}}\naccounts: {{a: {{plan: p}}}}\nkeys: {{{DIGEST}: a}}", "keys: Input should be a valid list"),
    ("plans: {p: {concurrency: 1}}\naccounts: {a: {plan: p}}\nkeys: [zz]", "keys.0"),
    ("plans: {p: {concurrency: 1}}\naccounts: {a: {plan: p}}\nkeys: [{sha256: zz, account: a}]", "keys.0.sha256"),
    (f"plans: {{p: {{concurrency: 1}}}}\naccounts: {{a: {{plan: p}}}}\nkeys: [{{sha256: {DIGEST}, account: b}}]", "unknown account"),
    (f"plans: {{p: {{concurrency: 1}}}}\naccounts: {{a: {{plan: p}}}}\nkeys: [{{sha256: {DIGEST}, account: a}}, {{sha256: {DIGEST}, account: a}}]", "repeats a key"),
    (f"plans: {{p: {{concurrency: 1}}}}\naccounts: {{a: {{plan: p}}}}\nkeys: [{{sha256: {DIGEST}}}]", "keys.0.account"),
    ("plans: {p: {concurrency: 1}}\nplanz: {}", "planz"),
    (f"{_KEY}, expires: 2030-01-01 00:00:00}}]", "keys.0.expires: has no timezone"),
    (f"{_KEY}, expires: 2030-01-01}}]", "keys.0.expires: is a date without a time"),
    (f"{_KEY}, expires: 'next tuesday'}}]", "keys.0.expires: must be an ISO 8601"),
    (f"{_KEY}, expires: 1893456000}}]", "keys.0.expires: must be an ISO 8601"),
    (f"{_KEY}, created: '2030-01-01T00:00:00'}}]", "keys.0.created: has no timezone"),
    (f"{_KEY}, disabled_at: [2030]}}]", "keys.0.disabled_at"),
    (f"{_KEY}, disabled: 'no'}}]", "keys.0.disabled"),
    (f"{_KEY}, disabled: 1}}]", "keys.0.disabled"),
    ("plans: {p: {concurrency: 1}}\naccounts: {a: {plan: p, suspended: 'yes'}}", "accounts.a.suspended"),
    ("plans: [", "not valid YAML"),
]  # fmt: skip


@pytest.mark.parametrize("text, message", MALFORMED, ids=[m[0][:40] for m in MALFORMED])
def test_malformed_keys_files_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(KeysFileError) as info:
        KeyStore.load(path)
    assert message in str(info.value)


def test_empty_sections_are_empty_and_a_good_file_loads():
    store = KeyStore.from_dict({"plans": PLAN, "accounts": ACCOUNT, "keys": None})
    assert store.accounts["a"].plan.concurrency == 1 and store.key_hashes == {}
    store = KeyStore.from_dict(
        {"plans": {"q": {"concurrency": 3, "queue": {"max_waiting": 2, "timeout_s": 5}}},
         "accounts": {"a": {"plan": "q"}}, "keys": [{"sha256": DIGEST.upper(), "account": "a", "label": "PACS"}]}
    )  # fmt: skip
    assert store.accounts["a"].plan.queue.timeout_s == 5.0 and store.key_hashes == {DIGEST: "a"}


def test_add_key_refuses_a_malformed_file_and_leaves_it_alone(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("plans: [{concurrency: 1}]\n")
    with pytest.raises(KeysFileError, match="plans"):
        add_key(path, "acme", "p")
    assert path.read_text() == "plans: [{concurrency: 1}]\n"


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(KeysFileError, match="cannot read"):
        KeyStore.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("plans: [")
    with pytest.raises(KeysFileError, match="not valid YAML"):
        KeyStore.load(bad)


def test_open_mode_accepts_anyone_into_one_account():
    store = KeyStore.open(4)
    assert store.open_mode
    assert store.authenticate(None) is store.authenticate("anything")
    assert store.authenticate(None).plan.concurrency == 4


def test_time_errors_never_quote_the_value(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"{_KEY}, expires: 'mgk_pasted-secret-by-mistake'}}]")
    with pytest.raises(KeysFileError) as info:
        KeyStore.load(path)
    assert "keys.0.expires" in str(info.value) and "pasted-secret" not in str(info.value)


def key_entry(key: str, **extra) -> dict:
    return {"sha256": hash_key(key), "account": extra.pop("account", "a"), **extra}


def test_revoked_expired_and_suspended_keys_are_refused_at_authentication():
    clock = [1_000_000.0]
    store = KeyStore.from_dict({
        "plans": PLAN, "accounts": {"a": {"plan": "p"}, "b": {"plan": "p", "suspended": True}},
        "keys": [
            key_entry("live", created="2020-01-01T00:00:00Z"),
            key_entry("revoked", disabled=True, disabled_at="2020-01-02T00:00:00+02:00"),
            key_entry("ending", expires=datetime.fromtimestamp(1_000_060, UTC)),  # YAML's own datetime
            key_entry("suspended", account="b"),
        ],
    }, now=lambda: clock[0])  # fmt: skip
    assert store.authenticate("live").name == "a" and store.authenticate("ending").name == "a"
    assert store.authenticate("revoked") is None and store.authenticate("suspended") is None
    clock[0] = 1_000_060.0  # the expiry instant itself: refused, without a reload
    assert store.authenticate("ending") is None and store.authenticate("live").name == "a"
    assert set(store.key_hashes) == {hash_key(k) for k in ("live", "revoked", "ending", "suspended")}


def test_names_longer_than_a_usage_record_allows_are_refused():
    data = {"plans": {"p": {"concurrency": 1}}, "accounts": {"a" * 257: {"plan": "p"}}, "keys": []}
    with pytest.raises(KeysFileError, match="accounts: a name is longer than 256"):
        KeyStore.from_dict(data)
    KeyStore.from_dict({**data, "accounts": {"a" * 256: {"plan": "p"}}})
