"""Deliver a stop signal to the training processes of one launch, or wait for them to exit (scripts/slurm/).

Why not just `kill` the launcher or its process group: accelerate's single-process launcher neither handles nor
forwards SIGTERM/SIGUSR1 (USR1's default action kills it and leaves the training process running, never told),
and torchrun starts its workers in their own sessions. So the launcher is started with RESUMABLE_LAUNCH_TAG=<tag>
in its environment, which every process below it inherits, and the targets are found by scanning /proc:

- tagged, but not the launcher (the top tagged process: its parent is untagged);
- not a fork of its parent (same command line: DataLoader workers), and not started by a process below the
  launcher that handles the signal itself (a training process's W&B service would die of it and take the run's
  records with it): those are not the ones that save;
- handles the signal already (SigCgt): a process still importing would lose it (USR1 is ignored until then,
  see launch.sh) or die of it (TERM), so the signal waits until the training script has installed its handler.
  One process suffices under DDP: the ranks agree on the stop through the per-step all-reduce.

Usage: signal_training.py send TAG SIGNAL --while PID    (gives up once PID is gone; PID = the calling shell)
       signal_training.py wait TAG [--timeout SECONDS]   (until no process of the launch is left)
Standard library only: it must run before and after the training environment exists.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

TAG_VAR = "RESUMABLE_LAUNCH_TAG"
POLL = 0.05  # seconds; 1 s after the first 10 s (a run that never handles the signal costs next to nothing)


def _read(pid: str, name: str) -> bytes:
    return (Path("/proc") / pid / name).read_bytes()


def launch_processes(tag: str) -> dict[int, dict]:
    """Live (non-zombie) processes carrying the tag: pid -> parent, caught-signal mask, command line."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle not in _read(pid, "environ").split(b"\0"):
                continue
            status = dict(line.split(":", 1) for line in _read(pid, "status").decode().splitlines() if ":" in line)
            if status["State"].split()[0] == "Z":
                continue
            found[int(pid)] = {
                "ppid": int(status["PPid"]),
                "caught": int(status["SigCgt"], 16),
                "cmdline": _read(pid, "cmdline"),
            }
        except (OSError, KeyError, ValueError):  # gone meanwhile, or not ours to read
            continue
    return found


def targets(tag: str, signum: int) -> list[int]:
    procs = launch_processes(tag)
    out = []
    for pid, p in procs.items():
        parent = procs.get(p["ppid"])
        if parent is None or parent["cmdline"] == p["cmdline"] or not p["caught"] >> (signum - 1) & 1:
            continue  # the launcher itself, a fork of its parent (a DataLoader worker), or deaf to the signal
        ancestor = parent
        while ancestor is not None and ancestor["ppid"] in procs:  # below the launcher (wrappers like `uv run`)
            if ancestor["caught"] >> (signum - 1) & 1:
                break  # started by a training process (W&B's service): the training process gets it instead
            ancestor = procs.get(ancestor["ppid"])
        else:
            out.append(pid)
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        return _read(str(pid), "stat").rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def send(tag: str, sig: signal.Signals, while_pid: int) -> int:
    waited_since = time.monotonic()
    while alive(while_pid):
        pids = targets(tag, sig)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        if pids:
            waited = time.monotonic() - waited_since
            print(f"[signal_training] {sig.name} -> training process(es) {pids} after {waited:.1f}s", file=sys.stderr)
            return 0
        time.sleep(POLL if time.monotonic() - waited_since < 10 else 1.0)
    print(f"[signal_training] {sig.name} not delivered: no training process handles it", file=sys.stderr)
    return 1


def wait(tag: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (procs := launch_processes(tag)) and time.monotonic() < deadline:
        time.sleep(POLL)
    if procs:
        print(f"[signal_training] still running after {timeout:.0f}s: {sorted(procs)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_send = sub.add_parser("send")
    p_send.add_argument("tag")
    p_send.add_argument("signal", help="USR1, SIGTERM, ...")
    p_send.add_argument("--while", dest="while_pid", type=int, required=True)
    p_wait = sub.add_parser("wait")
    p_wait.add_argument("tag")
    p_wait.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.command == "wait":
        return wait(args.tag, args.timeout)
    name = args.signal.upper()
    return send(args.tag, signal.Signals[name if name.startswith("SIG") else "SIG" + name], args.while_pid)


if __name__ == "__main__":
    sys.exit(main())
