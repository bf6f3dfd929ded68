#!/usr/bin/env bash
# Benchmark `mkappliance build` on a Talos-sized fixture ISO against `cp` of that ISO
# into the output directory (a cached copy of the ISO is the floor), in one run.
# Usage: bench/build.sh ISO  (run by `just bench`, which builds the ISO and a release binary)
set -euo pipefail
iso=$1
bin=${MKAPPLIANCE_BIN:-target/x86_64-unknown-linux-gnu/release/mkappliance}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export SOURCE_DATE_EPOCH=1765929600
args=(build v1.11.6 bench 00:11:22:33:44:55 --quiet --iso "$iso" --config examples/controlplane.yaml --out-dir "$work/out")

cat "$iso" > /dev/null  # both commands start from a cached ISO
hyperfine --style basic --warmup 2 --runs 10 --export-json "$work/h.json" \
    --prepare "rm -rf '$work/out' '$work/cp'; mkdir -p '$work/cp'" \
    -n mkappliance "$bin ${args[*]}" \
    -n cp "cp '$iso' '$work/cp/'" >&2

rm -rf "$work/out"
peak_kib=$( { /usr/bin/time -f '%M' "$bin" "${args[@]}" >/dev/null; } 2>&1 | tail -1)
img="$work/out/bootstrap-pxe.raw"
apparent=$(stat -c %s "$img")
allocated=$(( $(stat -c %b "$img") * $(stat -c %B "$img") ))
# Payload: apparent sizes of every file placed in the ESP and the rootfs, per inspect.
payload=$("$bin" inspect --json "$img" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(sum(f["size"] for f in r["esp_files"] + r["rootfs_files"] if not f["is_dir"]))')

python3 - "$work/h.json" "$peak_kib" "$apparent" "$allocated" "$payload" "$(stat -c %s "$iso")" <<'PY'
import json, sys
h = json.load(open(sys.argv[1]))
t = {r["command"]: r for r in h["results"]}
peak, apparent, allocated, payload, iso = map(int, sys.argv[2:])
m, c = t["mkappliance"]["median"], t["cp"]["median"]
mib = 1 << 20
print(f"ISO                      {iso / mib:8.1f} MiB")
print(f"build wall time (median) {m * 1000:8.0f} ms   target < 1000 ms")
print(f"cp of the ISO (median)   {c * 1000:8.0f} ms")
print(f"build / cp               {m / c:8.2f} x    target <= 6 x")
print(f"peak RSS                 {peak / 1024:8.1f} MiB   target <= 256 MiB")
print(f"payload                  {payload / mib:8.1f} MiB")
print(f"image apparent size      {apparent / mib:8.1f} MiB = payload + {(apparent - payload) / mib:.1f} MiB (target <= +128)")
print(f"image allocated size     {allocated / mib:8.1f} MiB = payload + {(allocated - payload) / mib:.1f} MiB (target <= +16)")
PY
