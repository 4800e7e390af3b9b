#!/bin/busybox sh
# /init of the qmotion test guest: configured entirely from the kernel command line (qm.*).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null

# Defaults; each may be overridden by qm.KEY=VALUE on the kernel command line.
ip=""; hostname="qmguest"; fill=0; dirty=0; hot=0; check=0; echo=7000; memport=7001
diskport=7002; disk_rate=20; disk_bulk=0; probe=0; cpu=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        qm.ip=*) ip="${arg#qm.ip=}" ;;
        qm.hostname=*) hostname="${arg#qm.hostname=}" ;;
        qm.fill=*) fill="${arg#qm.fill=}" ;;
        qm.dirty=*) dirty="${arg#qm.dirty=}" ;;
        qm.hot=*) hot="${arg#qm.hot=}" ;;
        qm.check=*) check="${arg#qm.check=}" ;;
        qm.echo=*) echo="${arg#qm.echo=}" ;;
        qm.memport=*) memport="${arg#qm.memport=}" ;;
        qm.diskport=*) diskport="${arg#qm.diskport=}" ;;
        qm.disk_rate=*) disk_rate="${arg#qm.disk_rate=}" ;;
        qm.disk_bulk=*) disk_bulk="${arg#qm.disk_bulk=}" ;;
        qm.probe=*) probe="${arg#qm.probe=}" ;;
        qm.cpu=*) cpu="${arg#qm.cpu=}" ;;
    esac
done

if [ "$probe" = 1 ]; then
    # Accelerator probe: reaching userspace is the whole test.
    echo "QMOTION-PROBE-OK" > /dev/ttyS0
    poweroff -f
fi

hostname "$hostname"
# Dependency order matters: modinfo is not available to resolve it at run time.
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
         failover net_failover virtio_net virtio_blk evdev button; do
    insmod /lib/qm/$m.ko 2>/dev/null
done

ip link set lo up
if [ -n "$ip" ]; then
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
    # Announce the address when the link comes up (gratuitous ARP): an address freed by a
    # deleted VM comes back with a new MAC, and peers holding the old one would otherwise
    # wait out their neighbour timeouts (tens of seconds) before reaching this guest.
    echo 1 > /proc/sys/net/ipv4/conf/all/arp_notify
    ip addr add "$ip" dev eth0
    ip link set eth0 up
fi

# virtio-blk devices are probed asynchronously; wait for the disk if the PCI bus has one.
if grep -qsE '0x1001|0x1042' /sys/bus/pci/devices/*/device; then
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
fi

/bin/qmguest echo "$echo" &
/bin/qmguest mem "$fill" "$dirty" "$memport" "$check" "$hot" &
[ -b /dev/vda ] && /bin/qmguest disk /dev/vda "$disk_rate" "$diskport" "$disk_bulk" &
/bin/qmguest powerbtn &
[ "$cpu" != 0 ] && /bin/qmguest cpu "$cpu" &

mac=$(cat /sys/class/net/eth0/address 2>/dev/null)
echo "QMOTION-READY host=$hostname ip=$ip mac=$mac fill_mib=$fill dirty_mib_s=$dirty hot_mib=$hot" > /dev/console

while :; do
    wait
    sleep 3600
done
