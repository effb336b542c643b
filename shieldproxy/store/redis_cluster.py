"""Redis Cluster store: the standalone store routed per hash slot, all-or-nothing across shards.

Every limiter key carries a `{rule|subject}` hash tag (limits/keys.py), so one limiter lives on
one slot and limits.lua never sees CROSSSLOT. A request whose hits live on several slots is split
into one script call per slot; the calls of a coalesced batch are grouped by node and sent as one
pipeline per node, concurrently (redis-py's ClusterPipeline), so a request costs one parallel round
trip however many shards it touches. MOVED/ASK are followed by redis-py (slot map refreshed and
the command re-sent once); anything else goes to the breaker.

All-or-nothing across slots — consume-then-refund, chosen over check-then-consume:

* consume-then-refund (ours): every slot group evaluates and consumes atomically on its shard;
  if any group denies, the groups that consumed are refunded in a second round trip. Allowed
  requests (the common case) cost one round trip. A concurrent request may briefly see the
  not-yet-refunded units and be denied: errors only ever lean strict, never over-admit. If the
  refund itself fails (shard died in between) the units stay consumed until their window ends.
* check-then-consume would cost two round trips for every allowed request and, between the
  check and the consume, other instances can take the same quota: it over-admits under load,
  which is the one thing a limiter must not do.

Requests whose hits share one slot (the usual single-rule case) are exactly atomic.
"""

from __future__ import annotations

import itertools
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.maint_notifications import MaintNotificationsConfig

from shieldproxy.store.redis import RedisStore, bus_client, no_retry
from shieldproxy.store.urls import RedisTarget


class RedisClusterStore(RedisStore):
    """Store over `redis[s]+cluster://host:port,host:port` (the nodes are only the seed list)."""

    @classmethod
    def from_target(cls, target: RedisTarget, **kwargs: Any) -> RedisClusterStore:
        nodes, options = target.nodes, target.options
        timeout = kwargs["timeout_seconds"]
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            **options,
            retry=no_retry(),
            socket_timeout=max(1.0, timeout * 10),
            socket_connect_timeout=max(1.0, timeout * 10),
            max_connections=256,
            driver_info=None,
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        rotation = itertools.cycle(nodes)

        def bus_connect() -> Redis:
            # Cluster PUBLISH reaches every node: any one node serves pub/sub; after a
            # failure the listener reconnects to the next one.
            host, port = next(rotation)
            return bus_client(host, port, options)

        kwargs.setdefault("bus_connect", bus_connect)
        return cls(client, **kwargs)

    def _slot(self, key: str) -> int:
        slot: int = self._client.keyslot(key)
        return slot
