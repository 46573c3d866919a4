"""One API process's use of a host ledger, for tests/unit/admission/test_host_ledger.py.

``python -m tests.unit.admission.host_ledger_worker PATH SLOT SEED OPS MODE START_AT`` takes and
gives back leases at random and prints one JSON line per hold: the account, the units, and
two CLOCK_MONOTONIC times (system-wide, so comparable across processes and pid
namespaces) taken *after* the grant returned and *before* the release was called: each
printed interval lies inside the time the ledger counted the units. ``MODE`` ``host`` uses
the shared ledger; ``own`` gives the process a ledger of its own (the defect the test must
be able to see). Work starts at ``START_AT`` (CLOCK_MONOTONIC), so that all workers overlap.
"""

import json
import random
import sys
import time
from pathlib import Path

from serving.admission.host_ledger import HostLedger
from serving.admission.ledger import InProcessLedger

BUDGETS = {"radiology": 2, "dermatology": 3}


def main() -> None:
    path, slot, seed, ops, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    ledger = HostLedger(Path(path), slot) if mode == "host" else InProcessLedger()
    time.sleep(max(0.0, float(sys.argv[6]) - time.monotonic()))
    rng = random.Random(seed)
    held = []
    out = []
    for _ in range(ops):
        if held and (rng.random() < 0.5 or len(held) > 3):
            lease, granted_at = held.pop(rng.randrange(len(held)))
            out.append({"account": lease.account, "units": lease.units, "slot": slot, "from": granted_at,
                        "to": time.monotonic()})  # fmt: skip
            ledger.release_now(lease)
        else:
            account = rng.choice(sorted(BUDGETS))
            grant = ledger.acquire_now(account, rng.choice((1, 1, 2)), BUDGETS[account])
            if grant.lease is not None:
                held.append((grant.lease, time.monotonic()))
        time.sleep(rng.random() * 0.002)
    for lease, granted_at in held:
        out.append({"account": lease.account, "units": lease.units, "slot": slot, "from": granted_at,
                        "to": time.monotonic()})  # fmt: skip
        ledger.release_now(lease)
    print("\n".join(json.dumps(hold) for hold in out))


if __name__ == "__main__":
    main()
