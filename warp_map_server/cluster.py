"""The map cluster's link to Valkey (or Redis): shared records and pub/sub between instances.

The decisions stay in the sans-I/O :class:`~warp_map_server.registry.Registry`; this module only
carries its :class:`~warp_map_server.registry.Announce` and
:class:`~warp_map_server.registry.Forward` outputs out, and other instances' announces and
forwards in. What lives in Valkey (``prefix`` = ``cluster.key_prefix``):

* ``{prefix}c:{client key hex}``: the client's :class:`ClientRecord` (msgpack), expiring with
  its registrations (``PX``): far gate(s), endpoints, version, owning instance. Public keys and
  addresses only; no secrets.
* ``{prefix}index``: a sorted set of those keys by expiry time, so that a record is written
  only while the cluster holds fewer than ``max_clients`` (checked and written in one script,
  atomically): however many instances race, Valkey never holds more than the cap.
* channel ``{prefix}events``: every announce, for the other instances' mirrors and pushes.
* channel ``{prefix}i:{instance id hex}``: relayed payloads for the clients of that instance.

When Valkey is unreachable the map goes on serving what it holds (its own clients and its
mirror, which lapses with the records' TTLs), logs ``map.cluster.down``, counts what it could
not send, and retries; back up (``map.cluster.up``), it reloads the records and announces all
its own clients again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

from warp.config import ClusterConfig
from warp.map_client.messages import (
    MAX_ENDPOINTS,
    MAX_FAR_GATES,
    MAX_RELAY_PAYLOAD,
    U64,
    Endpoint,
)
from warp_map_server.registry import Announce, ClientRecord, ClusterOutput, Forward, log_event

log = logging.getLogger("warp_map_server")

#: outputs waiting for Valkey at most; more are dropped and counted (a stalled Valkey must not
#: grow the map's memory)
MAX_PENDING = 65_536
PIPELINE_BATCH = 512
READ_BATCH = 256
HEALTH_INTERVAL = 1.0
COMMAND_TIMEOUT = 2.0
RETRY_MIN, RETRY_MAX = 0.2, 5.0
SCAN_COUNT = 1000
MAX_MESSAGE = MAX_RELAY_PAYLOAD + 1024


#: Write a record unless the cluster is full: KEYS = record key, index; ARGV = data, TTL ms,
#: cap, events channel. Returns 1 when written (and published), 0 when refused.
ANNOUNCE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if not redis.call('ZSCORE', KEYS[2], KEYS[1]) and
        redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), KEYS[1])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""


class ClusterMessageError(ValueError):
    """Bytes from the cluster that are not a record or a forward."""


@dataclass(frozen=True, slots=True)
class RelayIn:
    """A relayed payload another instance forwards to one of our clients."""

    sender: bytes
    target: bytes
    payload: bytes
    #: where the sender's Relay came from, and the target endpoint it named (if any)
    source: Endpoint | None = None
    endpoint: Endpoint | None = None


ClusterInput: TypeAlias = ClientRecord | RelayIn


# ------------------------------------------------------------------------------------ codec


def _pack_endpoint(endpoint: Endpoint) -> list[object]:
    return [ipaddress.ip_address(endpoint[0]).packed, endpoint[1]]


def encode_record(record: ClientRecord) -> bytes:
    item = [
        "r",
        record.key,
        record.far_gate,
        [_pack_endpoint(e) for e in record.endpoints],
        record.version,
        record.owner,
        max(0, round(record.ttl * 1000)),
    ]
    if record.also:
        # only then: a client with one far gate stays readable by instances that predate this
        item.append(list(record.also))
    return msgpack.packb(item)


def encode_forward(forward: Forward) -> bytes:
    item: list[object] = ["f", forward.sender, forward.target, forward.payload]
    if forward.source is not None:
        # only then: a forward without endpoints stays readable by instances that predate them
        item.append(_pack_endpoint(forward.source))
        item.append(None if forward.endpoint is None else _pack_endpoint(forward.endpoint))
    return msgpack.packb(item)


def _key(value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ClusterMessageError("bad key")
    return value


def _uint(value: object, limit: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ClusterMessageError("bad integer")
    return value


def _endpoint(value: object) -> Endpoint:
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], bytes):
        raise ClusterMessageError("bad endpoint")
    if len(value[0]) not in (4, 16):
        raise ClusterMessageError("bad endpoint address")
    port = _uint(value[1], 65535)
    if port == 0:
        raise ClusterMessageError("bad endpoint port")
    return str(ipaddress.ip_address(value[0])), port


def decode(data: bytes) -> ClusterInput:
    """The one parsing boundary for what comes from Valkey: a record, a relay or an error."""
    if len(data) > MAX_MESSAGE:
        raise ClusterMessageError("too long")
    try:
        item = msgpack.unpackb(data, use_list=True, raw=False, max_bin_len=MAX_MESSAGE)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ClusterMessageError(f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(item, list) or not item:
        raise ClusterMessageError("not a cluster message")
    if item[0] == "r" and len(item) in (7, 8):
        endpoints = item[3]
        if not isinstance(endpoints, list) or len(endpoints) > MAX_ENDPOINTS:
            raise ClusterMessageError("bad endpoints")
        also = item[7] if len(item) == 8 else []
        if not isinstance(also, list) or len(also) >= MAX_FAR_GATES:
            raise ClusterMessageError("bad far gates")
        return ClientRecord(
            _key(item[1]),
            _key(item[2]),
            tuple(_endpoint(e) for e in endpoints),
            _uint(item[4], U64),
            _uint(item[5], U64),
            _uint(item[6], 0xFFFF_FFFF) / 1000,
            tuple(_key(k) for k in also),
        )
    if item[0] == "f" and len(item) in (4, 6):
        payload = item[3]
        if not isinstance(payload, bytes) or not 0 < len(payload) <= MAX_RELAY_PAYLOAD:
            raise ClusterMessageError("bad payload")
        source = _endpoint(item[4]) if len(item) == 6 else None
        endpoint = _endpoint(item[5]) if len(item) == 6 and item[5] is not None else None
        return RelayIn(_key(item[1]), _key(item[2]), payload, source, endpoint)
    raise ClusterMessageError("unknown cluster message")


def redis_url(url: str) -> str:
    """``valkey://`` / ``valkeys://`` as the redis client spells them."""
    scheme, _, rest = url.partition("://")
    scheme = {"valkey": "redis", "valkeys": "rediss"}.get(scheme.lower(), scheme.lower())
    return f"{scheme}://{rest}"


