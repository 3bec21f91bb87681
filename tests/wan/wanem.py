#!/usr/bin/env python3
"""A user-space WAN emulator for the test rig (this kernel has no `tc netem`).

It runs in the rig's router namespace and owns a TUN device that the router
sends every packet between node namespaces through (see scripts/wan-rig). Each
IPv4 packet is held for its link's one-way delay (half the link's RTT), plus
jitter, plus a spike when one is on, then written back to the TUN device,
from where the kernel forwards it to its destination. Packets of one
direction of a link leave in the order they came (no reordering); a link
with a rate also serialises them at that rate; `loss` drops that fraction at
random.

Node namespace i has the subnet 10.77.i.0/24; a packet's link is the pair of
node numbers of its source and destination. The config is JSON:

    {"default": {"rtt_ms": 50, "jitter_ms": 0, "loss": 0.0, "rate_mbit": 0,
                 "spike_ms": 0, "spike_every_ms": 0, "spike_len_ms": 0},
     "links": {"0-1": {"rtt_ms": 20}}}

`links` entries override the default per pair (either order); other traffic
(from the host, say) passes at once. SIGHUP re-reads the file; the emulator
writes `ready` to stdout once attached, and every half second (when they
changed) its counters of packets passed, dropped and held by a spike to
`stats.json` beside the config. Standard library only.
"""

import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

FIELDS = {
    "rtt_ms": 0.0,
    "jitter_ms": 0.0,
    "loss": 0.0,
    "rate_mbit": 0.0,
    "spike_ms": 0.0,
    "spike_every_ms": 0.0,
    "spike_len_ms": 0.0,
}


def load(path):
    with open(path) as f:
        raw = json.load(f)
    default = dict(FIELDS)
    default.update({k: float(v) for k, v in raw.get("default", {}).items() if k in FIELDS})
    links = {}
    for key, value in raw.get("links", {}).items():
        a, b = (int(x) for x in key.split("-"))
        link = dict(default)
        link.update({k: float(v) for k, v in value.items() if k in FIELDS})
        links[(min(a, b), max(a, b))] = link
    return default, links


def node_of(addr):
    """The node number of a 10.77.i.x address, else None."""
    if addr[0] == 10 and addr[1] == 77 and addr[2] < 254:
        return addr[2]
    return None


def main():
    tun_name, config_path = sys.argv[1], sys.argv[2]
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tun_name.encode(), IFF_TUN | IFF_NO_PI))
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    state = {"cfg": load(config_path), "reload": False}
    signal.signal(signal.SIGHUP, lambda *_: state.update(reload=True))
    start = time.monotonic()
    heap = []  # (release time, sequence, packet)
    last_release = {}  # direction -> time its last packet leaves
    seq = 0
    stats = {"passed": 0, "dropped": 0, "spiked": 0}
    stats_path = os.path.join(os.path.dirname(os.path.abspath(config_path)), "stats.json")
    written = None
    next_write = 0.0
    print("ready", flush=True)
    while True:
        if time.monotonic() >= next_write and written != stats:
            with open(stats_path + ".new", "w") as f:
                json.dump(stats, f)
            os.replace(stats_path + ".new", stats_path)
            written = dict(stats)
            next_write = time.monotonic() + 0.5
        if state["reload"]:
            state["reload"] = False
            try:
                state["cfg"] = load(config_path)
            except (OSError, ValueError) as e:
                print(f"config not reloaded: {e}", file=sys.stderr, flush=True)
        now = time.monotonic()
        timeout = max(0.0, heap[0][0] - now) if heap else 0.5
        try:
            readable, _, _ = select.select([fd], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        if readable:
            for _ in range(256):
                try:
                    pkt = os.read(fd, 65535)
                except BlockingIOError:
                    break
                if len(pkt) < 20 or pkt[0] >> 4 != 4:
                    continue  # not IPv4: the rig has no use for it
                src, dst = node_of(pkt[12:16]), node_of(pkt[16:20])
                default, links = state["cfg"]
                link = None
                if src is not None and dst is not None and src != dst:
                    link = links.get((min(src, dst), max(src, dst)), default)
                release = now
                if link is not None:
                    if link["loss"] > 0 and random.random() < link["loss"]:
                        stats["dropped"] += 1
                        continue
                    delay = link["rtt_ms"] / 2.0
                    if link["jitter_ms"] > 0:
                        delay += random.uniform(0, link["jitter_ms"])
                    every = link["spike_every_ms"]
                    if every > 0 and ((now - start) * 1000.0) % every < link["spike_len_ms"]:
                        delay += link["spike_ms"]
                        stats["spiked"] += 1
                    release = now + delay / 1000.0
                    direction = (src, dst)
                    if link["rate_mbit"] > 0:
                        busy = last_release.get(direction, 0.0)
                        release = max(release, busy) + len(pkt) * 8 / (link["rate_mbit"] * 1e6)
                    release = max(release, last_release.get(direction, 0.0))
                    last_release[direction] = release
                seq += 1
                heapq.heappush(heap, (release, seq, pkt))
        while heap and heap[0][0] <= now:
            _, _, pkt = heapq.heappop(heap)
            try:
                os.write(fd, pkt)
                stats["passed"] += 1
            except OSError:
                stats["dropped"] += 1


if __name__ == "__main__":
    main()
