"""The bank workload: clients move money between accounts through the cluster endpoint.

Each transfer is one transaction: two balance updates plus a row in ``transfers`` naming
the client, its sequence number and the server that ran it. A client records a transfer
as acknowledged only when its COMMIT returned; a COMMIT whose connection broke is
"uncertain" (it may or may not have happened; both are correct).

Checks after a fault (:meth:`Bank.check`): every acknowledged transfer is present, the
total balance never changes, every balance equals its start plus what the transfers
table says, and no two servers ever acknowledged commits at overlapping times.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

ACCOUNTS = 20
START_BALANCE = 1000


@dataclass
class Ack:
    client: int
    seq: int
    at: float  # monotonic time the COMMIT returned
    server: str  # "port:postmaster start time" of the writer that acknowledged it


@dataclass
class Stats:
    acked: list[Ack] = field(default_factory=list)


class Bank:
    def __init__(self, dsn: str, clients: int = 4) -> None:
        self.dsn = dsn
        self.clients = clients
        self.stats = Stats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._generation = 0  # each start() numbers its transfers afresh
        self._open = threading.Event()  # cleared: clients hold before their next transfer
        self._open.set()
        self._busy = 0  # transfers under way
        self._released_at = 0.0  # when the last hold ended

    def create(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute("DROP TABLE IF EXISTS transfers, accounts")
            conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
            conn.execute("CREATE TABLE transfers (client int, seq int, src int, dst int, "
                         "amount int, server text, PRIMARY KEY (client, seq))")
            conn.execute("INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g",
                         (START_BALANCE, ACCOUNTS))

    # -- clients -------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._generation += 1
        for client in range(self.clients):
            t = threading.Thread(target=self._client, args=(client,), daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        self._threads.clear()

    def _client(self, client: int) -> None:
        rng = random.Random(client)
        seq = self._generation * 10_000_000
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, connect_timeout=3) as conn:
                    server = conn.execute(
                        "SELECT current_setting('port') || ':' || pg_postmaster_start_time()"
                    ).fetchone()
                    conn.commit()
                    assert server is not None
                    while not self._stop.is_set():
                        if not self._open.wait(0.1):
                            continue
                        seq += 1
                        with self._lock:
                            self._busy += 1
                        try:
                            self._transfer(conn, rng, client, seq, str(server[0]))
                        finally:
                            with self._lock:
                                self._busy -= 1
            except psycopg.Error:
                self._stop.wait(0.02)

    def hold(self, timeout_s: float = 10) -> None:
        """Clients finish the transfer under way and wait before the next one (a fault
        that needs the writer's log to end where no commit put it)."""
        self._open.clear()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._busy:
                    return
            time.sleep(0.005)

    def release(self) -> None:
        self._released_at = time.monotonic()
        self._open.set()

    def _transfer(self, conn: psycopg.Connection[Any], rng: random.Random, client: int,
                  seq: int, server: str) -> None:
        src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
        amount = rng.randint(1, 50)
        conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, src))
        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, dst))
        conn.execute("INSERT INTO transfers VALUES (%s, %s, %s, %s, %s, %s)",
                     (client, seq, src, dst, amount, server))
        conn.commit()  # if it raises, the transfer is uncertain and not logged as acked
        with self._lock:
            self.stats.acked.append(Ack(client, seq, time.monotonic(), server))

    # -- measurements and checks ------------------------------------------------------------

    def acked_count(self) -> int:
        with self._lock:
            return len(self.stats.acked)

    def downtime_s(self, fault_at: float) -> float:
        """What clients saw: the longest time without any acknowledged commit, from the
        last one before the fault until commits flow again (commits in flight when the
        fault struck may still be acknowledged just after it). A hold that ended after
        that last commit and before the fault is the test's own wait, not the clients':
        the count then starts where the hold ended."""
        with self._lock:
            times = sorted(a.at for a in self.stats.acked)
        before = [t for t in times if t <= fault_at]
        after = [t for t in times if t > fault_at]
        if not before or len(after) < 2:
            raise AssertionError("no commit acknowledged on one side of the fault")
        released = self._released_at if self._released_at <= fault_at else 0.0
        window = [max(before[-1], released), *after]
        return max(b - a for a, b in zip(window, window[1:], strict=False))

    def wait_commits_after(self, at: float, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if sum(1 for a in self.stats.acked if a.at > at) >= count:
                    return
            time.sleep(0.05)
        raise AssertionError(f"fewer than {count} commits acknowledged in {timeout_s}s "
                             "after the fault")

    def check(self, dsn: str) -> int:
        """Every invariant on the writer at ``dsn``; returns how many acked were lost."""
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            present = {(c, s) for c, s in conn.execute("SELECT client, seq FROM transfers")}
            total = conn.execute("SELECT sum(balance) FROM accounts").fetchone()
            expected = conn.execute(
                "SELECT count(*) FROM accounts a WHERE balance <> %s "
                "+ COALESCE((SELECT sum(amount) FROM transfers WHERE dst = a.id), 0) "
                "- COALESCE((SELECT sum(amount) FROM transfers WHERE src = a.id), 0)",
                (START_BALANCE,)).fetchone()
        with self._lock:
            acked = list(self.stats.acked)
        lost = [a for a in acked if (a.client, a.seq) not in present]
        assert total is not None and total[0] == ACCOUNTS * START_BALANCE, \
            f"total balance is {total}, not {ACCOUNTS * START_BALANCE}"
        assert expected is not None and expected[0] == 0, \
            f"{expected} accounts disagree with the transfers table"
        assert_one_writer_at_a_time(acked)
        return len(lost)

    def snapshot(self, dsn: str) -> tuple[int, str]:
        """What a reader must converge to: the transfers count and every balance."""
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            count = conn.execute("SELECT count(*) FROM transfers").fetchone()
            balances = conn.execute(
                "SELECT string_agg(balance::text, ',' ORDER BY id) FROM accounts").fetchone()
        assert count is not None and balances is not None
        return int(count[0]), str(balances[0])


def assert_one_writer_at_a_time(acked: list[Ack]) -> None:
    """The servers' acknowledgement intervals, in time order, never interleave."""
    spans: dict[str, tuple[float, float]] = {}
    for a in acked:
        lo, hi = spans.get(a.server, (a.at, a.at))
        spans[a.server] = (min(lo, a.at), max(hi, a.at))
    ordered = sorted(spans.items(), key=lambda kv: kv[1][0])
    for (s1, (_, end1)), (s2, (start2, _)) in zip(ordered, ordered[1:], strict=False):
        assert end1 <= start2, (f"{s1} acknowledged a commit after {s2} had begun "
                                "acknowledging: two writers at once")
