"""The bank workload as a process of its own, for a client on another machine (a lab
host): ``python -m tests.faults.bank_client --dsn DSN --out FILE [--create]``.

It runs :class:`~tests.faults.bank.Bank` until SIGTERM, appending each acknowledged
transfer to ``FILE`` as a JSON line within a tenth of a second (:class:`RemoteBank`
reads them meanwhile). Times are CLOCK_MONOTONIC, which every network namespace of the
machine shares, so a test compares them with its own fault times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.faults.bank import Ack, Bank


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--create", action="store_true")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    bank = Bank(args.dsn, clients=args.clients)
    if args.create:
        bank.create()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    bank.start()
    written = 0
    with open(args.out, "a") as out:
        while True:
            stopping = stop.wait(0.1)
            if stopping:
                bank.stop()
            with bank._lock:
                new = bank.stats.acked[written:]
            for ack in new:
                out.write(json.dumps(dataclasses.asdict(ack)) + "\n")
            out.flush()
            written += len(new)
            if stopping:
                out.write("end\n")
                return


class RemoteBank(Bank):
    """The checks of :class:`Bank` over what a bank client process acknowledged."""

    def __init__(self, dsn: str, out: Path, process: subprocess.Popen[bytes]) -> None:
        super().__init__(dsn)
        self.out = out
        self.process = process

    def refresh(self) -> bool:
        """Read what the client wrote so far; True once it wrote its last line."""
        try:
            lines = self.out.read_text().splitlines()
        except FileNotFoundError:
            return False
        ended = bool(lines) and lines[-1] == "end"
        with self._lock:
            self.stats.acked = [Ack(**json.loads(line)) for line in lines
                                if line and line != "end"]
        return ended

    def acked_count(self) -> int:
        self.refresh()
        return super().acked_count()

    def wait_commits_after(self, at: float, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.refresh()
            with self._lock:
                if sum(1 for a in self.stats.acked if a.at > at) >= count:
                    return
            if self.process.poll() is not None:
                err = self.process.stderr.read() if self.process.stderr else b""
                raise AssertionError(f"the bank client exited: {err!r}")
            time.sleep(0.1)
        raise AssertionError(f"fewer than {count} commits acknowledged in {timeout_s}s "
                             "after the fault")

    def finish(self) -> None:
        """Stop the client (SIGTERM, by PID) and read everything it acknowledged."""
        self.process.terminate()
        self.process.wait(90)
        if not self.refresh():
            raise AssertionError("the bank client ended without its last line")


if __name__ == "__main__":
    main()
