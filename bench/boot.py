#!/usr/bin/env python3
"""Boot an appliance VM, then a PXE client VM against it, and time both (bench/boot.sh).

For each appliance (ours first, then the baselines), alternating, RUNS times in one session:
  1. the appliance boots (QEMU TCG, q35, OVMF, its image on virtio-blk, snapshot=on so
     every run starts from the same disk) with its PXE NIC on a private link: with
     BENCH_LINK=socket (the default) -netdev socket,listen=127.0.0.1:PORT as tests/e2e.rs
     does, with BENCH_LINK=dgram -netdev dgram over UDP on loopback;
  2. once it prints its ready line, a client boots (OVMF, no disk, the pinned MAC, an empty
     romfile= so the firmware does real PXE: DHCP, TFTP ipxe.efi, iPXE, HTTP) on the other
     end of the link;
  3. the client is timed from its QEMU start to the fixture init's FIXTURE-INIT line (its
     kernel started) and to FIXTURE-CONFIG-SHA256 (it fetched talos.config=), whose digest
     must be the served config's.
Every console line of both VMs is timestamped as it appears (polled every POLL_S), so the
stages in between can be compared too. BENCH_KEEP=DIR keeps the per-run traces there.

Usage: boot.py RUNS CLIENT_MAC CONFIG_SHA256 WORKDIR NAME=IMAGE... (ours first)
BENCH_LINK=socket|dgram picks the link; BENCH_TIMEOUT_S the per-stage limit.
"""
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
# The appliance's PXE NIC (bench/boot.sh builds the image with --internal-mac this).
APPLIANCE_MAC = "52:54:00:b0:00:02"
POLL_S = 0.01
LINK = os.environ.get("BENCH_LINK", "socket")
STAGE_TIMEOUT_S = int(os.environ.get("BENCH_TIMEOUT_S", "240"))
# The line each appliance prints once DHCP, TFTP and HTTP listen.
READY = {"mkappliance": "MKAPPLIANCE-READY"}
BASELINE_READY = "BASELINE-READY"
# ANSI escapes (OVMF and iPXE draw with them) and carriage returns, dropped from lines.
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\r")

# Client-side stages, first line containing the needle, in boot order. (OVMF prints its
# PXE lines in bursts: "Station IP address" appears with the TFTP request, not the lease.)
CLIENT_STAGES = [
    ("firmware in boot manager", "BdsDxe"),
    ("firmware PXE lease shown", "Station IP address is"),
    ("ipxe.efi downloaded (TFTP)", "NBP file downloaded successfully"),
    ("iPXE starts", "iPXE initialising devices"),
    ("boot.ipxe runs", "mkappliance: installing"),
    ("kernel starts", "FIXTURE-INIT"),
    ("client lease (udhcpc)", "FIXTURE-LEASE"),
    ("config fetched", "FIXTURE-CONFIG-SHA256"),
]
# Appliance-side stages: (name, pattern, which occurrence). Ours prints events; dnsmasq
# logs only with BENCH_DNSMASQ_LOG=1, and busybox httpd not at all.
APPLIANCE_STAGES = [
    ("DHCP offer", re.compile(r"dhcp-offer|DHCPOFFER"), 1),
    ("DHCP ack", re.compile(r"dhcp-ack|DHCPACK"), 1),
    ("iPXE's DHCP offer", re.compile(r"dhcp-offer|DHCPOFFER"), 2),
    ("iPXE's DHCP ack", re.compile(r"dhcp-ack|DHCPACK"), 2),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Console:
    """A VM's serial log file, read as it grows; each whole line gets the time it was seen."""

    def __init__(self, path):
        self.path = path
        self.pos = 0
        self.rest = b""
        self.lines = []  # (monotonic time, text)
        open(path, "w").close()

    def poll(self):
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        if not data:
            return
        self.pos += len(data)
        now = time.monotonic()
        *whole, self.rest = (self.rest + data).split(b"\n")
        for raw in whole:
            text = ESCAPES.sub("", raw.decode("utf-8", "replace")).strip()
            if text:
                self.lines.append((now, text))

    def first(self, needle, after=0.0, nth=1):
        for t, text in self.lines:
            if t >= after and (needle.search(text) if hasattr(needle, "search") else needle in text):
                nth -= 1
                if nth == 0:
                    return t, text
        return None


def qemu(work, name, log, extra):
    vars_fd = os.path.join(work, f"{name}-vars.fd")
    shutil.copy(OVMF_VARS, vars_fd)
    return subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", "512",
         "-display", "none", "-no-reboot", "-serial", f"file:{log}",
         "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
         "-drive", f"if=pflash,format=raw,file={vars_fd}", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(work, f"{name}.qemu-stderr"), "w"))


def wait_for(consoles, con, needle, deadline, what):
    while True:
        for c in consoles:
            c.poll()
        hit = con.first(needle)
        if hit:
            return hit
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: no line with {needle!r} in {STAGE_TIMEOUT_S} s (logs in {con.path})")
        time.sleep(POLL_S)


def link_args(link):
    """(appliance, client) -netdev specs for the private link between them."""
    if link == "socket":
        # What tests/e2e.rs uses: one TCP connection carries the frames. QEMU does not set
        # TCP_NODELAY on it, so a burst of frames waits for the peer's delayed ACK (~40 ms).
        port = free_port()
        return (f"socket,id=pxe,listen=127.0.0.1:{port}", f"socket,id=pxe,connect=127.0.0.1:{port}")
    if link == "dgram":
        # One UDP datagram per frame: no TCP in between.
        a, c = free_port(), free_port()
        spec = "dgram,id=pxe,local.type=inet,local.host=127.0.0.1,local.port={},remote.type=inet,remote.host=127.0.0.1,remote.port={}"
        return spec.format(a, c), spec.format(c, a)
    raise SystemExit(f"BENCH_LINK={link}: want socket or dgram")


