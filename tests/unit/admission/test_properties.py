"""Stateful property test: random admits, completions, client exits and deadlines.

Invariants after every step: no account holds more units than its plan grants, the engine
never holds more than its capacity, the queue never exceeds its bound, and the ledger's
and the queue's books agree with the admitted requests alive. At the end every unit comes back.
Replica crashes and lease expiry are exercised against a real Redis in
tests/integration/test_redis_ledger.py and test_replicas.py.
"""

import asyncio

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from prometheus_client import CollectorRegistry

from serving.admission.clock import FakeClock
from serving.admission.controller import AdmissionController, RequestShape
from serving.admission.keys import KeyStore
from serving.admission.ledger import InProcessLedger
from serving.admission.outcomes import AdmissionError, Outcome
from serving.admission.priority import CLASSES, PriorityClass
from serving.admission.queue import Capacity, ClassShares, FairQueue
from serving.metrics import ServingMetrics
from tests.unit.admission.ledgers import units_held

PLANS = {
    "plans": {
        "one": {"concurrency": 1},
        "three": {"concurrency": 3, "queue": {"max_waiting": 2, "timeout_s": 4}},
    },
    "accounts": {"a": {"plan": "one"}, "b": {"plan": "three"}, "c": {"plan": "three"}},
}
CAPACITY = Capacity(max_requests=5, kv_tokens=300)
ENGINE_SLOTS = 4  # batch may hold 2 of them, interactive and batch together 3
SHARES = ClassShares(interactive=0.75, batch=0.5)
MAX_WAITING = 3


class AdmissionMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.ledger = InProcessLedger()
        self.controller = AdmissionController(
            KeyStore.from_dict(PLANS), self.ledger,
            FairQueue(CAPACITY, MAX_WAITING, self.clock, shares=SHARES, engine_slots=ENGINE_SLOTS),
            ServingMetrics(CollectorRegistry()), max_model_len=200,
            model_costs={"medgemma-4b-it": 1}, queue_timeout_s=5, clock=self.clock,
        )  # fmt: skip
        self.pending: list[asyncio.Task] = []  # admits in progress (queued or waiting)
        self.admitted = []  # admitted, being served

    def settle(self):
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.run_until_complete(asyncio.sleep(0))
        still = []
        for task in self.pending:
            if not task.done():
                still.append(task)
            elif not task.cancelled() and task.exception() is None:
                self.admitted.append(task.result())
            elif not task.cancelled():
                assert isinstance(task.exception(), AdmissionError)
        self.pending = still

    @rule(
        account=st.sampled_from("abc"), prompt=st.integers(1, 150), max_tokens=st.integers(1, 100),
        fast_path=st.booleans(), priority=st.sampled_from(list(PriorityClass)),
    )  # fmt: skip
    def request(self, account, prompt, max_tokens, fast_path, priority):
        shape = RequestShape("medgemma-4b-it", prompt, max_tokens, priority=priority)
        acct = self.controller.keys.accounts[account]
        if fast_path:  # as the middleware does: decide without suspending, else wait
            waiting = [cls for cls in PriorityClass if self.controller.queue.depth_of(cls)]
            try:
                request = self.controller.decide(acct, shape)
            except AdmissionError:
                return
            if request is not None:
                # admitted at once: nothing of its class or a more urgent one was waiting
                assert all(cls.rank > priority.rank for cls in waiting), (priority, waiting)
                self.admitted.append(request)
                return
        coro = self.controller.wait(acct, shape)
        self.pending.append(self.loop.create_task(coro))
        self.settle()

    @precondition(lambda self: self.admitted)
    @rule(index=st.integers(0, 100))
    def complete(self, index):
        request = self.admitted.pop(index % len(self.admitted))
        self.loop.run_until_complete(request.end(Outcome.COMPLETED))
        self.settle()

    @precondition(lambda self: self.admitted)
    @rule(index=st.integers(0, 100))
    def release_twice(self, index):  # a disconnect and the stream's end racing
        request = self.admitted.pop(index % len(self.admitted))
        async def both():
            return await asyncio.gather(request.end(Outcome.EVICTED_CLIENT_GONE), request.end(Outcome.COMPLETED))

        assert self.loop.run_until_complete(both()) == [True, False]  # one end; the first stands
        assert request.outcome is Outcome.EVICTED_CLIENT_GONE
        self.settle()

    @precondition(lambda self: self.pending)
    @rule(index=st.integers(0, 100))
    def client_leaves_while_waiting(self, index):
        task = self.pending[index % len(self.pending)]
        task.cancel()
        self.settle()

    @rule(seconds=st.floats(0.1, 6))
    def time_passes(self, seconds):
        self.clock.advance(seconds)
        self.loop.run_until_complete(self.controller.tick())
        self.settle()

    @invariant()
    def budgets_hold(self):
        for name, account in self.controller.keys.accounts.items():
            assert self.ledger._inflight.get(name, 0) <= account.plan.concurrency
        held = sum(t.lease.units for t in self.admitted)
        queue = self.controller.queue
        assert queue.inflight_requests <= CAPACITY.max_requests
        assert all(queue.depth_of(cls) <= MAX_WAITING for cls in PriorityClass)
        # The reservation: each class and the less urgent ones together stay within its limit.
        for cls in PriorityClass:
            group = sum(queue.inflight_of(c) for c in PriorityClass if c.rank >= cls.rank)
            assert group <= queue.class_limits[cls], (cls, group)
            # ... and in KV tokens, beyond the share by at most one request that runs alone in its group
            tokens = [r.kv_tokens for r in self.admitted if r.priority.rank >= cls.rank]
            assert sum(tokens) <= queue.class_token_limits[cls] or len(tokens) == 1, (cls, tokens)
        # No class waits that could run now (the most urgent waiting class's head does not
        # fit), and nothing less urgent runs past a more urgent request that could.
        waiting = [cls for cls in CLASSES if queue.depth_of(cls)]
        if waiting:
            queues = queue._waiting[waiting[0]]
            head = min((q[0] for q in queues.values()), key=lambda w: (queue.service(w.account), w.seq))
            assert not queue._fits(head.tokens, waiting[0]), "a waiting request could have run"
        assert queue.class_limits == {PriorityClass.STAT: 5, PriorityClass.INTERACTIVE: 3, PriorityClass.BATCH: 2}
        for cls in PriorityClass:  # the queue's books per class agree with the requests alive
            assert sum(r.priority is cls for r in self.admitted) == queue.inflight_of(cls), cls
            assert sum(r.kv_tokens for r in self.admitted if r.priority is cls) == queue.tokens_of(cls), cls
        assert all(r.slot.priority is r.priority for r in self.admitted)
        # Units are held by admitted admitted and by requests waiting for an engine slot.
        assert held <= units_held(self.ledger)
        assert queue.inflight_requests == len(self.admitted)
        assert queue.inflight_tokens == sum(r.kv_tokens for r in self.admitted)
        assert queue.inflight_tokens <= CAPACITY.kv_tokens or len(self.admitted) == 1

    def teardown(self):
        for task in self.pending:
            task.cancel()
        self.settle()
        for request in self.admitted:
            self.loop.run_until_complete(request.end(Outcome.COMPLETED))
        self.admitted = []
        self.settle()
        for request in self.admitted:  # admitted while others were released
            self.loop.run_until_complete(request.end(Outcome.COMPLETED))
        assert units_held(self.ledger) == 0
        assert self.controller.queue.inflight_requests == 0
        assert self.controller.queue.depth == 0
        self.loop.close()


AdmissionMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestAdmission = AdmissionMachine.TestCase
