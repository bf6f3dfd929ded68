#!/usr/bin/env python3
"""DISCOVER→OFFER→REQUEST→ACK latency of a DHCP server, from a client on IFACE.

Usage: dhcp_latency.py IFACE MAC RUNS  (run inside the client's network namespace)
Prints the median and 90th percentile of the DISCOVER-sent to ACK-received time in µs.
Packets are laid out by hand from RFC 2131 (broadcast flag set, so no ARP is involved).
"""
import socket
import statistics
import struct
import sys
import time

iface, mac, runs = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), int(sys.argv[3])
SO_BINDTODEVICE = 25


def packet(kind, xid, extra=b""):
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000,
                       bytes(4), bytes(4), bytes(4), bytes(4), mac + bytes(10), bytes(64), bytes(128))
    return head + bytes([99, 130, 83, 99, 53, 1, kind]) + extra + b"\xff"


def wait(s, xid, kind, deadline):
    while time.perf_counter() < deadline:
        try:
            data = s.recv(1500)
        except socket.timeout:
            continue
        if len(data) < 243 or data[0] != 2 or struct.unpack("!I", data[4:8])[0] != xid:
            continue
        opts, i = {}, 240
        while i + 1 < len(data) and data[i] != 255:
            if data[i] == 0:
                i += 1
                continue
            opts[data[i]] = data[i + 2:i + 2 + data[i + 1]]
            i += 2 + data[i + 1]
        if opts.get(53) == bytes([kind]):
            return data[16:20], opts.get(54)
    return None


s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, iface.encode())
s.bind(("0.0.0.0", 68))
s.settimeout(0.2)
times, lost = [], 0
for n in range(runs):
    xid = 0x4D4B0000 + n
    t0 = time.perf_counter()
    s.sendto(packet(1, xid), ("255.255.255.255", 67))
    offer = wait(s, xid, 2, t0 + 2)
    if offer is None:
        lost += 1
        continue
    yiaddr, server = offer
    s.sendto(packet(3, xid, bytes([50, 4]) + yiaddr + bytes([54, 4]) + server), ("255.255.255.255", 67))
    if wait(s, xid, 5, t0 + 2) is None:
        lost += 1
        continue
    times.append((time.perf_counter() - t0) * 1e6)
if not times:
    sys.exit("no answers")
times.sort()
print(f"{statistics.median(times):.0f} {times[int(len(times) * 0.9)]:.0f} {lost}")
