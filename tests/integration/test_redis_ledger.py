"""The Redis ledger against a real redis-server: shared budgets, TTL, fallback, round trips."""

import asyncio

import pytest
import redis as redis_sync

from serving.admission.clock import FakeClock
from serving.admission.ledger import LedgerUnavailable
from serving.admission.redis_ledger import RedisLedger, connect
from tests.redis_server import RedisServer, leased_units


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def ledger(server, **kwargs) -> RedisLedger:
    return RedisLedger(connect(server.url), **kwargs)


def test_two_replicas_share_one_budget(redis_server):
    async def scenario():
        a, b = ledger(redis_server), ledger(redis_server)
        g1 = await a.acquire("acme", 1, 3)
        g2 = await b.acquire("acme", 1, 3)
        g3 = await a.acquire("acme", 1, 3)
        refused = await b.acquire("acme", 1, 3)
        assert [g.inflight for g in (g1, g2, g3)] == [1, 2, 3]
        assert refused.lease is None and refused.inflight == 3
        assert await a.inflight("acme") == 3
        await b.release(g2.lease)
        await b.release(g2.lease)  # idempotent
        assert (await a.acquire("acme", 1, 3)).lease is not None
        assert (await a.acquire("other", 2, 2)).lease is not None  # accounts are separate
    asyncio.run(scenario())


def test_a_replica_that_dies_loses_its_leases_within_the_ttl(redis_server):
    async def scenario():
        dead, alive = ledger(redis_server, lease_ttl_s=0.6), ledger(redis_server, lease_ttl_s=0.6)
        await dead.acquire("acme", 2, 2)  # never released, never renewed
        kept = await alive.acquire("other", 1, 1)
        assert (await alive.acquire("acme", 1, 2)).lease is None
        for _ in range(5):  # alive's heartbeat keeps its own lease past the TTL
            await asyncio.sleep(0.2)
            await alive.heartbeat()
        assert (await alive.acquire("acme", 2, 2)).lease is not None
        assert (await alive.acquire("other", 1, 1)).lease is None
        await alive.release(kept.lease)
    asyncio.run(scenario())


def test_exactly_one_round_trip_to_acquire_and_one_to_release(redis_server):
    async def scenario():
        led = ledger(redis_server)
        await led.heartbeat()  # registered: each acquire also checks Redis still has it
        warm = await led.acquire("acme", 1, 5)  # loads the scripts
        await led.release(warm.lease)
        probe = redis_sync.Redis.from_url(redis_server.url)
        probe.config_resetstat()
        grant = await led.acquire("acme", 1, 5)
        await led.release(grant.lease)
        stats = probe.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): s["calls"] for name, s in stats.items()}
        calls.pop("info", None)
        calls.pop("config|resetstat", None)
        # Two round trips (EVALSHA); the rest ran inside the two scripts, once each.
        assert calls == {
            "evalsha": 2, "time": 1, "zremrangebyscore": 1, "zrange": 1, "zadd": 1,
            "pexpire": 1, "zrem": 1, "zscore": 1,
        }, calls  # fmt: skip
    asyncio.run(scenario())


def test_redis_down_then_back_share_policy(redis_server):
    async def scenario():
        events, clock = [], FakeClock()
        a = ledger(redis_server, lease_ttl_s=3, on_fallback=events.append, clock=clock)
        b = ledger(redis_server, lease_ttl_s=3, clock=clock)
        for replica in (a, b, a, b):
            await replica.heartbeat()
        assert a.replicas == b.replicas == 2 and {a.rank, b.rank} == {0, 1}
        assert a.share_of("acme", 4) + b.share_of("acme", 4) == 4
        held = await a.acquire("acme", 1, 4)  # in Redis, from before the outage
        redis_server.stop()
        # A's share of 4 is 2, and it still holds 1 from before: one more, not two.
        g1 = await a.acquire("acme", 1, 4)
        assert a.fallback and events == [True]
        assert g1.lease is not None and g1.inflight == 2
        g2 = await a.acquire("acme", 1, 4)
        assert g2.lease is None and g2.inflight == 2
        assert await a.inflight("acme") == 2
        await a.release(held.lease)  # Redis down: it expires there by TTL; locally it is free
        g3 = await a.acquire("acme", 1, 4)
        assert g3.lease is not None
        await a.release(g1.lease)
        redis_server.start()  # restarted empty
        await a.heartbeat()
        # The lease granted locally during the outage now counts in Redis.
        assert await b.inflight("acme") == 1
        assert a.fallback and events == [True]  # rejoining: a lease TTL for the others to come back
        clock.advance(3)
        await a.heartbeat()
        assert not a.fallback and events == [True, False]
        await a.release(g3.lease)
        assert await b.inflight("acme") == 0
    asyncio.run(scenario())


