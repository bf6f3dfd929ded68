#!/usr/bin/env bash
# Benchmark publishing in one run: `mkappliance compress` against `gzip -6` on the same
# image, and `mkappliance upload` against `aws s3 cp --recursive` of the same directory to
# one local moto S3 server on 127.0.0.1.
# Usage: bench/publish.sh ISO  (run by `just bench`, which builds the ISO and a release binary)
set -euo pipefail
iso=$1
bin=${MKAPPLIANCE_BIN:-target/x86_64-unknown-linux-gnu/release/mkappliance}
runs=${BENCH_RUNS:-5}
work=$(mktemp -d)
moto_pid=
cleanup() {
    if [ -n "$moto_pid" ]; then kill "$moto_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
export SOURCE_DATE_EPOCH=1765929600

"$bin" build v1.11.6 bench 00:11:22:33:44:55 --quiet --iso "$iso" \
    --config examples/controlplane.yaml --out-dir "$work/img"
img=$work/img/bootstrap-pxe.raw
cat "$img" > /dev/null  # both compressors start from a cached image

hyperfine --style basic --warmup 1 --runs "$runs" --export-json "$work/compress.json" \
    -n mkappliance "$bin compress --quiet --no-sums $img" \
    -n "gzip -6" "gzip -6 -c $img > $work/gzip.gz" >&2
"$bin" compress --quiet --no-sums "$img"
peak_kib=$( { /usr/bin/time -f '%M' "$bin" compress --quiet --no-sums "$img"; } 2>&1 | tail -1)

# A private moto server on a free loopback port.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$port" > "$work/moto.log" 2>&1 &
moto_pid=$!
ep=http://127.0.0.1:$port
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break
    sleep 0.1
done
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
aws --endpoint-url "$ep" s3api create-bucket --bucket bench > /dev/null
up=$work/up/bench
mkdir -p "$up"
cp "$img" "$up/"
hyperfine --style basic --warmup 1 --runs "$runs" --export-json "$work/upload.json" \
    -n mkappliance "$bin upload --quiet $up --bucket bench --endpoint $ep" \
    -n "mkappliance --no-verify" "$bin upload --quiet --no-verify $up --bucket bench --endpoint $ep --prefix nv" \
    -n "aws s3 cp" "aws --endpoint-url $ep s3 cp --recursive --only-show-errors $up s3://bench/aws/" >&2

python3 - "$work/compress.json" "$work/upload.json" "$(stat -c %s "$img")" \
    "$(stat -c %s "$img.gz")" "$(stat -c %s "$work/gzip.gz")" "$peak_kib" <<'PY'
import json, sys
def medians(path):
    return {r["command"]: r["median"] for r in json.load(open(path))["results"]}
c, u = medians(sys.argv[1]), medians(sys.argv[2])
raw, ours, gz, peak = map(int, sys.argv[3:])
mib = 1 << 20
print(f"image                        {raw / mib:8.1f} MiB")
print(f"mkappliance compress (gzip)  {c['mkappliance'] * 1000:8.0f} ms  -> {ours / mib:6.1f} MiB ({100 * ours / raw:.1f}%)")
print(f"gzip -6                      {c['gzip -6'] * 1000:8.0f} ms  -> {gz / mib:6.1f} MiB ({100 * gz / raw:.1f}%)")
print(f"speed-up over gzip -6        {c['gzip -6'] / c['mkappliance']:8.2f} x    target >= 1.5 x")
print(f"size vs gzip -6              {100 * (ours - gz) / gz:+8.2f} %    target within 5 %")
print(f"compress peak RSS            {peak / 1024:8.1f} MiB")
for name in ["mkappliance", "mkappliance --no-verify", "aws s3 cp"]:
    print(f"upload {name:23s}{u[name] * 1000:8.0f} ms  {raw / mib / u[name]:7.1f} MiB/s")
print(f"upload (verified) vs aws     {u['aws s3 cp'] / u['mkappliance']:8.2f} x    target >= 1 x")
PY