def run(kind, image, client_mac, config_sha, work):
    a_net, c_net = link_args(LINK)
    alog, clog = os.path.join(work, "appliance.log"), os.path.join(work, "client.log")
    acon, ccon = Console(alog), Console(clog)
    vms = []
    try:
        a0 = time.monotonic()
        vms.append(qemu(work, "appliance", alog, [
            "-drive", f"file={image},if=virtio,format=raw,snapshot=on",
            "-netdev", a_net,
            "-device", f"virtio-net-pci,netdev=pxe,mac={APPLIANCE_MAC},romfile="]))
        t_ready, line = wait_for([acon], acon, READY.get(kind, BASELINE_READY), a0 + STAGE_TIMEOUT_S, f"{kind} ready")
        uptime = int(re.search(r"uptime_ms=(\d+)", line).group(1)) / 1000
        c0 = time.monotonic()
        vms.append(qemu(work, "client", clog, [
            "-netdev", c_net,
            "-device", f"virtio-net-pci,netdev=pxe,mac={client_mac},romfile="]))
        deadline = c0 + STAGE_TIMEOUT_S
        t_kernel, _ = wait_for([acon, ccon], ccon, "FIXTURE-INIT", deadline, f"{kind} client kernel")
        t_config, line = wait_for([acon, ccon], ccon, "FIXTURE-CONFIG-SHA256", deadline, f"{kind} client config")
        got = line.split()[-1]
        if got != config_sha:
            raise SystemExit(f"{kind}: the client fetched a config with sha256 {got}, served {config_sha}")
    finally:
        for vm in vms:
            vm.kill()
            vm.wait()
    stages = {}
    for name, needle in CLIENT_STAGES:
        hit = ccon.first(needle)
        stages[name] = hit[0] - c0 if hit else None
    for name, needle, nth in APPLIANCE_STAGES:
        hit = acon.first(needle, after=c0, nth=nth)
        stages["appliance: " + name] = hit[0] - c0 if hit else None
    trace = sorted([(t - c0, "A", s) for t, s in acon.lines] + [(t - c0, "C", s) for t, s in ccon.lines],
                   key=lambda e: e[0])
    return {
        "ready": t_ready - a0, "uptime": uptime,
        "kernel": t_kernel - c0, "config": t_config - c0,
        "stages": stages, "trace": trace,
    }


def main():
    runs, client_mac, config_sha, work = sys.argv[1:5]
    runs = int(runs)
    # NAME=IMAGE pairs; the first is ours, the others are compared with it.
    images = dict(arg.split("=", 1) for arg in sys.argv[5:])
    kinds = list(images)
    keep = os.environ.get("BENCH_KEEP")
    if keep:
        os.makedirs(keep, exist_ok=True)
    res = {k: [] for k in kinds}
    load = [os.getloadavg()[0]]
    for i in range(runs):
        # Alternate, and rotate who goes first each round, so load drifts hit all alike.
        order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
        for kind in order:
            r = run(kind, images[kind], client_mac, config_sha, work)
            res[kind].append(r)
            print(f"run {i + 1} {kind:12} ready {r['ready']:5.2f} s (uptime {r['uptime']:4.2f} s)  "
                  f"client kernel {r['kernel']:5.2f} s  config {r['config']:5.2f} s", flush=True)
            if keep:
                with open(os.path.join(keep, f"{LINK}-run{i + 1}-{kind}.trace"), "w") as f:
                    for t, side, text in r["trace"]:
                        f.write(f"{t:8.3f} {side} {text}\n")
            load.append(os.getloadavg()[0])

    med = {k: {m: statistics.median(r[m] for r in v) for m in ("ready", "uptime", "kernel", "config")}
           for k, v in res.items()}
    ours, others = kinds[0], kinds[1:]
    print(f"\nlink {LINK}, {runs} runs each, alternating; 1-min load average min/median/max "
          f"{min(load):.2f}/{statistics.median(load):.2f}/{max(load):.2f}")
    head = "".join(f"{k:>13}" for k in kinds) + "".join(f"{'ratio/' + k:>20}" for k in others)
    print(f"{'median (s)':34}{head}")
    for key, label in [
        ("config", "client power-on -> config fetched"),
        ("kernel", "client power-on -> kernel starts"),
        ("ready", "appliance power-on -> ready"),
        ("uptime", "kernel uptime at ready"),
    ]:
        cells = "".join(f"{med[k][key]:13.2f}" for k in kinds)
        ratios = "".join(f"{med[ours][key] / med[k][key]:20.2f}" for k in others)
        print(f"{label:34}{cells}{ratios}")
    print("\nstages, median seconds after client power-on (- = not seen on every run):")
    for name in res[ours][0]["stages"]:
        cells = ""
        for k in kinds:
            vals = [r["stages"][name] for r in res[k] if r["stages"][name] is not None]
            cells += f"{statistics.median(vals):13.2f}" if len(vals) == len(res[k]) else f"{'-':>13}"
        print(f"  {name:32}{cells}")


if __name__ == "__main__":
    main()
