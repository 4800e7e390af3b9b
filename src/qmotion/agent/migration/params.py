"""What the agent tells QEMU about a migration stream: capabilities, parameters, TLS credentials.

Both ends use it. The capabilities and parameters are pure functions of the request (the unit
tests hold them to QEMU's limits); the TLS credentials are QEMU objects, so setting them asks
QEMU. And how QEMU's refusal reaches the manager: as the agent's error, with QMP's error class.
"""

from __future__ import annotations

import contextlib
from typing import Any

from qmotion.agent.errors import Conflict
from qmotion.agent.tls import TlsStore
from qmotion.api.migration import UNLIMITED_BANDWIDTH, MigrationParams, MigrationTune
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.monitor import Monitor
from qmotion.migration.convergence import DORMANT_THROTTLE, MAX_THROTTLE, THROTTLE_INCREMENT

PAUSE_SETTLE_S = 5.0  # either end: how long a postcopy stream is given to reach paused


def stream_capabilities(params: MigrationParams, *, source: bool) -> list[dict[str, Any]]:
    caps = {
        "events": True,
        "multifd": params.multifd_channels > 0,
        "pause-before-switchover": source and params.pause_before_switchover,
        # QEMU fixes capabilities when the stream starts: what the ladder may need later is
        # switched on now (auto-converge dormant, see qmotion.migration.convergence).
        "auto-converge": source and params.auto_converge,
        "xbzrle": params.xbzrle_cache_bytes > 0,
        # Both ends: the destination registers its memory with userfaultfd for it.
        "postcopy-ram": params.postcopy,
    }
    return [{"capability": k, "state": v} for k, v in caps.items()]


def stream_parameters(params: MigrationParams) -> dict[str, Any]:
    out: dict[str, Any] = {
        "max-bandwidth": params.max_bandwidth,
        "downtime-limit": params.downtime_limit_ms,
    }
    if params.multifd_channels > 0:
        out["multifd-channels"] = params.multifd_channels
        # Always set: a QEMU that arrived by a compressed stream keeps what it was told.
        out["multifd-compression"] = params.multifd_compression or "none"
        if params.multifd_compression == "zstd":
            out["multifd-zstd-level"] = 1
    if params.postcopy:
        # QEMU's postcopy has its own cap, unlimited (0) by default: the operator's holds too.
        # Always set: a QEMU that arrived by a capped migration still has that one's.
        capped = params.max_bandwidth < UNLIMITED_BANDWIDTH
        out["max-postcopy-bandwidth"] = params.max_bandwidth if capped else 0
    if params.auto_converge:
        # Dormant: QEMU may still trigger on its own when the guest outruns the link, so
        # the ceiling holds it at 1 % until the ladder wakes it.
        initial, increment, threshold, ceiling = DORMANT_THROTTLE
        if params.throttle_initial_pct:
            increment = params.throttle_increment_pct or THROTTLE_INCREMENT
            initial, threshold, ceiling = params.throttle_initial_pct, 50, MAX_THROTTLE
        out |= {
            "cpu-throttle-initial": initial,
            "cpu-throttle-increment": increment,
            "throttle-trigger-threshold": threshold,
            "max-cpu-throttle": ceiling,
        }
    if params.xbzrle_cache_bytes > 0:
        # QEMU takes only a power of two no smaller than a page (migrate_params_check).
        out["xbzrle-cache-size"] = max(1 << (params.xbzrle_cache_bytes.bit_length() - 1), 4096)
    return out


def tune_parameters(tune: MigrationTune) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if tune.downtime_limit_ms is not None:
        out["downtime-limit"] = tune.downtime_limit_ms
    if tune.throttle_pct is not None:
        # Awake: QEMU starts here (or, when the dormant 1 % already triggered, adds the
        # increment to it) and steps again after every two syncs in which the guest dirtied
        # more than half of what was sent.
        out |= {
            "cpu-throttle-initial": tune.throttle_pct,
            "cpu-throttle-increment": THROTTLE_INCREMENT,
            "throttle-trigger-threshold": 50,
            "max-cpu-throttle": MAX_THROTTLE,
        }
    return out


def require_tls(tls: TlsStore | None, params: MigrationParams) -> TlsStore | None:
    """Refused before anything starts: a TLS stream needs this host's certificate."""
    if not params.tls:
        return None
    if tls is None or not tls.ready:
        raise Conflict(
            "this host has no certificate from the cluster CA for a TLS migration; "
            "register it with the manager again"
        )
    return tls


AUTHZ = "qm-authz-source"


async def source_authz(mon: Monitor, source_host: str | None) -> str:
    """The destination's rule that only the named source's certificate gets in (QEMU's
    ``authz-simple`` on the certificate's name); its id, or "" when no source was named."""
    with contextlib.suppress(HypervisorError):
        await mon.execute("object-del", {"id": AUTHZ})  # from an earlier migration
    if not source_host:
        return ""
    await mon.execute(
        "object-add",
        {"qom-type": "authz-simple", "id": AUTHZ, "identity": f"CN={source_host}"},
    )
    return AUTHZ


async def tls_parameters(
    mon: Monitor,
    tls: TlsStore | None,
    params: MigrationParams,
    endpoint: str,
    source_host: str | None = None,
) -> dict[str, Any]:
    """QEMU's x509 credentials for this end of the stream (mutual: both verify), or
    none; set either way, since a QEMU that migrated before keeps what it was told. The
    server end (``source_host`` named) takes only that host's certificate."""
    if not params.tls:
        return {"tls-creds": "", "tls-hostname": ""}
    store = require_tls(tls, params)
    assert store is not None
    creds = f"qm-tls-{endpoint}"
    with contextlib.suppress(HypervisorError):
        await mon.execute("object-del", {"id": creds})  # from an earlier migration
    await mon.execute(
        "object-add",
        {
            "qom-type": "tls-creds-x509",
            "id": creds,
            "endpoint": endpoint,
            "dir": str(store.qemu_dir),
            "verify-peer": True,
        },
    )
    out: dict[str, Any] = {"tls-creds": creds}
    if endpoint == "server":
        out["tls-authz"] = await source_authz(mon, source_host)
    if endpoint == "client":
        # The destination's name (in its certificate), whichever address carries it.
        out["tls-hostname"] = params.tls_hostname or ""
    return out
