"""Measurements before a migration, through the agents: the guest's dirty rate and resident
memory on the source, the path's RTT and bandwidth to the destination; and the plan from them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TypeVar

from sqlalchemy import select

from qmotion.api.errors import AgentErrorCode
from qmotion.api.host import MigrationNetwork
from qmotion.api.migration import (
    DirtyRateReport,
    DirtyRateRequest,
    MigrationPrediction,
    MigrationReport,
    PathProbe,
    PathProbeRequest,
    PeerRef,
)
from qmotion.client.agent import AgentClient
from qmotion.client.errors import ApiError, ClientError
from qmotion.migration.convergence import DirtyMeasure, Limits, PathMeasure, Plan, plan
from qmotion.migration.errors import Refused, StepError
from qmotion.migration.params import streams_for
from qmotion.migration.prechecks import Refusal
from qmotion.server.db import Database, Host, Task
from qmotion.server.inventory import Inventory

T = TypeVar("T")
# Below this the guest is idle for migration purposes: the long sample would only add time.
IDLE_DIRTY_BPS = 1 << 20
IDLE_SHARE = 0.05  # of what the path carried last time: below it the guest converges at once
SHORT_S, LONG_S = 0.25, 1.0
PROBE_S = 0.25


@dataclass(frozen=True)
class PathHistory:
    """What the last completed migration on a path carried, and where it went."""

    bandwidth_bps: float | None
    address: str | None = None
    rtt_ms: float | None = None

    def route(self, dst: Host) -> PathProbe | None:
        """The route it took, to prepare the next destination with while the route is
        checked again: only if its address is still one of the destination's migration
        addresses and its RTT is known."""
        if self.address is None or self.rtt_ms is None:
            return None
        if self.address not in {n.address for n in _networks(dst)}:
            return None
        return PathProbe(
            rtt_ms=self.rtt_ms, bandwidth_bps=0.0, bytes=0, seconds=0.0, address=self.address
        )


def path_history(db: Database, source: str, destination: str) -> PathHistory | None:
    """The last completed migration on this path (None: none, or it reported no rate)."""
    with db.session() as s:
        rows = s.scalars(
            select(Task)
            .where(
                Task.kind == "migrate",
                Task.state == "succeeded",
                Task.source == source,
                Task.destination == destination,
            )
            .order_by(Task.id.desc())
            .limit(1)
        )
        for t in rows:
            r = MigrationReport.model_validate(t.result) if t.result else None
            if r is not None and r.throughput_mbps:
                rtt = r.prediction.rtt_ms if r.prediction is not None else None
                return PathHistory(r.throughput_mbps * 1e6 / 8, r.migration_address, rtt)
    return None


def _history_bandwidth(db: Database, source: str, destination: str) -> float | None:
    """What the last completed migration on this path carried, in bytes/s."""
    got = path_history(db, source, destination)
    return got.bandwidth_bps if got is not None else None


def _networks(host: Host) -> list[MigrationNetwork]:
    # Only these facts: an older agent's facts (or a partial record) still plan a migration.
    nets = (host.facts or {}).get("migration_networks", [])
    return [MigrationNetwork.model_validate(n) for n in nets]


def _window(host: Host) -> int | None:
    got = (host.facts or {}).get("tcp_rmem_max")
    return int(got) if isinstance(got, int) else None


def peer_of(dst: Host, vm: str, tls: bool) -> PeerRef:
    """Where the source agent sends its timed upload. On a TLS cluster: the destination's
    mutual-TLS port, where the source's certificate is its credential; no agent is ever
    handed another's token (an agent without that port yet gets none either, and its probe
    is refused). Only an insecure cluster passes the destination's token on."""
    if not tls:
        return PeerRef(url=dst.agent_url, token=dst.token, vm=vm)
    facts = dst.facts or {}
    port, address = facts.get("peer_port"), facts.get("address")
    if port and address:
        return PeerRef(url=f"https://{address}:{port}", token=None, vm=vm)
    return PeerRef(url=dst.agent_url, token=None, vm=vm)


