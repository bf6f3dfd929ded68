#!/usr/bin/env bash
# Benchmark `mkappliance serve` against dnsmasq (DHCP, TFTP) and nginx (HTTP) on the same
# files, side by side in one run, inside two network namespaces joined by a veth pair
# (traffic never leaves them). Needs root, hyperfine, curl, atftp, dnsmasq, nginx, python3.
# Usage: bench/serve.sh ISO  (run by `just bench`, which builds the ISO and a release binary)
set -euo pipefail
[ "$(id -u)" = 0 ] || exec sudo -E "$0" "$@"  # network namespaces and ports 67/69/80
iso=$1
bin=$(realpath "${MKAPPLIANCE_BIN:-target/x86_64-unknown-linux-gnu/release/mkappliance}")
here=$(cd "$(dirname "$0")" && pwd)
runs=${BENCH_RUNS:-10}
mac=00:11:22:33:44:55
S=mkbench-s$$ C=mkbench-c$$
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$S" 2>/dev/null || true
    ip netns del "$C" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The served tree: a real image (bench ISO) plus a 90 MB and a 20 MB file, unpacked with
# debugfs so nginx and dnsmasq can serve the same bytes from a directory.
mkdir -p "$work/ov/srv/http/talos/bench" "$work/ov/srv/tftp"
head -c 90000000 /dev/urandom > "$work/ov/srv/http/talos/bench/big90.bin"
head -c 20000000 /dev/urandom > "$work/ov/srv/tftp/f20.bin"
SOURCE_DATE_EPOCH=1765929600 "$bin" build v1.11.6 bench "$mac" --quiet --iso "$iso" \
    --config examples/controlplane.yaml --out-dir "$work/out" --overlay "$work/ov"
img=$work/out/bootstrap-pxe.raw
off=$(( $(sgdisk -i2 "$img" | awk '/First sector/{print $3}') * 512 ))
mkdir "$work/root"
debugfs -R "rdump / $work/root" "$img?offset=$off" 2>/dev/null
tree=$work/root
small=$(stat -c %s "$tree/srv/tftp/ipxe.efi")

ip netns add "$S"; ip netns add "$C"
ip link add pxe0 netns "$S" type veth peer name eth0 netns "$C"
for n in "$S" "$C"; do ip -n "$n" link set lo up; done
ip -n "$S" link set pxe0 up
ip -n "$C" link set eth0 address "$mac"; ip -n "$C" link set eth0 up
ip -n "$C" addr add 10.10.10.100/24 dev eth0
inS() { ip netns exec "$S" "$@"; }
inC() { ip netns exec "$C" "$@"; }
url=http://10.10.10.2/talos/bench/big90.bin

hf() { # name, command...: median seconds of the command in the client namespace
    local name=$1; shift
    hyperfine --style none --warmup 1 --runs "$runs" --export-json "$work/$name.json" \
        "ip netns exec $C $*" >/dev/null 2>&1
    python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['results'][0]['median'])" "$work/$name.json"
}
eight() { # a command line that runs 8 concurrent curls of the 90 MB file
    echo "bash -c 'for i in 1 2 3 4 5 6 7 8; do curl -s -o /dev/null $url & done; wait'"
}
measure() { # label: DHCP, TFTP and HTTP figures into $work/<label>.txt (key value)
    local label=$1 out=$work/$1.txt
    : > "$out"
    if [ "${2:-}" != nohttp ]; then
        echo "http1 $(hf "$label-h1" curl -s -o /dev/null $url)" >> "$out"
        echo "http8 $(hf "$label-h8" "$(eight)")" >> "$out"
    fi
    if [ "${2:-}" != nodhcp ]; then
        echo "dhcp $(inC python3 "$here/dhcp_latency.py" eth0 "$mac" 300)" >> "$out"
        for b in 512 1468; do
            echo "tftp_small_$b $(hf "$label-ts$b" curl -s --tftp-blksize $b -o /dev/null tftp://10.10.10.2/ipxe.efi)" >> "$out"
            echo "tftp_big_$b $(hf "$label-tb$b" curl -s --tftp-blksize $b -o /dev/null tftp://10.10.10.2/f20.bin)" >> "$out"
        done
        for w in 1 16 64; do
            echo "tftp_atftp_w$w $(hf "$label-tw$w" atftp --option "'blksize 1468'" --option "'windowsize $w'" -g -r f20.bin -l /dev/null 10.10.10.2)" >> "$out"
        done
    fi
}

