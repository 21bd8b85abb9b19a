#!/usr/bin/env python3
"""Alternating wall-time harness: docs/performance.md's measurements of short commands.

    scripts/alt.py N 'cmd|arg|...' 'cmd|arg|...' ...

Starts each command with posix_spawn (standard output and error to /dev/null) and waits for
it, the commands in turn, N rounds; prints each one's mean, p50 and p90 wall time in ms and
its ratio to the first command's (mean and p50), and its mean CPU time (user + system, its
children included, from wait4), with the load average before and after. A command
that exits non-zero stops the run: a failing command is not a fast one.
"""

import os
import sys
import time


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    rounds = int(sys.argv[1])
    cmds = [c.split("|") for c in sys.argv[2:]]
    devnull = os.open(os.devnull, os.O_WRONLY)
    actions = [
        (os.POSIX_SPAWN_DUP2, devnull, 1),
        (os.POSIX_SPAWN_DUP2, devnull, 2),
    ]
    env = dict(os.environ)
    times = [[] for _ in cmds]
    cpu = [0.0 for _ in cmds]
    print(f"load average before: {loadavg()}", flush=True)
    for _ in range(rounds):
        for i, argv in enumerate(cmds):
            t = time.perf_counter_ns()
            pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions)
            _, status, usage = os.wait4(pid, 0)
            times[i].append(time.perf_counter_ns() - t)
            cpu[i] += usage.ru_utime + usage.ru_stime
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"{' '.join(argv)} failed: status {status}")
    print(f"load average after:  {loadavg()}")

    def stats(v):
        s = sorted(v)
        return (sum(s) / len(s) / 1e6, s[len(s) // 2] / 1e6, s[len(s) * 9 // 10] / 1e6)

    ref = stats(times[0])
    print(f"{rounds} rounds, alternating; ratios to the first command")
    for argv, v, c in zip(cmds, times, cpu):
        mean, p50, p90 = stats(v)
        print(
            f"  mean {mean:6.2f}  p50 {p50:6.2f}  p90 {p90:6.2f} ms"
            f"  ({mean / ref[0]:.2f}x mean, {p50 / ref[1]:.2f}x p50)"
            f"  cpu {c / rounds * 1e3:5.2f} ms  {' '.join(argv)}"
        )


if __name__ == "__main__":
    main()
