"""Start a foreground program in the background and record its pid: `daemon(8)` for the services dir.

Usage: `python daemonize.py --pidfile FILE [--log FILE] [--cwd DIR] [--ready TEXT] -- PROGRAM [ARG...]`

`ServicesDirBackend` runs this through the `CommandRunner` (so all process creation goes through
the one interface tests can fake) for services declared with `"daemon": true`. It starts the
program in its own session (so stopping it can signal the whole process group), with stdin from
/dev/null and stdout/stderr to the log file, writes the pid file atomically, and exits; the
runner's output pipes are never inherited by the long-running program, so the runner does not
wait for it. It runs as a script (by path), so it puts its own package root on `sys.path`
first: the pid file is written by the package's one atomic write.

With `--ready TEXT` (rc.d `opnsense_ha`: the agent's "listening on" line) it returns only once the
program has written TEXT to its log, and fails (killing it, removing the pid file) if it exits
first or is not ready within `--ready-timeout`: a start that reports success has a serving
program, however long its imports take on a small firewall.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hasync.core.fileio import atomic_write

# A program that dies within this time (bad arguments, port in use) is reported as a failed
# start instead of leaving a pid file for a dead process.
EARLY_EXIT_GRACE = 0.3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="daemonize.py", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pidfile", required=True)
    parser.add_argument("--log", default=os.devnull)
    parser.add_argument("--cwd", default=None)
    parser.add_argument("--ready", default=None, metavar="TEXT",
                        help="wait until the log shows TEXT (the program is ready), or it exits")
    parser.add_argument("--ready-timeout", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("no program given after --")
    if args.ready is not None and args.log == os.devnull:
        parser.error("--ready needs --log (the program's output is where readiness shows)")
    log_start = os.path.getsize(args.log) if args.ready is not None and os.path.exists(args.log) else 0
    try:
        log = open(args.log, "ab")
    except OSError as exc:
        print(f"cannot open log file {args.log}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        child = subprocess.Popen(
            program,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=args.cwd,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        print(f"cannot start {program[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        log.close()
    try:
        atomic_write(Path(args.pidfile), f"{child.pid}\n", mode=0o644)
    except OSError as exc:
        child.kill()
        print(f"cannot write pid file {args.pidfile}: {exc.strerror}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + (args.ready_timeout if args.ready is not None else EARLY_EXIT_GRACE)
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            os.unlink(args.pidfile)
            print(f"{program[0]} exited at once with status {code}; see {args.log}", file=sys.stderr)
            return 1
        if args.ready is not None and _log_shows(args.log, log_start, args.ready):
            break
        time.sleep(0.02)
    else:
        if args.ready is not None:
            child.kill()
            child.wait()
            os.unlink(args.pidfile)
            print(f"{program[0]} was not ready within {args.ready_timeout:g}s; see {args.log}", file=sys.stderr)
            return 1
    print(child.pid)
    return 0


def _log_shows(path: str, start: int, text: str) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            return text.encode() in handle.read()
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
