"""The RDS Data API: SQL over HTTPS-style calls, through the cluster (writer) endpoint.

Each call outside a transaction gets its own connection (autocommit: every statement
commits on its own, as on Aurora). ``BeginTransaction`` keeps a connection open under a
transaction id until commit, rollback, or 180 s without a call
(``BOREALIS_DATA_API_IDLE_TRANSACTION_S``), when it is rolled back. Calls go through the
cluster endpoint, so they follow the writer through failovers (and are held while there
is none).

Aurora's limits hold: a 1 MiB response, 64 KB a row, 45 s a call
(``BOREALIS_DATA_API_CALL_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg.errors
from psycopg.rows import tuple_row

from borealis import settings
from borealis.api import data_codec as codec
from borealis.api import identity
from borealis.api.data_codec import bad_request
from borealis.api.data_pool import IdleConnections
from borealis.api.errors import ApiError
from borealis.control.state import Secret

if TYPE_CHECKING:
    from borealis.control.plane import ControlPlane

MAX_RESPONSE = 1 << 20
MAX_ROW = 64 * 1024
MAX_TRANSACTION_S = 24 * 3600
CONNECT_TIMEOUT_S = 30  # the cluster endpoint holds connections while there is no writer


@dataclass
class Transaction:
    id: str
    cluster: str
    secret: str
    conn: psycopg.AsyncConnection[Any]
    started: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DataApi:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.state = cp.state
        self.transactions: dict[str, Transaction] = {}
        self.pool = IdleConnections()
        self.keys: dict[int, str] = {}  # id(connection) -> its pool key, while lent out
        knobs = settings.current()
        self.call_timeout_s = knobs.data_api_call_timeout_s
        self.idle_transaction_s = knobs.data_api_idle_transaction_s

    # -- resolving who and where ---------------------------------------------------------

    def _cluster(self, resource_arn: str) -> str:
        prefix = identity.rds_arn(self.state, "cluster", "")
        name = resource_arn[len(prefix):] if resource_arn.startswith(prefix) else ""
        if not name or self.state.cluster(name) is None:
            raise bad_request(f"Invalid resourceArn {resource_arn!r}: no such cluster")
        return name

    def _secret(self, secret_arn: str, cluster: str) -> Secret:
        secret = self.state.secret_by_arn(secret_arn)
        if secret is None:
            raise ApiError("SecretsErrorException", f"Secret {secret_arn!r} not found", 400)
        if secret.cluster != cluster:
            raise ApiError("InvalidSecretException", f"Secret {secret.name!r} is for cluster "
                           f"{secret.cluster}, not {cluster}", 400)
        return secret

    def _dsn(self, cluster: str, secret: Secret, database: str | None) -> str:
        writer = next(e for e in self.state.endpoints(cluster) if e.type == "WRITER")
        return psycopg.conninfo.make_conninfo(
            host=writer.host, port=writer.port, user=secret.username, password=secret.password,
            dbname=database or "postgres", connect_timeout=CONNECT_TIMEOUT_S,
            application_name="borealis-data-api")

    async def _connect(self, p: dict[str, Any]) -> tuple[str, Secret,
                                                         psycopg.AsyncConnection[Any]]:
        cluster = self._cluster(p["resourceArn"])
        secret = self._secret(p["secretArn"], cluster)
        dsn = self._dsn(cluster, secret, p.get("database"))
        conn = self.pool.take(dsn)
        if conn is None:
            conn = await self._open(dsn)
        self.keys[id(conn)] = dsn
        if p.get("schema"):
            await conn.execute(psycopg.sql.SQL("SET search_path TO {}").format(
                psycopg.sql.Identifier(p["schema"])))
        return cluster, secret, conn

    async def _open(self, dsn: str) -> psycopg.AsyncConnection[Any]:
        try:
            # No automatic prepared statements: DISCARD ALL between calls drops them.
            return await psycopg.AsyncConnection.connect(dsn, autocommit=True,
                                                         prepare_threshold=None)
        except psycopg.OperationalError as exc:
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else str(exc)
            if "password authentication failed" in str(exc) or "does not exist" in str(exc):
                raise bad_request(f"FATAL: {message}") from None
            raise ApiError("DatabaseUnavailableException",
                           f"the database is not reachable: {message}", 504) from None

    async def _release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """A call is over: its connection goes back to the pool (or is closed)."""
        key = self.keys.pop(id(conn), None)
        if key is None:
            await conn.close()
        else:
            await self.pool.give(key, conn)

    def _transaction(self, p: dict[str, Any]) -> Transaction:
        tx = self.transactions.get(p["transactionId"])
        if tx is None:
            raise ApiError("TransactionNotFoundException",
                           f"Transaction {p['transactionId']} is not found", 404)
        cluster = self._cluster(p["resourceArn"])
        secret = self._secret(p["secretArn"], cluster)
        if (tx.cluster, tx.secret) != (cluster, secret.name):
            raise bad_request("the transaction belongs to another resourceArn or secretArn")
        return tx

    # -- operations ------------------------------------------------------------------------

    async def begin_transaction(self, p: dict[str, Any]) -> dict[str, Any]:
        cluster, secret, conn = await self._connect(p)
        try:
            await conn.execute("BEGIN")
        except psycopg.Error as exc:
            self.keys.pop(id(conn), None)
            await conn.close()
            raise database_error(exc) from None
        tx_id = secrets.token_urlsafe(48)
        self.transactions[tx_id] = Transaction(tx_id, cluster, secret.name, conn)
        return {"transactionId": tx_id}

    async def end_transaction(self, p: dict[str, Any], commit: bool) -> dict[str, Any]:
        tx = self._transaction(p)
        async with tx.lock:
            self.transactions.pop(tx.id, None)
            try:
                await tx.conn.execute("COMMIT" if commit else "ROLLBACK")
            except psycopg.Error as exc:
                self.keys.pop(id(tx.conn), None)
                await tx.conn.close()
                raise database_error(exc) from None
            await self._release(tx.conn)
        return {"transactionStatus": "Transaction Committed" if commit
                else "Rollback Complete"}

    async def execute_statement(self, p: dict[str, Any]) -> dict[str, Any]:
        query, names = codec.to_pyformat(p["sql"])
        values = codec.bind_parameters(names, p.get("parameters", []))
        if not names:
            query, values = p["sql"], {}
        if p.get("transactionId"):
            tx = self._transaction(p)
            async with tx.lock:
                tx.last_used = time.monotonic()
                try:
                    return await self._timed(tx.conn, self._run(tx.conn, query, values, p),
                                             p, keep=True)
                finally:
                    tx.last_used = time.monotonic()
        _, _, conn = await self._connect(p)
        return await self._timed(conn, self._run(conn, query, values, p), p, keep=False)

    async def batch_execute(self, p: dict[str, Any]) -> dict[str, Any]:
        query, names = codec.to_pyformat(p["sql"])
        sets = p.get("parameterSets") or [[]]
        bound = [codec.bind_parameters(names, s) for s in sets]
        if not names:
            query = p["sql"]

        async def run(conn: psycopg.AsyncConnection[Any], own: bool) -> dict[str, Any]:
            if own:
                await conn.execute("BEGIN")  # a batch outside a transaction is all or nothing
            async with conn.cursor() as cur:
                for values in bound:
                    await cur.execute(query, values if names else None)
            if own:
                await conn.execute("COMMIT")
            return {"updateResults": [{"generatedFields": []} for _ in bound]}

        if p.get("transactionId"):
            tx = self._transaction(p)
            async with tx.lock:
                tx.last_used = time.monotonic()
                return await self._timed(tx.conn, run(tx.conn, False), p, keep=True)
        _, _, conn = await self._connect(p)
        return await self._timed(conn, run(conn, True), p, keep=False)

    async def _timed(self, conn: psycopg.AsyncConnection[Any], work: Any, p: dict[str, Any],
                     keep: bool) -> dict[str, Any]:
        """Run ``work`` on ``conn`` within the call timeout. Past it the statement is cancelled,
        unless ``continueAfterTimeout`` asks to let it finish."""
        task: asyncio.Task[dict[str, Any]] = asyncio.ensure_future(work)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.call_timeout_s)
        except TimeoutError:
            committing = await self._waiting_for_quorum(conn, p)
            if (p.get("continueAfterTimeout") or committing) and not keep:
                self.keys.pop(id(conn), None)
                task.add_done_callback(lambda _: asyncio.ensure_future(conn.close()))
            elif not committing:
                with contextlib.suppress(Exception):
                    await conn.cancel_safe(timeout=5)
                with contextlib.suppress(Exception):
                    outcome = await asyncio.wait_for(task, 10)
                    # The cancel came after the statement was done: it took effect.
                    if not keep:
                        await conn.close()
                    return outcome
                if not keep:
                    await conn.close()
            if committing:
                # A commit waiting for the quorum cannot be taken back: cancelling it
                # would only leave it committed on the writer and the caller told
                # otherwise. It is left to finish; its outcome is not known yet.
                raise ApiError("StatementTimeoutException", "The statement did not finish "
                               f"within {self.call_timeout_s:g} seconds: its commit is waiting "
                               "for a write quorum of storage nodes, so its outcome is "
                               "unknown (it takes effect once the quorum is back, and is "
                               "lost only if the writer is replaced first); check before "
                               "retrying", 400) from None
            raise ApiError("StatementTimeoutException", "The statement did not finish within "
                           f"{self.call_timeout_s:g} seconds" + (" (it goes on running)" if
                           p.get("continueAfterTimeout") else " and was cancelled"), 400) \
                from None
        except psycopg.Error as exc:
            if not keep:
                await conn.close()
            raise database_error(exc) from None
        except BaseException:
            if not keep:
                await conn.close()
            raise
        finally:
            if not keep and task.done() and not conn.closed:
                await self._release(conn)
            elif conn.closed:
                self.keys.pop(id(conn), None)

    async def _waiting_for_quorum(self, conn: psycopg.AsyncConnection[Any],
                                  p: dict[str, Any]) -> bool:
        """Whether the call's session waits for its commit to reach the volume (the
        volume client is the writer's synchronous standby: PostgreSQL's ``SyncRep``)."""
        pid = conn.info.backend_pid
        try:
            _, _, probe = await self._connect({k: v for k, v in p.items()
                                              if k != "transactionId"})
        except (ApiError, psycopg.Error):
            return False
        try:
            cur = await probe.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s",
                                      (pid,))
            row = await cur.fetchone()
        except psycopg.Error:
            return False
        finally:
            await self._release(probe)
        return bool(row and row[0] == "SyncRep")

    async def _run(self, conn: psycopg.AsyncConnection[Any], query: str,
                   values: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
        options = p.get("resultSetOptions") or {}
        as_json = p.get("formatRecordsAs") == "JSON"
        async with conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(query, values or None)
            out: dict[str, Any] = {"numberOfRecordsUpdated": 0, "generatedFields": []}
            status = (cur.statusmessage or "").split()
            if status and status[0] in ("INSERT", "UPDATE", "DELETE", "MERGE"):
                out["numberOfRecordsUpdated"] = max(cur.rowcount, 0)
            if cur.description is None:
                return out
            columns = cur.description
            rows: list[Any] = []
            size = 0
            while batch := await cur.fetchmany(200):
                for row in batch:
                    if as_json:
                        record: Any = {c.name: codec.json_value(v) for c, v in zip(columns, row,
                                                                                 strict=True)}
                    else:
                        record = [codec.field(v, options) for v in row]
                    row_size = len(json.dumps(record))
                    if row_size > MAX_ROW:
                        raise bad_request("Database returned a row larger than the 64 KB "
                                          "limit; select fewer or smaller columns")
                    size += row_size
                    if size > MAX_RESPONSE:
                        raise bad_request("Database returned more than the allowed response "
                                          "size limit (1 MiB); use LIMIT and fetch in pages")
                    rows.append(record)
            if as_json:
                out["formattedRecords"] = json.dumps(rows)
            else:
                out["records"] = rows
            if p.get("includeResultMetadata"):
                out["columnMetadata"] = [
                    codec.column_metadata(c.name, _type_name(conn, c.type_code),
                                          precision=c.precision or c.internal_size or 0,
                                          scale=c.scale or 0) for c in columns]
            return out

    # -- idle transactions -----------------------------------------------------------------

    async def reap_idle(self) -> None:
        """Roll back transactions idle for the idle limit (or open for a day); close
        pooled connections unused for a minute."""
        await self.pool.prune()
        now = time.monotonic()
        for tx in list(self.transactions.values()):
            if tx.lock.locked():
                continue
            if (now - tx.last_used > self.idle_transaction_s
                    or now - tx.started > MAX_TRANSACTION_S):
                self.transactions.pop(tx.id, None)
                with contextlib.suppress(Exception):
                    await tx.conn.execute("ROLLBACK")
                self.keys.pop(id(tx.conn), None)
                await tx.conn.close()
                self.state.event(tx.cluster, "data-api", "a transaction idle for "
                                 f"{self.idle_transaction_s:g} s was rolled back")

    async def close(self) -> None:
        for tx in list(self.transactions.values()):
            await tx.conn.close()
        self.transactions.clear()
        await self.pool.close()


def _type_name(conn: psycopg.AsyncConnection[Any], oid: int) -> str:
    info = conn.adapters.types.get(oid)
    if info is None:
        return "unknown"
    return f"_{info.name}" if info.array_oid == oid else info.name


def database_error(exc: psycopg.Error) -> ApiError:
    """Aurora's form: the server's message with its SQLSTATE."""
    diag = exc.diag
    message = diag.message_primary or str(exc).strip()
    text = f"ERROR: {message}"
    if diag.statement_position:
        text += f"\n  Position: {diag.statement_position}"
    if diag.sqlstate:
        text += f"; SQLState: {diag.sqlstate}"
    if isinstance(exc, psycopg.OperationalError) and not diag.sqlstate:
        return ApiError("DatabaseUnavailableException", f"the connection was lost: {message}",
                        504)
    return bad_request(text)
