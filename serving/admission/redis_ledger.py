"""Budgets shared by every replica through Redis: one sorted set of leases per account.

Guarantees:
- Acquire and release are each one atomic Lua script, one round trip: the script drops
  expired leases, sums the account's live units and grants only within the budget. Time
  is Redis's own clock (``TIME``), so replicas' clocks never disagree about expiry.
- Leases live ``lease_ttl_s`` (default 15 s) unless renewed; a heartbeat renews this
  replica's live leases every ``lease_ttl_s / 3``. A replica that dies without releasing
  loses its leases within the TTL: nothing leaks.
- If Redis becomes unreachable (any command fails or times out), the documented policy
  applies until a heartbeat reaches it again, and the replica then rejoins for one TTL
  (below); ``medgemma_ledger_fallback`` is 1 throughout.
  ``refuse``: requests get 503 ``ledger_unavailable``.
  ``share`` (default): the budget is split exactly among the replicas the last heartbeat
  saw (``share_of``: floor(budget / R) each, the remainder to R' of them chosen by the
  account's hash, so the shares sum to the budget). A replica admits a new request only
  while its own units for the account - leases it held before the outage plus those it
  granted during it - stay within its share. Nothing running is ended, so an account's
  total during an outage is at most the sum over replicas of max(share, units held at the
  outage start): exactly the budget when every replica was within its share then. A
  replica that has never reached Redis does not know how many replicas share the budget:
  it refuses (503) with either policy until its first heartbeat gets through.
- Rejoining: the first heartbeat that reaches Redis again puts every live lease of this
  replica into Redis (those granted during the outage, and any Redis lost), without a
  budget check: they are running. Redis's total is not yet the truth - another replica's
  leases are missing until its own heartbeat puts them back, which a live replica does
  within one TTL. So for one TTL this replica grants only through Redis (everyone sees the
  grant) and only within its outage share (it cannot see what is missing), with either
  policy; the fallback gauge stays 1. After that the total in Redis is complete and
  budgets are exact again.
- A Redis that lost this replica's registration (it restarted before any call failed, or
  a stall outlasted the TTL) is noticed by the next acquire as well as the next heartbeat:
  the acquire script grants nothing then, and the replica rejoins and puts its leases back
  before it grants. It registers again under a new token, so an acquire sent earlier and
  run by Redis only afterwards is refused as lost too; one heartbeat runs at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
import zlib
from dataclasses import dataclass

from serving.admission.clock import Clock, MonotonicClock
from serving.admission.ledger import Grant, InProcessLedger, Lease, LedgerUnavailable, new_lease_id

logger = logging.getLogger(__name__)

# Drops expired leases of KEYS[1] and sums the live units: `now` and `used`.
LIVE_UNITS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local used = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  used = used + tonumber(string.match(member, '|(%d+)$'))
end
"""

# KEYS[2], ARGV[5] (once this replica has registered): the replicas set and its member (id
# and registration token). Redis that lost it (a restart, a stall past the TTL), or a token
# the replica has since replaced, grants nothing: {-1, used}.
ACQUIRE = LIVE_UNITS + """
if KEYS[2] then
  local registered = redis.call('ZSCORE', KEYS[2], ARGV[5])
  if not registered or tonumber(registered) <= now then
    return {-1, used}
  end
end
local units = tonumber(ARGV[1])
if used + units > tonumber(ARGV[2]) then
  return {0, used}
end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[4] .. '|' .. ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return {1, used + units}
"""

INFLIGHT = LIVE_UNITS + """
return used
"""

RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""

# KEYS: the replicas set, then one account set per lease; ARGV: ttl_ms, this replica's
# member, whether to register it if Redis lacks it ('1'), then the leases' members.
# Renews the registration and the leases Redis still has (a lease released meanwhile must
# not come back). Redis lacking the member and no '1': nothing is written, {0}. Otherwise
# {1, the live replicas' members, then the indexes of held leases Redis has lost}.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) and ARGV[3] ~= '1' then
  return {0}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
