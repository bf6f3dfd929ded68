#!/usr/bin/env bash
# Boot time of the appliance vs a dnsmasq + busybox httpd appliance booted the same way
# (issue 5/6 baseline), under QEMU TCG with OVMF, alternating runs in one session.
#
# The baseline is our own image with appliance.img swapped (mcopy) for an initramfs whose
# /init is a busybox script: same firmware, same systemd-boot entry, same kernel, same
# modules, same rootfs. It mounts the rootfs, starts the real dnsmasq on the rendered
# /etc/appliance/dnsmasq.conf (DHCP + TFTP) and busybox httpd on /srv/http, and prints its
# ready line once ports 67, 69 and 80 are listening, as our init does.
#
# Usage: bench/boot.sh ISO [RUNS]   (run by `just bench`; MKAPPLIANCE_BIN picks the binary)
set -euo pipefail
iso=$1
runs=${2:-5}
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin=${MKAPPLIANCE_BIN:-$repo/target/x86_64-unknown-linux-gnu/release/mkappliance}
cache="${MKAPPLIANCE_FIXTURE_CACHE:-$repo/.fixtures}"
busybox="$cache/debian/busybox-static/bin/busybox"
[ -x "$busybox" ] || { echo "no static busybox in $cache: build the fixture ISO first" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export SOURCE_DATE_EPOCH=1765929600
pxe_mac=52:54:00:b0:00:02

"$bin" build v1.11.6 bench 00:11:22:33:44:55 --quiet --iso "$iso" \
    --config "$repo/examples/controlplane.yaml" --internal-mac "$pxe_mac" --out-dir "$work/ours"
ours="$work/ours/bootstrap-pxe.raw"
esp_off=$(( $(sgdisk -i1 "$ours" | sed -n 's/^First sector: \([0-9]*\).*/\1/p') * 512 ))
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
cat >"$work/base/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev; mount -t proc proc /proc; mount -t sysfs sys /sys
for m in $(cat /etc/modules.order); do insmod "$m" 2>/dev/null; done
while [ ! -b /dev/vda2 ]; do sleep 0.05; done
mount -t ext4 /dev/vda2 /sysroot && mount --bind /sysroot/srv /srv
ip link set lo up; ip link set eth0 up; ip addr add 10.10.10.2/24 dev eth0
mkdir -p /var/lib/misc
dnsmasq -C /sysroot/etc/appliance/dnsmasq.conf --user=root --group=root --pid-file=/dnsmasq.pid
httpd -p 10.10.10.2:80 -h /srv/http
listening() { grep -q ":$1 " /proc/net/"$2"; }
until listening 0043 udp && listening 0045 udp && listening 0050 tcp; do sleep 0.01; done
echo "BASELINE-READY uptime_ms=$(awk '{printf "%d", $1 * 1000}' /proc/uptime)" >/dev/ttyS0
exec sleep 100000
EOF
chmod 0755 "$work/base/init"
(cd "$work/base" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --quiet) | zstd -q -3 >"$work/base.img"
cp --sparse=always "$ours" "$work/baseline.raw"
mcopy -o -i "$work/baseline.raw@@$esp_off" "$work/base.img" ::/appliance.img

python3 - "$ours" "$work/baseline.raw" "$runs" "$pxe_mac" "$work" <<'PY'
import os, re, shutil, statistics, subprocess, sys, time
ours, base, runs, mac, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]

def boot(image, marker):
    vars_fd = os.path.join(work, "vars.fd")
    shutil.copy("/usr/share/OVMF/OVMF_VARS_4M.fd", vars_fd)
    log = os.path.join(work, "serial.log")
    open(log, "w").close()
    t0 = time.monotonic()
    vm = subprocess.Popen([
        "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", "512",
        "-display", "none", "-no-reboot", "-serial", f"file:{log}",
        "-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        "-drive", f"if=pflash,format=raw,file={vars_fd}",
        "-drive", f"file={image},if=virtio,format=raw,snapshot=on",
        "-netdev", "hubport,id=pxe,hubid=0", "-device", f"virtio-net-pci,netdev=pxe,mac={mac}",
    ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - t0 < 180:
            text = open(log, errors="replace").read()
            m = re.search(marker + r".*uptime_ms=(\d+)", text)
            if m:
                return time.monotonic() - t0, int(m.group(1)) / 1000
            time.sleep(0.02)
        raise SystemExit(f"{image}: no {marker} in 180 s:\n{text[-2000:]}")
    finally:
        vm.kill()
        vm.wait()

res = {"mkappliance": [], "baseline": []}
for _ in range(runs):
    res["mkappliance"].append(boot(ours, "MKAPPLIANCE-READY"))
    res["baseline"].append(boot(base, "BASELINE-READY"))
med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in res.items()}
(ow, ok), (bw, bk) = med["mkappliance"], med["baseline"]
print(f"runs each                      {runs} (alternating)")
print(f"QEMU start -> ready (median)   mkappliance {ow:5.2f} s   baseline {bw:5.2f} s   ratio {ow / bw:.2f} (target <= 0.85)")
print(f"kernel uptime at ready         mkappliance {ok:5.2f} s   baseline {bk:5.2f} s   ratio {ok / bk:.2f} (target <= 0.70)")
print(f"appliance.img                  mkappliance {os.path.getsize(os.path.join(work, 'ours.img')) / 2**20:.1f} MiB   baseline {os.path.getsize(os.path.join(work, 'base.img')) / 2**20:.1f} MiB")
PY