async def route(inventory: Inventory, vm: str, src: Host, dst: Host) -> PathProbe:
    """The destination address the stream will go to: the first of its migration addresses
    the source reaches, with the path's RTT. Raises Refused: no address answers, or the two
    ends of the chosen path disagree on the MTU (the port refuses before anything is made,
    or, checking a known path's route beside preparing the destination, fails that step);
    StepError when the source agent could not say."""
    nets = _networks(dst)
    candidates = []
    for n in nets:
        with contextlib.suppress(ValueError):  # a name, or IPv6: not a candidate here
            candidates.append(IPv4Address(n.address))
    # Reachability and RTT need no credential: the peer's token stays off the migration net.
    # On a TLS cluster the destination's peer port (the control API takes only the
    # manager's certificate), where the source's host certificate gets in.
    peer = peer_of(dst, vm, inventory.tls).model_copy(update={"token": None})
    req = PathProbeRequest(peer=peer, candidates=candidates, upload=False)

    def work() -> PathProbe:
        with inventory.agents.client(src.agent_url, src.token, 30.0) as client:
            return client.probe_path(req)

    try:
        got = await asyncio.to_thread(work)
    except ApiError as exc:
        if exc.detail.code != AgentErrorCode.PEER_UNREACHABLE:
            raise StepError("route", f"on {src.name}: {exc}", vm=vm, host=src.name) from exc
        raise Refused(
            vm,
            [
                Refusal(
                    "destination_unreachable",
                    f"{src.name} reaches no migration address of {dst.name}: {exc}",
                    409,
                    field="to",
                    host=dst.name,
                )
            ],
        ) from exc
    except ClientError as exc:
        raise StepError("route", f"on {src.name}: {exc}", vm=vm, host=src.name) from exc
    remote = next((n for n in nets if n.address == got.address), None)
    if (
        remote is not None
        and remote.mtu is not None
        and got.local_mtu is not None
        and remote.mtu != got.local_mtu
    ):
        # On one L2 segment nothing fragments or reports a smaller path MTU: frames larger
        # than the smaller end's MTU are dropped, and the stream stalls once it fills them.
        raise Refused(
            vm,
            [
                Refusal(
                    "mtu_mismatch",
                    f"MTU mismatch on the migration path to {got.address}: {src.name} sends "
                    f"on {got.local_ifname} with MTU {got.local_mtu}, {dst.name} receives on "
                    f"{remote.ifname} with MTU {remote.mtu}; set the same MTU (jumbo frames) "
                    "on both ends",
                    409,
                    field="to",
                    host=dst.name,
                )
            ],
        )
    return got


