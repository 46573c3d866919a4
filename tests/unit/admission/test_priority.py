"""Priority classes: what a request asks for, what its key allows, what vLLM is told."""

import pytest

from serving.admission.keys import KeyStore, hash_key
from serving.admission.keysfile import KeysFileError
from serving.admission.outcomes import AdmissionError, Outcome
from serving.admission.priority import PriorityClass, from_body_priority, requested_class

STAT, INTERACTIVE, BATCH = PriorityClass.STAT, PriorityClass.INTERACTIVE, PriorityClass.BATCH


def scope(header: str | None = None) -> dict:
    return {"headers": [] if header is None else [(b"x-priority", header.encode())]}


def test_classes_are_strictly_ordered_and_map_to_vllm_priorities_in_the_same_order():
    assert STAT.above(INTERACTIVE) and INTERACTIVE.above(BATCH) and not BATCH.above(STAT)
    assert STAT.vllm_priority < INTERACTIVE.vllm_priority == 0 < BATCH.vllm_priority  # 0: vLLM's default
    for cls in PriorityClass:  # what we tell vLLM reads back as the same class
        assert from_body_priority(cls.vllm_priority) is cls


@pytest.mark.parametrize("header,body,expected", [
    (None, {}, BATCH),  # the key's default
    ("interactive", {}, INTERACTIVE),
    (" STAT ", {}, STAT),
    (None, {"priority": 5}, BATCH),
    (None, {"priority": -3}, STAT),
    (None, {"priority": 0}, INTERACTIVE),  # read from the body, not the default
    ("batch", {"priority": -1}, BATCH),  # the header wins
])  # fmt: skip
def test_a_request_gets_what_it_asks_for_within_its_key(header, body, expected):
    assert requested_class(scope(header), body, default=BATCH, allowed=STAT) is expected


@pytest.mark.parametrize("header,body", [("stat", {}), (None, {"priority": -1}), ("interactive", {})])
def test_a_class_above_the_key_is_a_403_never_a_silent_downgrade(header, body):
    with pytest.raises(AdmissionError) as info:
        requested_class(scope(header), body, default=BATCH, allowed=BATCH)
    assert info.value.outcome is Outcome.REJECTED_PRIORITY_NOT_ALLOWED and "'batch'" in info.value.message


@pytest.mark.parametrize("header,body", [("urgent", {}), (None, {"priority": "high"}), (None, {"priority": True}),
                                         (None, {"priority": 1.5})])  # fmt: skip
def test_an_unreadable_class_is_a_400(header, body):
    with pytest.raises(AdmissionError) as info:
        requested_class(scope(header), body, default=INTERACTIVE, allowed=STAT)
    assert info.value.outcome is Outcome.REJECTED_INVALID_PRIORITY


KEY_A, KEY_B = "mgk_a", "mgk_b"


def keys_file(**plan_priority):
    return {
        "plans": {"clinic": {"concurrency": 4, **({"priority": plan_priority} if plan_priority else {})}},
        "accounts": {"st-marys": {"plan": "clinic"}},
        "keys": [{"sha256": hash_key(KEY_A), "account": "st-marys"},
                 {"sha256": hash_key(KEY_B), "account": "st-marys", "priority": {"max": "batch", "default": "batch"}}],
    }  # fmt: skip


def test_a_plan_names_its_classes_and_a_key_may_replace_them():
    store = KeyStore.from_dict(keys_file(max="stat", default="interactive"))
    a, b = store.authenticate(KEY_A), store.authenticate(KEY_B)
    assert (a.max_class, a.default_class) == (STAT, INTERACTIVE)
    assert (b.max_class, b.default_class) == (BATCH, BATCH)
    assert a.name == b.name == "st-marys" and a.plan is b.plan  # one account, one budget
    plain = KeyStore.from_dict(keys_file()).authenticate(KEY_A)
    assert (plain.max_class, plain.default_class) == (INTERACTIVE, INTERACTIVE)  # stat is opt-in
    assert KeyStore.open(4).authenticate(None).max_class is STAT  # development: every class


@pytest.mark.parametrize("priority", [{"max": "batch", "default": "stat"}, {"max": "urgent"}, {"default": 1},
                                      {"max": "stat", "extra": 1}])  # fmt: skip
def test_a_malformed_priority_section_is_refused(priority):
    with pytest.raises(KeysFileError) as info:
        KeyStore.from_dict(keys_file(**priority))
    assert "plans.clinic.priority" in str(info.value)
