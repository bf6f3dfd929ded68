#!/usr/bin/env python3
"""The measuring half of bench/serve.sh: alternate every measurement between
`mkappliance serve` (namespaces TAG-ours-*, TAG-img-*) and dnsmasq/nginx (TAG-ref-*),
run by run, so load from elsewhere on the machine hits both alike; report medians.
The order rotates each round (no server always runs first or after the same one), and
HTTP ratios are the median of per-round ratios with a bootstrap 95% interval: on a
shared 2-core machine a 15-run median alone moves by ±30% between invocations."""
import argparse
import os
import random
import statistics
import subprocess
import time

p = argparse.ArgumentParser()
p.add_argument("--tag", required=True)
p.add_argument("--mac", required=True)
p.add_argument("--runs", type=int, default=15)
p.add_argument("--http-runs", type=int, default=60)
p.add_argument("--small", type=int, required=True)
p.add_argument("--rss-pids", nargs=2, type=int, required=True)
a = p.parse_args()
HERE = os.path.dirname(os.path.abspath(__file__))
BIG = "http://10.10.10.2/talos/bench/big90.bin"


def client(name):
    return ["ip", "netns", "exec", f"{a.tag}-{name}-c"]


def timed(cmd):
    """Seconds cmd took: its own figure if it prints one (curl -w %{time_total}: the
    transfer without the ~5 ms of starting ip and curl), else wall time."""
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    wall = time.perf_counter() - t
    try:
        return float(out)
    except ValueError:
        return wall


def load1():
    return float(open("/proc/loadavg").read().split()[0])


def compare(names, make, runs=None, raw=None):
    """Median seconds of make(name) for each name, alternating run by run in an order
    that rotates each round (1 warm-up round). `raw` collects the per-round times and
    the 1-minute load average seen after each round."""
    runs = runs or a.runs
    times = {n: [] for n in names}
    loads = []
    for run in range(runs + 1):
        k = run % len(names)
        for n in names[k:] + names[:k]:
            t = timed(make(n))
            if run:
                times[n].append(t)
        loads.append(load1())
    if raw is not None:
        raw.update(times=times, loads=loads)
    return {n: statistics.median(v) for n, v in times.items()}


def paired(times, ours, ref):
    """Median of per-round ratios ref time / ours time (> 1: ours faster), with a
    bootstrap 95% interval."""
    r = [t_ref / t_ours for t_ours, t_ref in zip(times[ours], times[ref])]
    rng = random.Random(1)
    boot = sorted(statistics.median(rng.choices(r, k=len(r))) for _ in range(2000))
    return f"{statistics.median(r):4.2f} [{boot[50]:4.2f}, {boot[1949]:4.2f}]"


def eight(n):
    curls = " & ".join(f"curl -s -o /dev/null {BIG}" for _ in range(8))
    return client(n) + ["bash", "-c", f"{curls} & wait"]


MB = 1e6
print(f"HTTP, 90 MB file, MB/s (median of {a.http_runs}; higher is better; 1 client: curl's time_total,"
      " 8: wall time; serve/nginx: median of per-round ratios [95% interval])")
one = lambda n: client(n) + ["curl", "-s", "-o", "/dev/null", "-w", "%{time_total}", BIG]  # noqa: E731
for clients, make in [(1, one), (8, eight)]:
    raw = {}
    t = compare(["ours", "img", "ref"], make, a.http_runs, raw)
    rate = {n: 90 * MB * clients / t[n] / MB for n in t}
    print(f"  {clients} client{'s' if clients > 1 else ' '}: serve --root {rate['ours']:6.0f}   serve --image {rate['img']:6.0f}"
          f"   nginx {rate['ref']:6.0f}   serve/nginx {paired(raw['times'], 'ours', 'ref')}"
          f" (--image {paired(raw['times'], 'img', 'ref')})   target >= 1"
          f"   load {min(raw['loads']):.1f}-{max(raw['loads']):.1f}")

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
