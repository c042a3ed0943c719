"""How the CLI reaches the control plane: its own ``/v1`` verbs (signed with SigV4, as
every API request) and the RDS API through boto3, with the credentials and address the
control plane leaves in ``client.json``; and starting the control plane when it is not
running. The CLI never opens the state database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, WaiterError

from borealis import settings
from borealis.api import identity
from borealis.logfiles import private_log
from borealis.processes import alive
from borealis.protocol.files import ClientConfig, ControlInfo


class CliError(Exception):
    pass


def home() -> Path:
    return settings.current().home


def control_info() -> ControlInfo | None:
    """Where the running control plane listens (None if none runs for this home)."""
    try:
        info = ControlInfo.from_json((home() / "control.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    if not alive(info.pid, "borealis.daemon"):
        return None
    return info


def credentials() -> tuple[str, str]:
    """The first access key of this home (the control plane creates it)."""
    client = client_config()
    return client.access_key_id, client.secret_access_key


def client_config() -> ClientConfig:
    """The credentials and API address the control plane left for this home."""
    try:
        return ClientConfig.from_json((home() / "client.json").read_text())
    except (OSError, ValueError, TypeError):
        raise CliError("no access key yet; start the control plane with `borealis up`"
                       ) from None


def request(method: str, path: str, body: dict[str, Any] | None = None,
            timeout_s: float = 900) -> Any:
    """A signed call to the control plane's own verbs (SigV4, as every API request)."""
    info = control_info()
    if info is None:
        raise CliError("the control plane is not running; start it with `borealis up`")
    data = json.dumps(body).encode() if body is not None else b""
    signed = AWSRequest(method=method, url=info.url + path, data=data,
                        headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(*credentials()), "borealis", info.region or identity.DEFAULT_REGION
              ).add_auth(signed)
    req = urllib.request.Request(info.url + path, data=data or None, method=method,
                                 headers=dict(signed.headers.items()))
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", str(exc))
        except ValueError:
            message = str(exc)
        raise CliError(message) from None
    except urllib.error.URLError as exc:
        raise CliError(f"cannot reach the control plane: {exc.reason}") from None


def ensure_control_plane(wrap: Callable[[list[str]], list[str]] | None = None,
                         env: dict[str, str] | None = None) -> ControlInfo:
    """The running control plane, started if none runs (``wrap``: how its command line
    runs elsewhere, e.g. in a lab host's namespace; ``env``: knobs added for it)."""
    info = control_info()
    if info is not None:
        return info
    h = home()
    if not h.exists():
        h.mkdir(parents=True)
        os.chmod(h, 0o700)
    argv = [sys.executable, "-m", "borealis.daemon", "--home", str(h)]
    with private_log(h / "control.log") as log:
        subprocess.Popen(wrap(argv) if wrap else argv, stdout=log, stderr=log,
                         stdin=subprocess.DEVNULL, start_new_session=True, cwd="/",
                         env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = control_info()
        if info is not None:
            try:
                request("GET", "/v1/health", timeout_s=2)
                return info
            except CliError:
                pass
        time.sleep(0.1)
    raise CliError(f"the control plane did not start; see {h / 'control.log'}")


def stop_control_plane() -> bool:
    """Stop the running control plane (its clusters' processes with it; data kept);
    False if none ran."""
    info = control_info()
    if info is None:
        return False
    request("POST", "/v1/down")
    deadline = time.monotonic() + 60
    while alive(info.pid, "borealis.daemon") and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


# -- the RDS API, through boto3 ---------------------------------------------------------------


def api_location() -> tuple[str, str]:
    """The API's URL and region: the running control plane's, else the address it keeps
    for this home (so exported credentials stay valid across restarts)."""
    info = control_info()
    if info is not None:
        return info.url, info.region or identity.DEFAULT_REGION
    client = client_config()
    return client.url, client.region


def rds_client() -> Any:
    import boto3  # here, not at the top: most commands never need it (0.2 s to import)

    url, region = api_location()
    key_id, secret = credentials()
    return boto3.client("rds", endpoint_url=url, region_name=region,
                        aws_access_key_id=key_id, aws_secret_access_key=secret)


def call(method: Any, **params: Any) -> Any:
    try:
        return method(**params)
    except ClientError as exc:
        raise CliError(exc.response["Error"]["Message"]) from None


def describe_cluster(rds: Any, name: str) -> dict[str, Any]:
    result: dict[str, Any] = call(rds.describe_db_clusters,
                                  DBClusterIdentifier=name)["DBClusters"][0]
    return result


def wait(rds: Any, waiter: str, **params: Any) -> None:
    try:
        rds.get_waiter(waiter).wait(WaiterConfig={"Delay": 1, "MaxAttempts": 900}, **params)
    except WaiterError as exc:
        error = exc.last_response.get("Error", {}).get("Message", str(exc))
        raise CliError(f"{waiter.replace('_', ' ')}: {error}") from None