def test_rejoining_after_a_restart_grants_only_within_the_share_until_every_replica_is_back(redis_server):
    """Redis restarts empty: the first replica back must not take what another replica's
    missing leases hold - for one TTL it grants through Redis and within its share only."""
    async def scenario():
        clock = FakeClock()
        a, b = ledger(redis_server, lease_ttl_s=3, clock=clock), ledger(redis_server, lease_ttl_s=3, clock=clock)
        for replica in (a, b, a, b):
            await replica.heartbeat()
        share_a = a.share_of("acme", 2)
        assert share_a == b.share_of("acme", 2) == 1
        on_b = await b.acquire("acme", 1, 2)  # B holds its share when Redis goes
        redis_server.stop()
        redis_server.start()  # empty: B's lease is gone until B's heartbeat
        await a.heartbeat()  # no call failed: A sees the restart by its registration missing
        assert a.fallback and a.replicas == 2 and await a.inflight("acme") == 0  # the outage's shares
        # Concurrent acquires while rejoining: Redis says 0 of 2 used, the share says one.
        grants = await asyncio.gather(*[a.acquire("acme", 1, 2) for _ in range(3)])
        assert sorted(g.lease is not None for g in grants) == [False, False, True], grants
        assert leased_units(redis_server.url, "acme") == 1  # through Redis: the others see it at once
        assert (await a.acquire("acme", 1, 2)).lease is None
        clock.advance(2)
        await a.heartbeat()  # within the TTL: still rejoining
        assert a.fallback and (await a.acquire("acme", 1, 2)).lease is None
        await b.heartbeat()  # B is back: its lease counts in Redis again; B rejoins
        clock.advance(1)
        await a.heartbeat()  # A's TTL is over
        assert not a.fallback and b.fallback and a.replicas == 2
        assert (await a.acquire("acme", 1, 2)).lease is None  # exact: B's 1 + A's 1
        clock.advance(2)
        for replica in (a, b):
            await replica.heartbeat()
        assert not a.fallback and not b.fallback and a.replicas == b.replicas == 2
        assert (await a.acquire("acme", 1, 2)).lease is None  # exact: B's 1 + A's 1
        await b.release(on_b.lease)
        assert (await a.acquire("acme", 1, 2)).lease is not None
    asyncio.run(scenario())


def test_an_acquire_that_finds_redis_lost_the_replica_puts_its_leases_back_and_rejoins_first(redis_server):
    """No heartbeat has run since the restart: the acquire itself must notice, or it would
    grant against an empty Redis on top of this replica's own lost lease."""
    async def scenario():
        clock = FakeClock()
        a, b = ledger(redis_server, lease_ttl_s=3, clock=clock), ledger(redis_server, lease_ttl_s=3, clock=clock)
        for replica in (a, b, a, b):
            await replica.heartbeat()
        held = await b.acquire("acme", 1, 2)  # B's share
        old_member = b._member
        redis_server.stop()
        redis_server.start()  # empty, and no call failed
        refused = await asyncio.gather(*[b.acquire("acme", 1, 2) for _ in range(3)])
        assert all(g.lease is None for g in refused) and b.fallback, refused  # rejoining: B's share is in use
        assert leased_units(redis_server.url, "acme") == 1  # B's lease is back for A to see
        # B registered once (one heartbeat at a time), under a new token: an acquire sent
        # with the old one, that Redis runs only now, still counts as lost.
        probe = redis_sync.Redis.from_url(redis_server.url)
        assert probe.zrange("medgemma:replicas", 0, -1) == [b._member.encode()]
        late = await b._acquire_script(keys=[b._account_key("acme"), "medgemma:replicas"],
                                       args=[1, 2, 3000, "late", old_member])  # fmt: skip
        assert b._member != old_member and late[0] == -1 and leased_units(redis_server.url, "acme") == 1
        assert (await a.acquire("acme", 1, 2)).lease is not None  # A's share, A rejoins too
        assert leased_units(redis_server.url, "acme") == 2
        redis_server.stop()  # down again while rejoining: the outage again, its shares locally
        await b.release(held.lease)  # (Redis fails)
        again = await b.acquire("acme", 1, 2)
        assert again.lease is not None and b.fallback and b._rejoin_until is None
        assert (await b.acquire("acme", 1, 2)).lease is None
    asyncio.run(scenario())


