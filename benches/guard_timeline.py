#!/usr/bin/env python3
"""Where a guarded call's time goes, stage by stage: the README's table of session 12.

    benches/guard_timeline.py            # needs perf (root, or perf_event_paranoid <= 1)

Runs the benchmark's guard section once (APIE_BENCH_SCALE 0.3) under `perf record -a`, with the
scheduler's wake-ups and the reads, writes, `epoll_wait`s and `recvfrom`s of every process, then
follows each call of the `proxy + guard` way from the host reader's `read` to the answer's
`writev` to the proxy's stdout, and prints the median of every stage. Recording adds about a
microsecond per system call, so compare stages, not the total with the benchmark's figures.
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict

READ, WRITE, WRITEV, RECVFROM, EPOLL_WAIT = 0, 1, 20, 45, 232
SYSCALLS = " || ".join(f"id == {n}" for n in (READ, WRITE, WRITEV, RECVFROM, EPOLL_WAIT))
LINE = re.compile(r"^\s*(.*?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s+(.*)$")
# (stage, who, enter or exit, syscall), in the order a guarded call meets them.
STAGES = [
    ("the call handed to the runtime (eventfd)", "host", "enter", WRITE),
    ("the runtime thread wakes", "runtime", "exit", EPOLL_WAIT),
    ("the evaluate request written", "runtime", "enter", WRITEV),
    ("the guard service reads it", "guard", "exit", RECVFROM),
    ("the guard service answers", "guard", "enter", WRITEV),
    ("the runtime wakes again", "runtime", "exit", EPOLL_WAIT),
    ("it reads the response", "runtime", "exit", RECVFROM),
    ("the audit record written", "runtime", "enter", WRITE),
    ("the call forwarded", "runtime", "enter", WRITEV),
    ("the upstream reader reads the answer", "upstream", "exit", READ),
    ("the answer written to the host", "upstream", "enter", WRITEV),
]


def record(data):
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, APIE_BENCH_ONLY="guard", APIE_BENCH_ROUNDS="1", APIE_BENCH_SCALE="0.3")
    subprocess.run(["cargo", "bench", "--bench", "proxy", "--no-run"], cwd=root, check=True)
    subprocess.run(
        ["perf", "record", "-q", "-a", "-o", data, "-e", "sched:sched_wakeup",
         "-e", "raw_syscalls:sys_enter", "--filter", SYSCALLS,
         "-e", "raw_syscalls:sys_exit", "--filter", SYSCALLS, "--exclude-perf",
         "--", "cargo", "bench", "--bench", "proxy"],
        cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    text = subprocess.run(
        ["perf", "script", "-i", data, "-F", "comm,pid,tid,cpu,time,event,trace"],
        check=True, capture_output=True, text=True).stdout
    events = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            comm, pid, tid, cpu, t, name, rest = m.groups()
            events.append((float(t) * 1e6, comm, int(pid), int(tid), int(cpu), name, rest))
    return events


def syscall(event):
    m = re.match(r"NR (\d+)", event[6])
    return int(m.group(1)) if m else None


def returned(event):
    m = re.search(r"= (-?\d+)", event[6])
    return int(m.group(1)) if m else 0


def main():
    with tempfile.TemporaryDirectory() as work:
        events = record(os.path.join(work, "perf.data"))
    threads = defaultdict(dict)
    for e in events:
        threads[e[2]][e[3]] = e[1]
    proxies = sorted(pid for pid, names in threads.items() if "host reader" in names.values())

    def asks_guard(pid):
        return sum(1 for e in events if e[3] == pid and syscall(e) == RECVFROM) > 100

    guarded = [pid for pid in proxies if asks_guard(pid)]
    if not guarded:
        sys.exit("no proxy asked the guard service: was the guard section recorded?")
    pid = guarded[0]
    who = {tid: {"host reader": "host", "upstream reader": "upstream"}.get(name)
           for tid, name in threads[pid].items()}
    who[pid] = "runtime"

    calls, call = [], None
    for e in events:
        if e[2] == pid:
            role = who.get(e[3])
        elif e[1] == "guard":
            role = "guard"
        else:
            continue
        side = "exit" if e[5].endswith("sys_exit") else "enter" if e[5].endswith("sys_enter") else None
        if role == "host" and side == "exit" and syscall(e) == READ and returned(e) > 0:
            call = {"times": [e[0]], "cpus": [e[4]]}
            continue
        if call is None:
            continue
        _, want_role, want_side, want_nr = STAGES[len(call["times"]) - 1]
        if (role, side, syscall(e)) == (want_role, want_side, want_nr):
            call["times"].append(e[0])
            call["cpus"].append(e[4])
            if len(call["times"]) == len(STAGES) + 1:
                calls.append(call)
                call = None
    if not calls:
        sys.exit("no guarded call was followed from start to end")
    print(f"{len(calls)} guarded calls of proxy {pid}, p50 of each stage:")
    before = "the host reader reads the call"
    for i, (stage, *_) in enumerate(STAGES):
        gaps = [c["times"][i + 1] - c["times"][i] for c in calls]
        print(f"  {statistics.median(gaps):6.1f} µs  {before} → {stage}")
        before = stage
    total = statistics.median(c["times"][-1] - c["times"][0] for c in calls)
    print(f"  {total:6.1f} µs  in all")
    same = sum(1 for c in calls if c["cpus"][0] == c["cpus"][2])
    print(f"the runtime thread woke on the host reader's CPU in {same} of {len(calls)} calls")

    for local in proxies:
        if local in guarded:
            continue
        host = [tid for tid, name in threads[local].items() if name == "host reader"][0]
        to_audit, to_forward, start, audited = [], [], None, False
        for e in events:
            if e[3] != host:
                continue
            if e[5].endswith("sys_exit") and syscall(e) == READ and returned(e) > 0:
                start, audited = e[0], False
            elif start is not None and e[5].endswith("sys_enter"):
                if syscall(e) == WRITE and not audited:
                    to_audit.append(e[0] - start)
                    audited = True
                elif syscall(e) == WRITEV:
                    to_forward.append(e[0] - start)
                    start = None
        if to_forward:
            print(f"a local call (proxy {local}, {len(to_forward)} calls): read → audit record "
                  f"written {statistics.median(to_audit):.1f} µs, → forwarded "
                  f"{statistics.median(to_forward):.1f} µs")
        break


if __name__ == "__main__":
    main()