# 1. mkappliance serve on the unpacked tree (as inside the appliance).
inS "$bin" serve --root "$tree" --interface pxe0 --state-dir "$work/state" --log-dir "$work/log" \
    2> "$work/serve.log" & pids+=($!)
until grep -q dhcp-guard-clear "$work/serve.log"; do sleep 0.2; done
servepid=$(pgrep -f "serve --root $tree" | head -1)
measure ours
rss=$(awk '/VmHWM/{print $2}' "/proc/$servepid/status")
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

# 2. mkappliance serve --image: the same, read straight from the image.
inS "$bin" serve --image "$img" --interface pxe0 --state-dir "$work/state2" --log-dir "$work/log2" \
    2> "$work/serve2.log" & pids+=($!)
until grep -q " ready " "$work/serve2.log"; do sleep 0.2; done
imgpid=$(pgrep -f "serve --image $img" | head -1)
measure image nodhcp
rss_img=$(awk '/VmHWM/{print $2}' "/proc/$imgpid/status")
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

# 3. dnsmasq on the rendered dnsmasq.conf (its TFTP root pointed at the tree).
sed "s|^tftp-root=.*|tftp-root=$tree/srv/tftp|" "$tree/etc/appliance/dnsmasq.conf" > "$work/dnsmasq.conf"
inS dnsmasq -k -C "$work/dnsmasq.conf" --port=0 --user=root --log-facility="$work/dnsmasq.log" \
    --dhcp-leasefile="$work/leases" --pid-file="$work/dnsmasq.pid" & pids+=($!)
sleep 1
measure dnsmasq nohttp
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

# 4. nginx on the rendered nginx.conf (roots pointed at the tree).
sed -e "s|root /srv/http;|root $tree/srv/http;|" -e "s|root /srv/tftp;|root $tree/srv/tftp;|" \
    -e "s|^pid .*|pid $work/nginx.pid;|" -e "s|access_log /dev/stdout;|access_log $work/access.log;|" \
    "$tree/etc/appliance/nginx.conf" | sed '1i user root;' > "$work/nginx.conf"
inS nginx -c "$work/nginx.conf" -g 'daemon off;' 2> "$work/nginx.err" & pids+=($!)
sleep 1
measure nginx nodhcp
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

python3 - "$work" "$rss" "$rss_img" "$small" <<'PY'
import sys
work, rss, rss_img, small = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def load(name):
    d = {}
    for line in open(f"{work}/{name}.txt"):
        k, *v = line.split()
        d[k] = [float(x) for x in v]
    return d
o, i, d, n = load("ours"), load("image"), load("dnsmasq"), load("nginx")
MB = 1e6
def mbs(bytes_, secs): return bytes_ / secs / MB
print("HTTP, 90 MB file (MB/s, higher is better)")
for k, clients in [("http1", 1), ("http8", 8)]:
    a, b, c = (mbs(90e6 * clients, x[k][0]) for x in (o, i, n))
    print(f"  {clients} client{'s' if clients > 1 else ''}: serve --root {a:8.0f}  serve --image {b:8.0f}  nginx {c:8.0f}  ratio {a / c:5.2f}  (target >= 1)")
print("TFTP (ms, lower is better; curl is lock-step)")
for size, name in [("small", f"{small / 1e6:.2f} MB ipxe.efi"), ("big", "20 MB")]:
    for b in (512, 1468):
        k = f"tftp_{size}_{b}"
        print(f"  {name:16s} blksize {b:4d}: serve {o[k][0]*1e3:7.1f}  dnsmasq {d[k][0]*1e3:7.1f}  dnsmasq/serve {d[k][0] / o[k][0]:5.2f}  (target >= 1)")
for w in (1, 16, 64):
    k = f"tftp_atftp_w{w}"
    print(f"  20 MB atftp blksize 1468 windowsize {w:2d}: serve {o[k][0]*1e3:7.1f}  dnsmasq {d[k][0]*1e3:7.1f}  dnsmasq/serve {d[k][0] / o[k][0]:5.2f}" + ("  (target >= 3)" if w > 1 else ""))
print("DHCP DISCOVER→ACK (µs, median / p90 of 300)")
print(f"  serve {o['dhcp'][0]:6.0f} / {o['dhcp'][1]:6.0f}   dnsmasq {d['dhcp'][0]:6.0f} / {d['dhcp'][1]:6.0f}   difference {o['dhcp'][0] - d['dhcp'][0]:+.0f} µs (target within 1000)")
print(f"Peak RSS while serving: serve --root {rss / 1024:.1f} MiB, serve --image {rss_img / 1024:.1f} MiB (target < 32 MiB)")
PY
