import os
import stat

import pytest
import yaml

from serving.admission.keys import KeysFileError, KeyStore, add_key, hash_key

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
    assert k1 != k2 and store.authenticate(k1) is store.authenticate(k2)


def test_add_key_refuses_unknown_plan_and_plan_change(keys_file):
    with pytest.raises(KeysFileError, match="plan 'gold'"):
        add_key(keys_file, "acme", "gold")
    add_key(keys_file, "acme", "small")
    with pytest.raises(KeysFileError, match="is on plan 'small'"):
        add_key(keys_file, "acme", "clinic")


@pytest.mark.parametrize(
    "data, message",
    [
        ([1, 2], "mapping"),
        ({"plans": {"p": {"concurrency": "two"}}}, "integer concurrency"),
        ({"plans": {"p": {"concurrency": 0}}}, "at least 1"),
        ({"plans": {"p": {"concurrency": 1}}, "accounts": {"a": {"plan": "q"}}}, "unknown plan"),
        ({"plans": {"p": {"concurrency": 1}}, "accounts": {"a": {"plan": "p"}}, "keys": [{"sha256": "zz", "account": "a"}]}, "sha256"),
        ({"plans": {"p": {"concurrency": 1}}, "accounts": {"a": {"plan": "p"}}, "keys": [{"sha256": "a" * 64, "account": "b"}]}, "unknown account"),
        ({"plans": {"p": {"concurrency": 1, "queue": {"max_waiting": 2}}}}, "queue needs"),
    ],
)
def test_malformed_keys_files_are_refused_with_the_reason(data, message):
    with pytest.raises(KeysFileError, match=message):
        KeyStore.from_dict(data)


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
