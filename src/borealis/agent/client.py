"""The control plane's side of an agent: blocking HTTPS calls with its client
certificate, checked against the deployment's CA (the agent's certificate must name the
host's address). Called from the control plane's worker threads, like the rest of its
process handling."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

from borealis import pki
from borealis.protocol.agent import AgentInfo, ProcessKey, ProcessReport, ProcessSpec

CALL_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 1.0  # hosts of one deployment answer a connection in milliseconds


class AgentUnreachable(Exception):
    """The agent did not answer (host down, partitioned, agent stopped)."""


class AgentRefused(Exception):
    """The agent answered with an error."""


class AgentClient:
    def __init__(self, address: str, port: int, ca_pem: str, own: pki.KeyPair,
                 timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.address = address
        self.port = port
        self.timeout_s = timeout_s
        self._ctx = pki.client_context(ca_pem, own)

    def _call(self, method: str, path: str, body: Any = None,
              timeout_s: float | None = None, upload: Path | None = None) -> Any:
        # A host that is cut off answers nothing: its connection is given up after
        # CONNECT_TIMEOUT_S, however long the call itself may take once connected (a
        # stop waits for its process to end).
        conn = http.client.HTTPSConnection(self.address, self.port, context=self._ctx,
                                           timeout=min(CONNECT_TIMEOUT_S, self.timeout_s))
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(timeout_s or self.timeout_s)
            if upload is not None:
                with upload.open("rb") as stream:  # http.client sends it in blocks
                    conn.request(method, path, body=stream, headers={
                        "Content-Type": "application/x-tar",
                        "Content-Length": str(upload.stat().st_size)})
            else:
                payload = None if body is None else json.dumps(body).encode()
                conn.request(method, path, body=payload,
                             headers={"Content-Type": "application/json"} if payload else {})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
            raise AgentUnreachable(f"agent on {self.address}:{self.port}: {exc}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            try:
                message = json.loads(data).get("error", data.decode(errors="replace"))
            except ValueError:
                message = data.decode(errors="replace")
            raise AgentRefused(f"agent on {self.address}: {resp.status} {message}")
        if resp.getheader("Content-Type", "").startswith("application/json"):
            return json.loads(data)
        return data

    @staticmethod
    def _path(key: ProcessKey) -> str:
        return "/v1/processes/" + "/".join(urllib.parse.quote(p, safe="") for p in
                                           (key.cluster, key.kind, key.name))

    def info(self) -> AgentInfo:
        return AgentInfo.from_json(self._call("GET", "/v1/agent"))

    def ensure(self, spec: ProcessSpec) -> ProcessReport:
        return ProcessReport.from_json(self._call("PUT", self._path(spec.key), spec.to_json()))

    def stop(self, key: ProcessKey, sig: str = "TERM", timeout_s: float = 10.0,
             forget: bool = False) -> bool:
        query = urllib.parse.urlencode({"signal": sig, "timeout_s": timeout_s,
                                        "forget": int(forget)})
        answer = self._call("DELETE", f"{self._path(key)}?{query}",
                            timeout_s=timeout_s + self.timeout_s)
        return bool(answer["ran"])

    def reload(self, spec: ProcessSpec) -> bool:
        """A new config; a running server applies it now. True if it was running."""
        return bool(self._call("POST", f"{self._path(spec.key)}/reload", spec.to_json())["ran"])

    def signal(self, key: ProcessKey, sig: str) -> bool:
        answer = self._call("POST", f"{self._path(key)}/signal?signal={sig}")
        return bool(answer["ran"])

    def install_data(self, key: ProcessKey, archive: Path, timeout_s: float = 1800.0) -> None:
        """Send a stopped server its data directory (a tar archive of it)."""
        self._call("PUT", f"{self._path(key)}/data", timeout_s=timeout_s, upload=archive)

    def read_file(self, key: ProcessKey, name: str) -> bytes:
        data = self._call("GET", f"{self._path(key)}/files/{name}")
        return data if isinstance(data, bytes) else json.dumps(data).encode()
