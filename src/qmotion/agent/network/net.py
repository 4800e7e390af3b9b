"""The agent's view of its host network: bridges present, and tap devices for VM NICs."""

from __future__ import annotations

import fcntl
import os
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from qmotion.agent.network.forwarder import prepare_tap


def bridges() -> list[str]:
    with IPRoute() as ip:
        links = ip.get_links()
    names = []
    for link in links:
        info = link.get_attr("IFLA_LINKINFO")
        if info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge":
            names.append(str(link.get_attr("IFLA_IFNAME")))
    return sorted(names)


def tap_mac(vm_mac: str) -> str:
    """The host-side MAC of a VM's tap: fe:... (as libvirt does). A Linux bridge without a set
    address takes its lowest port MAC; a random tap MAC below the uplink's would change the
    host's own MAC when the tap comes or goes, and peers' ARP caches would point nowhere."""
    return "fe:" + vm_mac.lower().split(":", 1)[1]


def create_tap(name: str, bridge: str, mac: str) -> None:
    """A persistent tap enslaved to ``bridge``; QEMU is handed it open (``open_tap``)."""
    with IPRoute() as ip:
        if ip.link_lookup(ifname=name):
            delete_tap_with(ip, name)
        master = ip.link_lookup(ifname=bridge)
        if not master:
            raise LookupError(f"bridge {bridge} does not exist on this host")
        ip.link("add", ifname=name, kind="tuntap", mode="tap")
        (index,) = ip.link_lookup(ifname=name)
        ip.link("set", index=index, address=mac)
        # Before any traffic: a qdisc added later to a live tap drops frames in flight.
        prepare_tap(name)
        ip.link("set", index=index, master=master[0], state="up")


TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def open_tap(name: str) -> int:
    """A file descriptor attached to tap ``name``, for QEMU to inherit: QEMU runs as an
    unprivileged user that may neither open ``/dev/net/tun`` nor attach a tap. The flags are
    those QEMU sets when it opens a tap by name (a virtio NIC's offloads follow the virtio
    header, and a migration needs them equal on both sides)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifreq = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError:
        os.close(fd)
        raise
    return fd


def delete_tap_with(ip: IPRoute, name: str) -> None:
    for index in ip.link_lookup(ifname=name):
        try:
            ip.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != 19:  # ENODEV: already gone
                raise


def delete_tap(name: str) -> None:
    with IPRoute() as ip:
        delete_tap_with(ip, name)