# ------------------------------------------------------------------------------------ link


class ClusterLink:
    """Owns the Valkey connections of one map instance; see the module docstring.

    ``deliver`` gets what other instances sent (records, relays); ``on_up`` is called each time
    the link (re)connects, after the records were loaded, so that the map announces its own
    clients again; ``on_down`` when it is lost (or cannot be made at start)."""

    def __init__(
        self,
        config: ClusterConfig,
        instance: int,
        deliver: Callable[[Sequence[ClusterInput]], None],
        *,
        max_clients: int,
        on_up: Callable[[], None],
        on_down: Callable[[], None],
    ) -> None:
        self.url = redis_url(config.url)
        self.prefix = config.key_prefix
        self.max_clients = max_clients
        self.index_key = f"{self.prefix}index"
        self.instance = instance
        self.events_channel = f"{self.prefix}events"
        self.own_channel = self.channel_of(instance)
        self._deliver = deliver
        self._on_up = on_up
        self._on_down = on_down
        self.up = False
        self.counters: Counter[str] = Counter()
        self._pending: deque[ClusterOutput] = deque()
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_error: str | None = None

    def channel_of(self, instance: int) -> str:
        return f"{self.prefix}i:{instance:016x}"

    def record_key(self, key: bytes) -> str:
        return f"{self.prefix}c:{key.hex()}"

    # ------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="warp-map.cluster")

    async def wait_up(self, timeout: float) -> bool:
        """Wait until the link is up (records loaded); False after ``timeout``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self.up

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.up = False

    # ------------------------------------------------------------------------ outputs

    def submit(self, outputs: Sequence[ClusterOutput]) -> None:
        if not outputs:
            return
        if not self.up:
            # Announces are redone at reconnection (announce_all); relays are lost, as any
            # datagram on a broken path.
            self.counters["cluster.dropped_down"] += len(outputs)
            return
        room = MAX_PENDING - len(self._pending)
        if len(outputs) > room:
            self.counters["cluster.dropped_full"] += len(outputs) - room
            outputs = outputs[:room]
        self._pending.extend(outputs)
        self._wake.set()

    # ------------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        import redis.asyncio as redis_asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No silent reconnection inside the client: a lost connection must come back through
        # this loop, which reloads the records and announces ours again (Valkey may be empty).
        no_retry = Retry(NoBackoff(), 0)
        retry = RETRY_MIN
        while True:
            client: Any = redis_asyncio.from_url(
                self.url,
                socket_connect_timeout=COMMAND_TIMEOUT,
                socket_timeout=COMMAND_TIMEOUT,
                retry=no_retry,
            )
            listener: Any = redis_asyncio.from_url(
                self.url, socket_connect_timeout=COMMAND_TIMEOUT, retry=no_retry
            )
            pubsub = listener.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.events_channel, self.own_channel)
                await self._catch_up(client)
                self._pending.clear()
                self.up = True
                self._connected.set()
                retry = RETRY_MIN
                self.counters["cluster.connects"] += 1
                log_event(log, "map.cluster.up", url=_redact(self.url), instance=self._hex())
                self._on_up()
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._read(pubsub))
                    group.create_task(self._write(client))
            except Exception as exc:  # connection errors arrive in several types and in groups
                error = _describe(exc)
                if self.up or self.counters["cluster.failures"] == 0:
                    self._on_down()
                if self.up or error != self._last_error:
                    log_event(
                        log,
                        "map.cluster.down",
                        logging.WARNING,
                        url=_redact(self.url),
                        error=error,
                        serving="local",
                    )
                self._last_error = error
                self.counters["cluster.failures"] += 1
            finally:
                self.up = False
                self._connected.clear()
                self._pending.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await listener.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(retry)
            retry = min(retry * 2, RETRY_MAX)

    async def _catch_up(self, client: Any) -> None:
        """Load every record in Valkey into the mirror (they were announced while we were away)."""
        loaded: list[ClusterInput] = []
        cursor = 0
        pattern = f"{self.prefix}c:*"
        while True:
            cursor, keys = await client.scan(cursor, match=pattern, count=SCAN_COUNT)
            if keys:
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.get(key)
                    pipe.pttl(key)
                answers = await pipe.execute()
                for value, ttl_ms in zip(answers[::2], answers[1::2], strict=True):
                    if not isinstance(value, bytes) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
                        continue
                    item = self._parse(value)
                    if isinstance(item, ClientRecord) and item.owner != self.instance:
                        loaded.append(_with_ttl(item, ttl_ms / 1000))
            if cursor == 0:
                break
        self.counters["cluster.records_loaded"] += len(loaded)
        if loaded:
            self._deliver(loaded)

    async def _read(self, pubsub: Any) -> None:
        while True:
            # Wait for one message, then take what else is already buffered: one delivery
            # (one flush, one timer re-arm in the map) per batch, not per relayed shard.
            message = await pubsub.get_message(timeout=None)
            batch: list[ClusterInput] = []
            while message is not None:
                item = self._item(message)
                if item is not None:
                    batch.append(item)
                if len(batch) >= READ_BATCH:
                    break
                message = await pubsub.get_message(timeout=0)
            if batch:
                self._deliver(batch)

    def _item(self, message: Any) -> ClusterInput | None:
        if not isinstance(message, dict) or message.get("type") != "message":
            return None
        data = message.get("data")
        item = self._parse(data) if isinstance(data, bytes) else None
        if isinstance(item, RelayIn):
            self.counters["cluster.relay_in"] += 1
        elif item is not None:
            self.counters["cluster.records_in"] += 1
        return item

    async def _write(self, client: Any) -> None:
        announce = client.register_script(ANNOUNCE_SCRIPT)
        while True:
            if not self._pending:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), HEALTH_INTERVAL)
                except TimeoutError:
                    await client.ping()  # a silent Valkey is found out within a second or two
                    continue
            pipe = client.pipeline(transaction=False)
            written: list[bool] = []  # per command: is it a capped announce?
            while self._pending and len(written) < PIPELINE_BATCH:
                output = self._pending.popleft()
                if isinstance(output, Announce):
                    record = output.record
                    data = encode_record(record)
                    key = self.record_key(record.key)
                    if record.endpoints:
                        ttl_ms = max(1, round(record.ttl * 1000))
                        args = [data, ttl_ms, self.max_clients, self.events_channel]
                        await announce(keys=[key, self.index_key], args=args, client=pipe)
                        written.append(True)
                    else:
                        pipe.delete(key)
                        pipe.zrem(self.index_key, key)
                        pipe.publish(self.events_channel, data)
                        written += [False, False, False]
                    self.counters["cluster.announces"] += 1
                else:
                    pipe.publish(self.channel_of(output.owner), encode_forward(output))
                    written.append(False)
                    self.counters["cluster.relay_out"] += 1
            answers = await pipe.execute()
            refused = sum(1 for capped, answer in zip(written, answers, strict=True)
                          if capped and answer == 0)  # fmt: skip
            if refused:
                self._refused(refused)

    def _refused(self, count: int) -> None:
        """Records Valkey would not take: the cluster holds max_clients already. Those clients
        are served by their own instance, unseen by the others."""
        total = self.counters["cluster.refused_cap"] = self.counters["cluster.refused_cap"] + count
        if total == count or total // 1000 != (total - count) // 1000:
            log_event(
                log,
                "map.cluster.full",
                logging.WARNING,
                max_clients=self.max_clients,
                refused=total,
            )

    def _parse(self, data: bytes) -> ClusterInput | None:
        try:
            return decode(data)
        except ClusterMessageError as exc:
            invalid = self.counters["cluster.invalid"] = self.counters["cluster.invalid"] + 1
            if invalid == 1 or invalid % 1000 == 0:
                log_event(
                    log,
                    "map.cluster.invalid",
                    logging.WARNING,
                    reason=str(exc),
                    total=self.counters["cluster.invalid"],
                )
            return None

    def _hex(self) -> str:
        return f"{self.instance:016x}"

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        out["cluster.up"] = int(self.up)
        out["cluster.pending"] = len(self._pending)
        return out


def _with_ttl(record: ClientRecord, ttl: float) -> ClientRecord:
    return dataclasses.replace(record, ttl=ttl)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _describe(exc.exceptions[0])
    text = str(exc).replace(" ", "_")[:120]
    return f"{type(exc).__name__}:{text}" if text else type(exc).__name__


def _redact(url: str) -> str:
    """The URL without a password (``redis://:secret@host`` -> ``redis://***@host``)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
