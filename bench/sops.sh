#!/usr/bin/env bash
# Benchmark `mkappliance decrypt` against `sops -d` on the same ~100 KB SOPS-encrypted
# Talos config (a multi-document stream with inline manifests), in one hyperfine run.
# Usage: bench/sops.sh  (run by `just bench`; MKAPPLIANCE_BIN picks the binary)
set -euo pipefail
bin=${MKAPPLIANCE_BIN:-target/x86_64-unknown-linux-gnu/release/mkappliance}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

age-keygen -o "$work/key.txt" 2>/dev/null
recipient=$(sed -n 's/^# public key: //p' "$work/key.txt")
export SOPS_AGE_KEY_FILE="$work/key.txt"

# A controlplane config grown to ~100 KB with inline manifests (multi-line literals).
python3 - "$work/controlplane.yaml" <<'PY'
import sys
head = open("examples/controlplane.yaml").read().split("---\n")
cfg = head[0].rstrip("\n") + "\n  inlineManifests:\n"
i = 0
while len(cfg) < 102_400:
    cfg += f"""    - name: app-{i}
      contents: |
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: app-{i}
          namespace: apps
        data:
          replicas: "{i % 5 + 1}"
          endpoint: https://app-{i}.apps.svc.cluster.local:{8000 + i}
          token: {i:08x}-0b1c-4d2e-8f3a-5b6c7d8e9f0a
"""
    i += 1
open(sys.argv[1], "w").write(cfg + "---\n" + head[1])
PY
sops --encrypt --age "$recipient" "$work/controlplane.yaml" > "$work/enc.yaml"
plain_kb=$(( $(stat -c %s "$work/controlplane.yaml") / 1024 ))
enc_kb=$(( $(stat -c %s "$work/enc.yaml") / 1024 ))

# Same plaintext as sops, byte for byte, before timing anything.
cmp <("$bin" decrypt "$work/enc.yaml") <(sops -d "$work/enc.yaml")

hyperfine --style basic --warmup 3 --runs 20 --export-json "$work/h.json" \
    -n mkappliance "$bin decrypt $work/enc.yaml" \
    -n sops "sops -d $work/enc.yaml" >&2

python3 - "$work/h.json" "$plain_kb" "$enc_kb" <<'PY'
import json, sys
t = {r["command"]: r for r in json.load(open(sys.argv[1]))["results"]}
m, s = t["mkappliance"]["median"], t["sops"]["median"]
print(f"config                     {sys.argv[2]} KB plaintext, {sys.argv[3]} KB encrypted")
print(f"mkappliance decrypt median {m * 1000:7.1f} ms   target < 50 ms")
print(f"sops -d median             {s * 1000:7.1f} ms")
print(f"sops / mkappliance         {s / m:7.1f} x")
PY