local result = {1, redis.call('ZRANGE', KEYS[1], 0, -1)}
for i = 2, #KEYS do
  if redis.call('ZSCORE', KEYS[i], ARGV[i + 2]) then
    redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[i + 2])
    redis.call('PEXPIRE', KEYS[i], ttl * 2)
  else
    table.insert(result, i - 1)
  end
end
return result
"""

# KEYS: account sets; ARGV: ttl_ms, members. Puts live leases (back) into Redis.
RESTORE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
return #KEYS
"""

FALLBACK_POLICIES = ("share", "refuse")
_LOST = object()  # the acquire script's answer when Redis no longer has this replica


def _less(counts: dict[str, int], account: str, units: int) -> None:
    """``units`` fewer for ``account`` in ``counts``; an account at 0 leaves it."""
    left = counts[account] - units
    if left:
        counts[account] = left
    else:
        del counts[account]


@dataclass(frozen=True)
class _RedisLease:
    key: str
    member: str


class RedisLedger:
    synchronous = False  # every decision is a round trip

    def __init__(
        self,
        client,
        *,
        lease_ttl_s: float = 15.0,
        fallback_policy: str = "share",
        prefix: str = "medgemma",
        on_fallback=None,
        clock: Clock | None = None,
    ):
        if fallback_policy not in FALLBACK_POLICIES:
            raise ValueError(f"fallback_policy must be one of {FALLBACK_POLICIES}")
        self.client = client
        self.ttl_ms = int(lease_ttl_s * 1000)
        self.policy = fallback_policy
        self.prefix = prefix
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.on_fallback = on_fallback or (lambda active: None)
        self.clock = clock or MonotonicClock()
        self.fallback = False  # an outage, or rejoining after one
        self._rejoin_until: float | None = None  # Redis answers again; others' leases may be missing
        self._registered = False  # a heartbeat has reached Redis: its loss of us means a restart
        self._member = self._new_member()  # in the replicas set; a new token on each rejoin
        self._heartbeat_lock = asyncio.Lock()  # one heartbeat at a time (acquires call it too)
        self.replicas = 1
        self.rank = 0  # this replica's place among the live replicas' sorted ids
        self._local = InProcessLedger()
        self._held: dict[str, _RedisLease] = {}
        self._held_units: dict[str, int] = {}  # account -> units of this replica's Redis leases
        self._pending: dict[str, int] = {}  # account -> units of acquires awaiting Redis
        self._acquire_script = client.register_script(ACQUIRE)
        self._release_script = client.register_script(RELEASE)
        self._inflight_script = client.register_script(INFLIGHT)
        self._heartbeat_script = client.register_script(HEARTBEAT)
        self._restore_script = client.register_script(RESTORE)

    def _account_key(self, account: str) -> str:
        return f"{self.prefix}:leases:{{{account}}}"

    # --- the ledger interface ----------------------------------------------------------
    async def acquire(self, account: str, units: int, budget: int) -> Grant:
        for _ in range(2):  # a second time only once Redis lost this replica (it rejoined)
            rejoining = self._rejoin_until is not None
            if rejoining:  # through Redis, and within this replica's share of the budget
                own = self._own_units(account)
                if own + units > self.share_of(account, budget):
                    return Grant(None, own)
            elif self.fallback:
                break
            grant = await self._acquire_in_redis(account, units, budget)
            if grant is _LOST:  # the heartbeat rejoins, registers anew, puts the leases back
                await self.heartbeat()
                continue
            if grant is not None:
                return grant
            break  # Redis failed: the outage policy
        else:
            return Grant(None, self._own_units(account))  # lost twice in a row: not now
        if self.policy == "refuse" or not self._registered:
            # (Never registered: it cannot know how many replicas share the budget.)
            raise LedgerUnavailable("the Redis budget ledger is unreachable")
        # Our share, less what we still hold in Redis from before the outage (or are being
        # granted there by an acquire that was under way when it went).
        held = self._held_units.get(account, 0) + self._pending.get(account, 0)
        grant = self._local.acquire_now(account, units, self.share_of(account, budget) - held)
        return Grant(grant.lease, grant.inflight + held)

    async def _acquire_in_redis(self, account: str, units: int, budget: int):
        """Redis's decision: a Grant, ``_LOST`` (Redis no longer has this replica), or None
        (Redis failed: the outage has begun)."""
        lease_id = new_lease_id()
        key = self._account_key(account)
        keys, args = [key], [units, budget, self.ttl_ms, lease_id]
        if self._registered:
            keys, args = keys + [f"{self.prefix}:replicas"], args + [self._member]
        self._pending[account] = self._pending.get(account, 0) + units  # (concurrent acquires)
        try:
            granted, used = await self._acquire_script(keys=keys, args=args)
        except Exception as exc:  # noqa: BLE001 - any Redis failure means the same
            self._enter_fallback(exc)
            return None
        finally:
            _less(self._pending, account, units)
        if granted == -1:
            return _LOST
        if not granted:
            return Grant(None, int(used))
        lease = Lease(lease_id, account, units)
        self._hold(lease, _RedisLease(key, f"{lease_id}|{units}"))
        return Grant(lease, int(used))

    def _own_units(self, account: str) -> int:
        """This replica's units of ``account``: in Redis, locally, and being granted."""
        return self._held_units.get(account, 0) + self._local.units_of(account) + self._pending.get(account, 0)

    def share_of(self, account: str, budget: int) -> int:
        """This replica's part of ``budget`` while Redis is down or it rejoins: the parts of
        all live replicas sum to exactly ``budget``."""
        replicas = max(1, self.replicas)
        base, extra = divmod(budget, replicas)
        offset = zlib.crc32(account.encode()) % replicas  # spread the remainders over replicas
        return base + (1 if (self.rank - offset) % replicas < extra else 0)

    def _hold(self, lease: Lease, held: _RedisLease) -> None:
        self._held[lease.lease_id] = held
        self._held_units[lease.account] = self._held_units.get(lease.account, 0) + lease.units

    def _unhold(self, lease: Lease) -> _RedisLease | None:
        held = self._held.pop(lease.lease_id, None)
        if held is not None:
            _less(self._held_units, lease.account, lease.units)
        return held

    async def release(self, lease: Lease) -> None:
        if self._local.release_now(lease):
            return
        held = self._unhold(lease)
        if held is None:
            return
        try:
            await self._release_script(keys=[held.key], args=[held.member])
        except Exception as exc:  # noqa: BLE001 - not renewed any more: expires within the TTL
            self._enter_fallback(exc)

    async def inflight(self, account: str) -> int:
        """The account's units in use: all replicas' (Redis), or this replica's in an outage
        and while it rejoins."""
        if not self.fallback:
            try:
                return int(await self._inflight_script(keys=[self._account_key(account)]))
            except Exception:  # noqa: BLE001 - only feeds a header
                pass
        return self._local.units_of(account) + self._held_units.get(account, 0)

    # --- liveness --------------------------------------------------------------------------
    async def heartbeat(self) -> None:
        """Renew this replica's registration and live leases; after an outage, or when Redis
        has lost the registration, rejoin and put this replica's leases back (module
        docstring). One at a time: acquires that find the registration lost call it too."""
        async with self._heartbeat_lock:
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        was_registered = self._registered
        for register in (not was_registered, True):
            ids = list(self._held)
            keys = [f"{self.prefix}:replicas"] + [self._held[i].key for i in ids]
            args = [self.ttl_ms, self._member, "1" if register else "0"] + [self._held[i].member for i in ids]
            try:
                result = await self._heartbeat_script(keys=keys, args=args)
                if result[0]:
                    replicas = sorted(r.decode() if isinstance(r, bytes) else str(r) for r in result[1])
                    lost = [ids[int(i) - 1] for i in result[2:]]
                    break
            except Exception as exc:  # noqa: BLE001
                self._enter_fallback(exc)
                return
            # Redis lost this replica (a restart, or a stall past the TTL): rejoin before
            # anything awaits, then register under a new token, so an acquire sent before
            # this moment (with the old one) cannot pass as registered.
            self._start_rejoin()
            self._member = self._new_member()
        else:
            return
        self._registered = True
        if self.fallback and self._rejoin_until is None:
            self._start_rejoin()  # Redis answers again after an outage
        elif self._rejoin_until is not None and self.clock.now() >= self._rejoin_until:
            self.fallback, self._rejoin_until = False, None
            self.on_fallback(False)
            logger.warning("budget ledger: every live replica has had a lease TTL to rejoin; budgets are shared again")
        if self._rejoin_until is None or not was_registered:
            # (Rejoining, the set may miss replicas not back yet: the outage's count stays,
            # unless this replica never had one.)
            self.replicas = max(1, len(replicas))
            self.rank = replicas.index(self._member) if self._member in replicas else 0
        if self.fallback:
            # Leases granted locally during the outage move into Redis, so the shared budget
            # counts them until they end.
            for lease in self._local.take_all():
                self._hold(lease, _RedisLease(self._account_key(lease.account), f"{lease.lease_id}|{lease.units}"))
                lost.append(lease.lease_id)
        # Still held here but gone from Redis (it restarted, or heartbeats stalled past the
        # TTL): count them again. Ones released meanwhile stay released.
        restore = [self._held[i] for i in lost if i in self._held]
        if restore:
            try:
                await self._restore_script(
                    keys=[h.key for h in restore], args=[self.ttl_ms] + [h.member for h in restore]
                )
            except Exception as exc:  # noqa: BLE001
                self._enter_fallback(exc)

    def _new_member(self) -> str:
        return f"{self.replica_id}|{uuid.uuid4().hex[:12]}"

    def _start_rejoin(self) -> None:
        """Redis answers (again, or after losing this replica's registration) but may miss
        other replicas' leases until their heartbeats: for one TTL, Redis grants within this
        replica's share, the outage's shares (they sum to the budget)."""
        self._rejoin_until = self.clock.now() + self.ttl_ms / 1000
        if not self.fallback:
            self.fallback = True
            self.on_fallback(True)
        logger.warning(
            "budget ledger: rejoining Redis (it was unreachable, or it lost this replica's "
            "registration); this replica's leases are back in it. Shares stay for one lease "
            "TTL (%.0fs), while the other replicas put theirs back", self.ttl_ms / 1000,
        )  # fmt: skip

    async def run_heartbeat(self) -> None:
        interval = self.ttl_ms / 3000
        while True:
            await self.heartbeat()
            await asyncio.sleep(interval)

    def _enter_fallback(self, exc: BaseException) -> None:
        self._rejoin_until = None  # (rejoining, it failed again: the outage goes on)
        if self.fallback:
            return
        self.fallback = True
        self.on_fallback(True)
        if self.policy == "share":
            logger.warning(
                "budget ledger: Redis unreachable (%s); each of %d replica(s) now enforces its "
                "share of every budget (they sum to the budget) until it is back",
                type(exc).__name__, self.replicas,
            )  # fmt: skip
        else:
            logger.warning(
                "budget ledger: Redis unreachable (%s); refusing model requests with 503 "
                "until it is back", type(exc).__name__,
            )  # fmt: skip


def connect(url: str, timeout_s: float = 1.0, *, password: str | None = None, tls_ca_file=None):
    """A Redis client that fails fast: a dead Redis must not stall the request path.

    ``password`` (AUTH) is used unless the URL carries one; ``tls_ca_file`` verifies a
    ``rediss://`` server's certificate."""
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    # One immediate retry on a broken connection (a pooled socket after a Redis restart);
    # none on a timeout, which would double the stall.
    options = {}
    if password is not None:
        options["password"] = password
    if tls_ca_file is not None:
        options["ssl_ca_certs"] = str(tls_ca_file)
    return redis.Redis.from_url(
        url,
        **options,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError],
        retry_on_timeout=False,
    )
