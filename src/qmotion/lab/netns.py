"""Netlink plumbing for the lab (pyroute2): namespaces, bridges, veth pairs, addresses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

ENODEV = 19
T = TypeVar("T")


def enter(ns: str) -> list[str]:
    """The argv prefix that runs a command in ``ns``'s network only: ``ip netns exec`` also
    mounts a fresh /sys, which hides the cgroup hierarchies (an agent there could not put its
    VMs in cgroups, as it does on a real host)."""
    return ["nsenter", f"--net=/run/netns/{ns}", "--"]


def disable_ipv6(ns: str | None, ifname: str = "all") -> None:
    """Lab links carry only what the lab sends: no router solicitations or DAD chatter."""
    keys = [f"net.ipv6.conf.{ifname}.disable_ipv6=1"]
    if ifname == "all":
        keys.append("net.ipv6.conf.default.disable_ipv6=1")
    cmd = ["sysctl", "-qw", *keys]
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    subprocess.run(cmd, check=False, capture_output=True)


def run_in(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that has joined ``ns`` (setns is per thread), so probes
    can open sockets from a namespace without spawning a process."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            netns.setns(ns)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def create_ns(name: str) -> None:
    netns.create(name)
    disable_ipv6(name)
    with NetNS(name) as ns:
        (lo,) = ns.link_lookup(ifname="lo")
        ns.link("set", index=lo, state="up")


def namespaces() -> list[str]:
    return sorted(netns.listnetns())


def delete_ns(name: str) -> None:
    if name in netns.listnetns():
        netns.remove(name)


def ns_pids(name: str) -> list[int]:
    """PIDs of every process living in the namespace."""
    out = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def kill_ns_processes(name: str) -> None:
    """Everything in a lab namespace was started by the lab: end it, TERM then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = ns_pids(name)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for _ in range(50):
            if not ns_pids(name):
                return
            _reap()
            subprocess.run(["sleep", "0.1"], check=False)
    _reap()


def _reap() -> None:
    """Collect our own exited children (the lab's agents when started by this process)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


@contextlib.contextmanager
def _ipr(ns: str | None) -> Iterator[IPRoute]:
    with IPRoute() if ns is None else NetNS(ns) as ip:
        yield ip


def veth(name: str, ns: str | None, peer: str, peer_ns: str) -> None:
    """A veth pair, both ends up: ``name`` in ``ns`` (None: root), ``peer`` in ``peer_ns``."""
    with _ipr(ns) as ip:
        ip.link("add", ifname=name, kind="veth", peer={"ifname": peer, "net_ns_fd": peer_ns})
        (idx,) = ip.link_lookup(ifname=name)
        ip.link("set", index=idx, state="up")
    if ns is None:
        disable_ipv6(None, name)
    with _ipr(peer_ns) as ip:
        (idx,) = ip.link_lookup(ifname=peer)
        ip.link("set", index=idx, state="up")


def enslave(ns: str | None, port: str, bridge: str) -> None:
    with _ipr(ns) as ip:
        (idx,) = ip.link_lookup(ifname=port)
        (br,) = ip.link_lookup(ifname=bridge)
        ip.link("set", index=idx, master=br, state="up")


def create_bridge(ns: str | None, name: str) -> None:
    with _ipr(ns) as ip:
        ip.link("add", ifname=name, kind="bridge")
        (idx,) = ip.link_lookup(ifname=name)
        # A set address pins the bridge's MAC; otherwise it follows its lowest port's MAC and
        # changes as ports come and go, leaving stale ARP entries on every peer.
        mac = "02:" + ":".join(f"{b:02x}" for b in os.urandom(5))
        ip.link("set", index=idx, address=mac, state="up")


def set_link(
    ns: str | None, ifname: str, *, up: bool | None = None, mtu: int | None = None
) -> None:
    with _ipr(ns) as ip:
        (idx,) = ip.link_lookup(ifname=ifname)
        if mtu is not None:
            ip.link("set", index=idx, mtu=mtu)
        if up is not None:
            ip.link("set", index=idx, state="up" if up else "down")


def add_address(ns: str | None, ifname: str, address: str, prefixlen: int) -> None:
    with _ipr(ns) as ip:
        (idx,) = ip.link_lookup(ifname=ifname)
        ip.addr("add", index=idx, address=address, prefixlen=prefixlen)


def limit_rate(ns: str, dev: str, rate_bytes: int) -> None:
    """Token-bucket rate limit on egress (sch_tbf). The burst must hold a whole GSO frame."""
    burst = max(rate_bytes // 100, 256 << 10)
    args = [
        "ip",
        "netns",
        "exec",
        ns,
        "tc",
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        f"{rate_bytes * 8}bit",
        "burst",
        str(burst),
        "latency",
        "100ms",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"tc tbf on {ns}/{dev} failed: {proc.stderr.strip()}")


def clear_rate(ns: str, dev: str) -> None:
    """Remove ``limit_rate``'s qdisc: the link sends at its own speed again."""
    subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
        check=False,
        capture_output=True,
    )


# tc filter priority of the lab's fault injection: one well-known slot, so it is found and
# removed again without touching anything else on the link.
FAULT_PREF = "7"
FAULT_SINK = "qfsink"


def drop_incoming_tcp_high_ports(ns: str, dev: str) -> None:
    """Drop TCP segments arriving on ``dev`` for ports 32768-65535 (the ephemeral range, where
    QEMU's incoming migration listens), leaving the agents' fixed port reachable: the
    migration stream is cut while the hosts still answer their managers.

    This kernel has no tc drop action (act_gact) and no netem; the segments are redirected
    (act_mirred) into a veth that stays down, which discards them.
    """
    tc = ["ip", "netns", "exec", ns, "tc"]
    subprocess.run(
        ["ip", "-n", ns, "link", "add", FAULT_SINK, "type", "veth", "peer", "name", "qfsinkp"],
        check=True,
        capture_output=True,
    )
    subprocess.run([*tc, "qdisc", "replace", "dev", dev, "clsact"], check=True)
    subprocess.run(
        [
            *tc,
            "filter",
            "replace",
            "dev",
            dev,
            "ingress",
            "pref",
            FAULT_PREF,
            "protocol",
            "ip",
            "u32",
            "match",
            "ip",
            "protocol",
            "6",
            "0xff",
            "match",
            "ip",
            "dport",
            "0x8000",
            "0x8000",
            "action",
            "mirred",
            "egress",
            "redirect",
            "dev",
            FAULT_SINK,
        ],
        check=True,
        capture_output=True,
    )


def clear_fault(ns: str, dev: str) -> None:
    for cmd in (
        ["tc", "filter", "del", "dev", dev, "ingress", "pref", FAULT_PREF],
        ["ip", "link", "del", FAULT_SINK],
    ):
        subprocess.run(["ip", "netns", "exec", ns, *cmd], check=False, capture_output=True)


def delete_link(name: str) -> None:
    with IPRoute() as ip:
        for idx in ip.link_lookup(ifname=name):
            try:
                ip.link("del", index=idx)
            except NetlinkError as exc:
                if exc.code != ENODEV:
                    raise


def links_with_prefix(prefix: str) -> list[str]:
    with IPRoute() as ip:
        names = [str(link.get_attr("IFLA_IFNAME")) for link in ip.get_links()]
    return [n for n in names if n.startswith(prefix)]


def root_addresses() -> list[str]:
    with IPRoute() as ip:
        return [str(a.get_attr("IFA_ADDRESS")) for a in ip.get_addr(family=2)]
