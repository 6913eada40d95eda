"""Run one benchmark server: ``server.py --impl {ours,stdlib,twisted} --scenario NAME``.

Binds 127.0.0.1 on a free port, prints ``PORT <n>`` on stdout once listening,
and serves until killed.  When its stdin is a pipe (as ``run.py`` starts it), it
also exits as soon as that pipe reaches end of file,
so a server never outlives a driver (``run.py``) that died without cleaning up.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import threading

from scenarios import IMPLEMENTATIONS, SCENARIOS


def exit_when_stdin_closes() -> None:
    """Watchdog thread body: the driver holds our stdin; EOF means it is gone."""
    while sys.stdin.buffer.read(4096):
        pass
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, required=True)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--cpus", help="comma-separated CPUs to run on (set before any thread)")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in args.cpus.split(",")})
    handle = SCENARIOS[args.scenario].servers[args.impl]()
    if stat.S_ISFIFO(os.fstat(0).st_mode):  # started by run.py, not by hand
        threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    print(f"PORT {handle.port}", flush=True)
    handle.serve()


if __name__ == "__main__":
    main()