def test_a_replica_that_never_reached_redis_refuses_whatever_the_policy(redis_server):
    """Started during an outage it cannot know how many replicas share the budget: a share
    of 1 replica would be the whole budget on each of them."""
    async def scenario():
        clock = FakeClock()
        redis_server.stop()
        new = ledger(redis_server, lease_ttl_s=3, clock=clock)
        await new.heartbeat()
        assert new.fallback
        with pytest.raises(LedgerUnavailable):
            await new.acquire("acme", 1, 4)
        redis_server.start()
        await new.heartbeat()  # registered: it rejoins, and its count is the live one
        assert new.fallback and new.replicas == 1
        assert (await new.acquire("acme", 1, 4)).lease is not None
    asyncio.run(scenario())


def test_outage_shares_split_every_budget_exactly_across_replicas():
    for replicas in (1, 2, 3, 5):
        for budget in (1, 2, 3, 7, 64):
            for account in ("acme", "st-marys", "a", "radiology-42"):
                parts = []
                for rank in range(replicas):
                    led = RedisLedger.__new__(RedisLedger)
                    led.replicas, led.rank = replicas, rank
                    parts.append(led.share_of(account, budget))
                assert sum(parts) == budget and max(parts) - min(parts) <= 1, (replicas, budget, parts)


def test_redis_down_refuse_policy(redis_server):
    async def scenario():
        led = ledger(redis_server, fallback_policy="refuse")
        assert (await led.acquire("acme", 1, 1)).lease is not None
        redis_server.stop()
        with pytest.raises(LedgerUnavailable):
            await led.acquire("acme", 1, 1)
        assert led.fallback
    asyncio.run(scenario())


def test_held_leases_are_counted_again_after_a_redis_restart(redis_server):
    async def scenario():
        a, b = ledger(redis_server), ledger(redis_server)
        held = await a.acquire("acme", 2, 3)
        released = await a.acquire("acme", 1, 3)
        await a.release(released.lease)
        redis_server.stop()
        redis_server.start()  # empty: every lease is gone
        assert await b.inflight("acme") == 0
        await a.heartbeat()
        assert await b.inflight("acme") == 2  # the live lease is back; the released one is not
        assert (await b.acquire("acme", 2, 3)).lease is None
        await a.release(held.lease)
        await a.heartbeat()
        assert await b.inflight("acme") == 0
    asyncio.run(scenario())


def test_the_password_setting_authenticates_against_a_redis_that_requires_one(tmp_path, monkeypatch):
    """The production wiring: a URL without a password, MEDGEMMA_REDIS_PASSWORD from a Secret
    -> ServeSettings -> the server context -> the ledger's client -> a Redis with requirepass."""
    from serving import config
    from serving.admission.keys import KeyStore
    from serving.assembly import context_from_settings

    server = RedisServer(tmp_path / "redis", password="s3cret-from-a-secret").start()
    try:
        monkeypatch.setenv("MEDGEMMA_REDIS_PASSWORD", "s3cret-from-a-secret")
        settings = config.load_settings({"redis_url": server.url, "profile": "cpu-dev"})
        resolved = config.resolve(settings, None)
        admission = context_from_settings(settings, resolved, KeyStore.open(2)).admission
        assert admission.redis_url == server.url and "s3cret" not in repr(admission)

        async def scenario():
            authed = RedisLedger(connect(admission.redis_url, password=admission.redis_password))
            grant = await authed.acquire("acme", 1, 2)
            assert grant.lease is not None and not authed.fallback
            await authed.release(grant.lease)
            anonymous = RedisLedger(connect(admission.redis_url), fallback_policy="refuse")
            with pytest.raises(LedgerUnavailable):  # without it Redis refuses (NOAUTH)
                await anonymous.acquire("acme", 1, 2)

        asyncio.run(scenario())
    finally:
        server.stop()
