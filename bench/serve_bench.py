#!/usr/bin/env python3
"""The measuring half of bench/serve.sh: alternate every measurement between
`mkappliance serve` (namespaces TAG-ours-*, TAG-img-*) and dnsmasq/nginx (TAG-ref-*),
run by run, so load from elsewhere on the machine hits both alike; report medians."""
import argparse
import os
import statistics
import subprocess
import time

p = argparse.ArgumentParser()
p.add_argument("--tag", required=True)
p.add_argument("--mac", required=True)
p.add_argument("--runs", type=int, default=15)
p.add_argument("--small", type=int, required=True)
p.add_argument("--rss-pids", nargs=2, type=int, required=True)
a = p.parse_args()
HERE = os.path.dirname(os.path.abspath(__file__))
BIG = "http://10.10.10.2/talos/bench/big90.bin"


def client(name):
    return ["ip", "netns", "exec", f"{a.tag}-{name}-c"]


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def compare(names, make):
    """Median seconds of make(name) for each name, alternating run by run (1 warm-up)."""
    times = {n: [] for n in names}
    for run in range(a.runs + 1):
        for n in names:
            t = timed(make(n))
            if run:
                times[n].append(t)
    return {n: statistics.median(v) for n, v in times.items()}


def eight(n):
    curls = " & ".join(f"curl -s -o /dev/null {BIG}" for _ in range(8))
    return client(n) + ["bash", "-c", f"{curls} & wait"]


MB = 1e6
print(f"HTTP, 90 MB file, MB/s (median of {a.runs}; higher is better)")
for clients, make in [(1, lambda n: client(n) + ["curl", "-s", "-o", "/dev/null", BIG]), (8, eight)]:
    t = compare(["ours", "img", "ref"], make)
    rate = {n: 90 * MB * clients / t[n] / MB for n in t}
    print(f"  {clients} client{'s' if clients > 1 else ' '}: serve --root {rate['ours']:6.0f}   serve --image {rate['img']:6.0f}"
          f"   nginx {rate['ref']:6.0f}   serve/nginx {rate['ours'] / rate['ref']:4.2f} (--image {rate['img'] / rate['ref']:4.2f})   target >= 1")

print(f"TFTP, ms (median of {a.runs}; lower is better)")
for name, path, size in [(f"{a.small / MB:.2f} MB ipxe.efi", "ipxe.efi", a.small), ("20 MB", "f20.bin", 20 * MB)]:
    for b in (512, 1468):
        t = compare(["ours", "ref"], lambda n: client(n) + ["curl", "-s", "--tftp-blksize", str(b), "-o", "/dev/null", f"tftp://10.10.10.2/{path}"])
        print(f"  curl  {name:16s} blksize {b:4d}:            serve {t['ours'] * 1e3:7.1f}   dnsmasq {t['ref'] * 1e3:7.1f}   dnsmasq/serve {t['ref'] / t['ours']:4.2f}   target >= 1")
for w in (1, 8, 16, 64):
    t = compare(["ours", "ref"], lambda n: client(n) + ["atftp", "--option", "blksize 1468", "--option", f"windowsize {w}", "-g", "-r", "f20.bin", "-l", "/dev/null", "10.10.10.2"])
    target = "   target >= 3 (dnsmasq has no windowsize: lock-step)" if w > 1 else ""
    print(f"  atftp 20 MB blksize 1468 windowsize {w:2d}: serve {t['ours'] * 1e3:7.1f}   dnsmasq {t['ref'] * 1e3:7.1f}   dnsmasq/serve {t['ref'] / t['ours']:4.2f}{target}")

print("DHCP DISCOVER→ACK, µs (3 × 300 exchanges each, alternating; median and p90)")
res = {"ours": [], "ref": []}
for _ in range(3):
    for n in res:
        out = subprocess.run(client(n) + ["python3", f"{HERE}/dhcp_latency.py", "eth0", a.mac, "300"],
                             check=True, capture_output=True, text=True).stdout.split()
        res[n].append((float(out[0]), float(out[1])))
med = {n: (statistics.median(x for x, _ in v), statistics.median(y for _, y in v)) for n, v in res.items()}
print(f"  serve {med['ours'][0]:5.0f} / {med['ours'][1]:5.0f}   dnsmasq {med['ref'][0]:5.0f} / {med['ref'][1]:5.0f}"
      f"   serve - dnsmasq {med['ours'][0] - med['ref'][0]:+.0f} µs   target within +1000")


def hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


r, i = (hwm(x) for x in a.rss_pids)
print(f"Peak RSS after all of the above: serve --root {r:.1f} MiB, serve --image {i:.1f} MiB   target < 32 MiB")
