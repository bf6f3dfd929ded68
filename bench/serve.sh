#!/usr/bin/env bash
# Benchmark `mkappliance serve` against dnsmasq (DHCP, TFTP) and nginx (HTTP) on the same
# files, side by side in one run. Each server gets its own pair of network namespaces
# joined by a veth (traffic never leaves them); all run at once, and the driver
# alternates between them run by run so that load on the machine hits both alike.
# Needs root, curl, atftp, dnsmasq, nginx, python3.
# Usage: bench/serve.sh ISO  (run by `just bench`, which builds the ISO and a release binary)
# BENCH_RUNS (15) sets the runs per TFTP measurement, BENCH_HTTP_RUNS (60) per HTTP one.
set -euo pipefail
[ "$(id -u)" = 0 ] || exec sudo -E "$0" "$@"  # network namespaces and ports 67/69/80
iso=$1
bin=$(realpath "${MKAPPLIANCE_BIN:-target/x86_64-unknown-linux-gnu/release/mkappliance}")
here=$(cd "$(dirname "$0")" && pwd)
mac=00:11:22:33:44:55
tag=mkb$$
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in ours img ref; do
        ip netns del "$tag-$n-s" 2>/dev/null || true
        ip netns del "$tag-$n-c" 2>/dev/null || true
    done
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
tree=$work/root
mkdir "$tree"
debugfs -R "rdump / $tree" "$img?offset=$off" 2>/dev/null
# Warm the cache, and write back the ~0.5 GB just written so the flusher does not run
# during the first measurements. The tree's pages sit in 4 KiB folios (debugfs writes 4 KiB
# at a time), as on the appliance, whose kernel reads ext4 files into 4 KiB folios (large
# ones only from Linux 6.16); the image's sit in large folios, hence --image's lead.
cat "$img" "$tree"/srv/http/talos/bench/big90.bin "$tree"/srv/tftp/* > /dev/null
sync

for n in ours img ref; do
    s=$tag-$n-s c=$tag-$n-c
    ip netns add "$s"; ip netns add "$c"
    ip link add pxe0 netns "$s" type veth peer name eth0 netns "$c"
    ip -n "$s" link set lo up; ip -n "$c" link set lo up
    ip -n "$s" link set pxe0 up
    ip -n "$c" link set eth0 address "$mac"; ip -n "$c" link set eth0 up
    ip -n "$c" addr add 10.10.10.100/24 dev eth0
done
ip -n "$tag-ref-s" addr add 10.10.10.2/24 dev pxe0

started() { # log, needle: wait until the last started server prints needle
    until grep -q -- "$2" "$1" 2>/dev/null; do
        kill -0 "${pids[-1]}" 2>/dev/null || { cat "$1" >&2; exit 1; }
        sleep 0.2
    done
}
# Each server runs in a session of its own, as a daemon does (nginx and dnsmasq call
# setsid when they daemonize; `daemon off`/-k keep them in ours): with the kernel's
# autogroup scheduling, a server in the clients' session splits one CPU share with them,
# which cost `serve` (not nginx) ≈ 5 % on HTTP, cause unidentified (BENCHMARKS.md).
# (`setsid` and `ip netns exec` exec, so $! is the server itself.)
setsid ip netns exec "$tag-ours-s" "$bin" serve --root "$tree" --interface pxe0 \
    --state-dir "$work/state" --log-dir "$work/log" 2> "$work/serve.log" & pids+=($!)
ours=$!
setsid ip netns exec "$tag-img-s" "$bin" serve --image "$img" --interface pxe0 \
    --state-dir "$work/state2" --log-dir "$work/log2" 2> "$work/serve2.log" & pids+=($!)
imgpid=$!
# The references on the rendered configs, their roots pointed at the unpacked tree.
sed "s|^tftp-root=.*|tftp-root=$tree/srv/tftp|" "$tree/etc/appliance/dnsmasq.conf" > "$work/dnsmasq.conf"
setsid ip netns exec "$tag-ref-s" dnsmasq -k -C "$work/dnsmasq.conf" --port=0 --user=root \
    --log-facility="$work/dnsmasq.log" --dhcp-leasefile="$work/leases" \
    --pid-file="$work/dnsmasq.pid" & pids+=($!)
started "$work/dnsmasq.log" "TFTP root"
sed -e "s|root /srv/http;|root $tree/srv/http;|" -e "s|root /srv/tftp;|root $tree/srv/tftp;|" \
    -e "s|^pid .*|pid $work/nginx.pid;|" -e "s|access_log /dev/stdout;|access_log $work/access.log;|" \
    -e "s|^http {|http {\n    client_body_temp_path $work/nginx/body;\n    proxy_temp_path $work/nginx/proxy;\n    fastcgi_temp_path $work/nginx/fastcgi;\n    uwsgi_temp_path $work/nginx/uwsgi;\n    scgi_temp_path $work/nginx/scgi;|" \
    "$tree/etc/appliance/nginx.conf" | sed '1i user root;' > "$work/nginx.conf"
mkdir -p "$work/nginx"  # its temp dirs: nginx chowns them to its user, so keep them ours
setsid ip netns exec "$tag-ref-s" nginx -c "$work/nginx.conf" -g 'daemon off;' 2> "$work/nginx.err" & pids+=($!)
until ip netns exec "$tag-ref-c" curl -s -o /dev/null http://10.10.10.2/boot.ipxe; do
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$work/nginx.err" >&2; exit 1; }
    sleep 0.2
done
started "$work/serve.log" dhcp-guard-clear
started "$work/serve2.log" " ready "

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 "$here/serve_bench.py" --tag "$tag" --mac "$mac" --runs "${BENCH_RUNS:-15}" \
    --http-runs "${BENCH_HTTP_RUNS:-60}" \
    --small "$(stat -c %s "$tree/srv/tftp/ipxe.efi")" --rss-pids "$ours" "$imgpid"
