#!/usr/bin/env bash
# Boot times of the appliance vs a dnsmasq + busybox httpd appliance booted the same way
# (issues 5/6 baseline), and of a PXE client booting from each, under QEMU TCG with OVMF,
# alternating runs in one session (bench/boot.py runs the VMs and times them).
#
# The baseline is our own image with appliance.img swapped (mcopy) for an initramfs whose
# /init is a busybox script: same firmware, same systemd-boot entry, same kernel, same
# modules, same rootfs. It mounts the rootfs, starts the real dnsmasq on the rendered
# /etc/appliance/dnsmasq.conf (DHCP + TFTP) and busybox httpd on /srv/http, and prints its
# ready line once ports 67, 69 and 80 are listening, as our init does. The client (OVMF,
# no disk, the pinned MAC) boots the fixture ISO's kernel and init through it, which
# prints FIXTURE-INIT and the served config's digest on its serial console.
#
# Usage: bench/boot.sh ISO [RUNS]   (run by `just bench`; MKAPPLIANCE_BIN picks the binary)
# BENCH_LINKS="socket dgram" (the default) picks the private links measured, BENCH_KEEP=DIR
# keeps per-run console traces, BENCH_DNSMASQ_LOG=1 puts dnsmasq's log on its console.
set -euo pipefail
iso=$1
runs=${2:-5}
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin=${MKAPPLIANCE_BIN:-$repo/target/x86_64-unknown-linux-gnu/release/mkappliance}
cache="${MKAPPLIANCE_FIXTURE_CACHE:-$repo/.fixtures}"
busybox="$cache/debian/busybox-static/bin/busybox"
[ -x "$busybox" ] || { echo "no static busybox in $cache: build the fixture ISO first" >&2; exit 1; }
work=$(mktemp -d)
if [ -n "${BENCH_KEEP:-}" ]; then echo "keeping $work" >&2; else trap 'rm -rf "$work"' EXIT; fi
export SOURCE_DATE_EPOCH=1765929600
pxe_mac=52:54:00:b0:00:02
client_mac=00:11:22:33:44:55
# BENCH_DNSMASQ_LOG=1: the baseline's dnsmasq logs (log-dhcp) to its serial console, for
# stage timings on the appliance side (ours always prints its events there).
dnsmasq_log=""
[ "${BENCH_DNSMASQ_LOG:-0}" = 1 ] && dnsmasq_log="--log-facility=/dev/ttyS0"

# console=ttyS0 (last on the client's kernel line) puts the fixture client init's lines
# on the client's serial console, where the harness times them.
"$bin" build v1.11.6 bench "$client_mac" --quiet --iso "$iso" \
    --config "$repo/examples/controlplane.yaml" --internal-mac "$pxe_mac" \
    --extra-kernel-args console=ttyS0 --out-dir "$work/ours"
ours="$work/ours/bootstrap-pxe.raw"
part_off() { echo $(( $(sgdisk -i"$1" "$ours" | sed -n 's/^First sector: \([0-9]*\).*/\1/p') * 512 )); }
esp_off=$(part_off 1)
config_sha=$(debugfs -R 'cat /srv/http/configs/minipc.yaml' "$ours?offset=$(part_off 2)" 2>/dev/null | sha256sum | cut -d' ' -f1)
export MTOOLS_SKIP_CHECK=1

# --- the baseline initramfs: our modules list, busybox, dnsmasq and its libraries ---------
mcopy -n -i "$ours@@$esp_off" ::/appliance.img "$work/ours.img"
mkdir -p "$work/ours-initrd" "$work/base/bin" "$work/base/etc" "$work/base/sysroot" "$work/base/srv" \
    "$work/base/proc" "$work/base/sys"
(cd "$work/ours-initrd" && zstd -dc "$work/ours.img" | cpio -id --quiet)
cp -a "$work/ours-initrd/lib" "$work/ours-initrd/dev" "$work/base/"
cp "$work/ours-initrd/etc/modules.order" "$work/base/etc/"
cp "$busybox" "$work/base/bin/busybox"
cp /usr/sbin/dnsmasq "$work/base/bin/dnsmasq"
for lib in $(ldd /usr/sbin/dnsmasq | grep -o '/[^ ]*'); do
    mkdir -p "$work/base$(dirname "$lib")"
    cp -L "$lib" "$work/base$lib"
done
printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n' >"$work/base/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\ndip:x:30:\n' >"$work/base/etc/group"
# /etc/baseline.sh (one per variant, below) adds the variant's own set-up.
cat >"$work/base/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev; mount -t proc proc /proc; mount -t sysfs sys /sys
for m in \$(cat /etc/modules.order); do insmod "\$m" 2>/dev/null; done
while [ ! -b /dev/vda2 ]; do sleep 0.05; done
mount -t ext4 /dev/vda2 /sysroot && mount --bind /sysroot/srv /srv
ip link set lo up; ip link set eth0 up; ip addr add 10.10.10.2/24 dev eth0
mkdir -p /var/lib/misc
extra=""
. /etc/baseline.sh
dnsmasq -C /sysroot/etc/appliance/dnsmasq.conf --user=root --group=root --pid-file=/dnsmasq.pid $dnsmasq_log \$extra
httpd -p 10.10.10.2:80 -h /srv/http
listening() { grep -q ":\$1 " /proc/net/"\$2"; }
until listening 0043 udp && listening 0045 udp && listening 0050 tcp; do sleep 0.01; done
echo "BASELINE-READY uptime_ms=\$(awk '{printf "%d", \$1 * 1000}' /proc/uptime)" >/dev/ttyS0
exec sleep 100000
EOF
chmod 0755 "$work/base/init"
# Two variants. "baseline": dnsmasq on the rendered dnsmasq.conf alone. "baseline-ra": the
# same plus an IPv6 router advertisement with router lifetime 0, as ours sends, which the
# rendered dnsmasq.conf cannot say (dnsmasq advertises only a prefix configured on the
# interface, and only on interfaces named by interface=, not by listen-address=). Without
# one, iPXE waits for its IPv6 configuration to time out (~15 s) before it boots.
: >"$work/baseline.sh"
printf '%s\n' 'echo 0 >/proc/sys/net/ipv6/conf/eth0/accept_dad; ip -6 addr add fd00:10:10:10::2/64 dev eth0' \
    'extra="--interface=eth0 --enable-ra --dhcp-range=fd00:10:10:10::,ra-only,64 --ra-param=eth0,60,0"' >"$work/baseline-ra.sh"
for variant in baseline baseline-ra; do
    cp "$work/$variant.sh" "$work/base/etc/baseline.sh"
    (cd "$work/base" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --quiet) | zstd -q -3 >"$work/$variant.img"
    cp --sparse=always "$ours" "$work/$variant.raw"
    mcopy -o -i "$work/$variant.raw@@$esp_off" "$work/$variant.img" ::/appliance.img
done

mib() { awk -v b="$(stat -c %s "$1")" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "appliance.img (zstd): mkappliance $(mib "$work/ours.img") MiB, baseline $(mib "$work/baseline.img") MiB"
echo "load before: $(uptime)"
# socket: one TCP connection carries the link's frames, as in tests/e2e.rs; dgram: one UDP
# datagram per frame (BENCHMARKS.md says why both).
for link in ${BENCH_LINKS:-socket dgram}; do
    echo
    echo "== link: $link"
    BENCH_LINK=$link python3 "$repo/bench/boot.py" "$runs" "$client_mac" "$config_sha" "$work" \
        mkappliance="$ours" baseline="$work/baseline.raw" baseline-ra="$work/baseline-ra.raw"
done
echo "load after: $(uptime)"
