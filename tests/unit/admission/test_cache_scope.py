"""Per-account prefix-cache salts (serving/admission/cache_scope.py)."""

import pytest

from serving.admission.cache_scope import account_salt


def test_each_account_gets_its_own_salt_whatever_the_client_sends():
    a, b = account_salt("st-marys"), account_salt("general")
    assert a != b and len(a) == 64 and all(c in "0123456789abcdef" for c in a)
    assert account_salt("st-marys") == a  # stable: the account's own requests share its cache
    assert account_salt("st-marys", None) == a
    # no client salt can land on another account's: the digest covers the account
    assert account_salt("general", a) not in (a, b) and account_salt("general", "st-marys") != a


def test_a_clients_salt_splits_its_accounts_cache_further():
    one, two = account_salt("st-marys", "ward-3"), account_salt("st-marys", "ward-4")
    assert len({one, two, account_salt("st-marys")}) == 3
    assert account_salt("st-marys", "ward-3") == one
    # the salt's parts cannot be rearranged into another account's
    assert account_salt("st-mary", "s") != account_salt("st-marys", "") != account_salt("st-marys")


@pytest.mark.parametrize("asked", ["", 5, ["x"], "x" * 129, "a/b", "a@b", "a\\b", "a\x00b"])
def test_a_salt_vllm_refuses_is_left_for_vllm_to_refuse(asked):
    assert account_salt("st-marys", asked) is None


def test_what_it_makes_vllm_accepts():
    from vllm.entrypoints.generate.base.protocol import validate_cache_salt

    for asked in (None, "ward-3", "x" * 128):
        validate_cache_salt(account_salt("st-marys", asked))