async def measure(
    db: Database,
    inventory: Inventory,
    vm: str,
    src: Host,
    dst: Host,
    limits: Limits,
    *,
    quick: bool = False,
    reach: PathProbe | None = None,
    tls: bool = False,
) -> tuple[Plan, MigrationPrediction]:
    """Measure the guest and the path, and plan the migration; raises StepError.

    ``quick`` (before a real migration, where every ms delays the start): the path is not
    probed when an earlier migration on it measured the rate; the guest's short sample and
    the probe run at once, and only a busy guest gets the long sample.
    """

    async def call(host: Host, what: str, fn: Callable[[AgentClient], T]) -> T:
        def work() -> T:
            with inventory.agents.client(host.agent_url, host.token, 30.0) as client:
                return fn(client)

        try:
            return await asyncio.to_thread(work)
        except ClientError as exc:
            raise StepError(
                "measure", f"{what} on {host.name}: {exc}", vm=vm, host=host.name
            ) from exc

    history = await asyncio.to_thread(_history_bandwidth, db, src.name, dst.name)
    if reach is None:
        reach = await route(inventory, vm, src, dst)
    peer = peer_of(dst, vm, tls)
    chosen = []
    with contextlib.suppress(ValueError):  # a host name (agent URL): the probe goes there
        chosen = [IPv4Address(reach.address)] if reach.address else []

    async def probe() -> PathProbe | None:
        # Before a real migration QEMU's own rate on this path (history) is the better
        # figure and costs nothing; the probe is for the first migration and dry runs.
        if quick and history is not None:
            return None
        return await call(
            src,
            "path probe",
            lambda c: c.probe_path(PathProbeRequest(peer=peer, seconds=PROBE_S, candidates=chosen)),
        )

    async def short_sample() -> DirtyRateReport:
        return await call(
            src, "dirty rate", lambda c: c.dirty_rate(vm, DirtyRateRequest(seconds=[SHORT_S]))
        )

    # The guest's sample and the path's probe load different things: at once.
    short, probed = await asyncio.gather(short_sample(), probe())
    samples = [(x.seconds, float(x.dirtied_bytes)) for x in short.samples]
    # Busy only relative to the path: the long sample is for guests that may need the ladder.
    busy = samples[0][1] / samples[0][0] >= max(IDLE_DIRTY_BPS, IDLE_SHARE * (history or 0.0))

    async def long_sample() -> list[tuple[float, float]]:
        if not busy:
            return []
        got = await call(
            src, "dirty rate", lambda c: c.dirty_rate(vm, DirtyRateRequest(seconds=[LONG_S]))
        )
        return [(x.seconds, float(x.dirtied_bytes)) for x in got.samples]

    samples += await long_sample()
    dirty = DirtyMeasure.from_samples(samples[0], samples[1] if len(samples) > 1 else None)
    # The probe's upload runs through Python on both ends: on a fast link it is the lower
    # bound, and QEMU's own rate on the last migration is the better figure.
    bandwidth, source, rtt_ms = 0.0, "history", reach.rtt_ms
    if probed is not None:
        bandwidth, source, rtt_ms = probed.bandwidth_bps, "probe", min(rtt_ms, probed.rtt_ms)
    if history is not None and history > bandwidth:
        bandwidth, source = history, "history"
    if limits.bandwidth_bps is not None and limits.bandwidth_bps < bandwidth:
        bandwidth, source = limits.bandwidth_bps, "operator"
    path = PathMeasure(bandwidth_bps=max(bandwidth, 1.0), rtt_s=rtt_ms / 1000)
    p = plan(short.memory_bytes, short.resident_bytes, dirty, path, limits)
    streams = streams_of(reach, src, dst, limits, history, tls=tls)
    return p, MigrationPrediction(
        vm=vm,
        source=src.name,
        destination=dst.name,
        memory_bytes=short.memory_bytes,
        resident_bytes=short.resident_bytes,
        dirty_rate_bps=round(dirty.rate_bps),
        hot_set_bytes=round(dirty.hot_bytes),
        sweep_bps=round(dirty.sweep_bps),
        bandwidth_bps=round(path.bandwidth_bps),
        bandwidth_from=source,
        rtt_ms=rtt_ms,
        converges=p.converges,
        total_s=round(p.total_s, 2),
        downtime_ms=round(p.downtime_ms, 1),
        passes=p.passes,
        measures=list(p.measures),
        max_throttle_pct=p.max_throttle_pct,
        xbzrle=p.xbzrle_cache_bytes > 0 and streams == 0,  # QEMU: not with multifd
        max_downtime_ms=p.max_downtime_ms,
        completion_timeout_s=p.completion_timeout_s,
        why_not=p.why_not,
        migration_address=reach.address,
        unreachable=reach.unreachable,
        streams=max(streams, 1),
    )


def streams_of(
    reach: PathProbe,
    src: Host,
    dst: Host,
    limits: Limits,
    history: float | None,
    *,
    tls: bool = False,
) -> int:
    """Multifd channels for this path (0: one classic stream)."""
    if limits.allow_postcopy:
        return 0  # QEMU 10: "Postcopy is not yet compatible with multifd"
    cap = int(limits.bandwidth_bps) if limits.bandwidth_bps is not None else None
    cpus = min(int((h.facts or {}).get("cpus", 1)) for h in (src, dst))
    return streams_for(
        reach.rtt_ms / 1000, _window(dst), cap_bps=cap, history_bps=history, tls=tls, cpus=cpus
    )
