"""What the unit tests read from ledgers: an in-process ledger's total (the product never
needs one) and the contract every ledger keeps."""


def units_held(ledger) -> int:
    """Units of every live lease of an ``InProcessLedger``, all accounts together."""
    return sum(lease.units for lease in ledger._leases.values())


def check_exact_with_idempotent_release(ledger) -> None:
    """What every ledger does with one account of 3 units: 2 granted, 2 more refused with
    the 2 held reported, the lease released once (a second release is a no-op)."""
    first = ledger.acquire_now("acme", 2, 3)
    assert first.lease is not None and first.inflight == 2
    refused = ledger.acquire_now("acme", 2, 3)
    assert refused.lease is None and refused.inflight == 2
    assert ledger.release_now(first.lease) is True
    assert ledger.release_now(first.lease) is False
