"""What a cluster's events are in the RDS API's terms (pure): each event Borealis records
(``source``, ``message``) becomes events of a DB cluster, a DB instance or a cluster
snapshot, with Aurora's categories, and Aurora's message and event id where Aurora has
an event for the same thing (``RDS-EVENT-0071``: "Completed failover to DB instance:
X"); otherwise Borealis's own words under the nearest category.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SOURCE_TYPES = ("db-instance", "db-parameter-group", "db-security-group", "db-snapshot",
                "db-cluster", "db-cluster-snapshot", "custom-engine-version", "db-proxy",
                "blue-green-deployment")
CATEGORIES: dict[str, tuple[str, ...]] = {
    "db-cluster": ("configuration change", "creation", "deletion", "failover", "failure",
                   "global-failover", "maintenance", "migration", "notification",
                   "serverless"),
    "db-instance": ("availability", "backup", "configuration change", "creation",
                    "deletion", "failover", "failure", "low storage", "maintenance",
                    "notification", "read replica", "recovery", "restoration", "security",
                    "security patching"),
    "db-cluster-snapshot": ("backup", "notification"),
    "db-parameter-group": ("configuration change",),
    "db-security-group": ("configuration change", "failure"),
    "db-snapshot": ("creation", "deletion", "notification", "restoration"),
}


@dataclass(frozen=True)
class RdsEvent:
    source_type: str
    source_id: str
    categories: tuple[str, ...]
    message: str
    event_id: str = ""  # Aurora's RDS-EVENT-nnnn, when it has one for this


_ID = r"([a-z][a-z0-9-]*)"
# (source, pattern of the message) -> the events it stands for; {0}, {1}: the groups,
# {cluster}: the cluster, {text}: Borealis's own words ("source: message").
_RULES: list[tuple[str, re.Pattern[str], list[tuple[str, str, tuple[str, ...], str, str]]]] = [
    ("cluster", re.compile(r"^created"), [
        ("db-cluster", "{cluster}", ("creation",), "DB cluster created", "RDS-EVENT-0170")]),
    ("cluster", re.compile(r"^stopped"), [
        ("db-cluster", "{cluster}", ("notification",), "DB cluster stopped",
         "RDS-EVENT-0150")]),
    ("cluster", re.compile(r"^master user password changed"), [
        ("db-cluster", "{cluster}", ("configuration change",),
         "The master password for the DB cluster has been reset.", "")]),
    ("failover", re.compile(rf"^chose {_ID}"), [
        ("db-cluster", "{cluster}", ("failover",),
         "Started cross AZ failover to DB instance: {0}", "RDS-EVENT-0072")]),
    ("failover", re.compile(rf"^completed in [\d.]+ s: {_ID} is"), [
        ("db-cluster", "{cluster}", ("failover",), "Completed failover to DB instance: {0}",
         "RDS-EVENT-0071"),
        ("db-instance", "{0}", ("failover",), "The DB instance was promoted to the writer.",
         "")]),
    ("failover", re.compile(rf"^old writer {_ID} stopped"), [
        ("db-instance", "{0}", ("failover",), "{text}", "")]),
    ("failover", re.compile(rf"^{_ID} rejoined as a reader"), [
        ("db-instance", "{0}", ("read replica",), "{text}", "")]),
    ("failover", re.compile(r"^(started|stopped):"), [
        ("db-cluster", "{cluster}", ("failover",), "{text}", "")]),
    ("supervisor", re.compile(rf"^writer {_ID} failed"), [
        ("db-cluster", "{cluster}", ("failure",), "{text}", ""),
        ("db-instance", "{0}", ("failure",), "{text}", "")]),
    ("compute", re.compile(rf"^reader {_ID} added"), [
        ("db-instance", "{0}", ("creation",), "DB instance created", "RDS-EVENT-0005")]),
    ("compute", re.compile(rf"^(?:reader|writer) {_ID} removed"), [
        ("db-instance", "{0}", ("deletion",), "DB instance deleted", "RDS-EVENT-0003")]),
    ("compute", re.compile(rf"^{_ID} rebooted"), [
        ("db-instance", "{0}", ("availability",), "DB instance restarted", "RDS-EVENT-0006")]),
    ("compute", re.compile(rf"^started (?:writer|reader) {_ID}"), [
        ("db-instance", "{0}", ("notification",), "DB instance started", "RDS-EVENT-0088")]),
    ("compute", re.compile(rf"^(?:reader|writer) {_ID}: its host restarted"), [
        ("db-instance", "{0}", ("recovery",), "{text}", "")]),
    ("compute", re.compile(rf"^(?:initialized writer|reader) {_ID}"), [
        ("db-instance", "{0}", ("notification",), "{text}", "")]),
    ("snapshot", re.compile(rf"^snapshot {_ID} started"), [
        ("db-cluster-snapshot", "{0}", ("backup",), "Creating manual cluster snapshot",
         "RDS-EVENT-0074")]),
    ("snapshot", re.compile(rf"^snapshot {_ID} taken"), [
        ("db-cluster-snapshot", "{0}", ("backup",), "Manual cluster snapshot created",
         "RDS-EVENT-0075")]),
]


def classify(cluster: str, source: str, message: str) -> list[RdsEvent]:
    """The RDS events one recorded event stands for (at least one: the cluster's)."""
    text = f"{source}: {message}"
    for rule_source, pattern, makes in _RULES:
        if rule_source != source:
            continue
        m = pattern.match(message)
        if m is None:
            continue
        groups = [g for g in m.groups() if g is not None and g not in ("started", "stopped")]
        return [RdsEvent(kind, sid.format(*groups, cluster=cluster),
                         cats, msg.format(*groups, cluster=cluster, text=text), eid)
                for kind, sid, cats, msg, eid in makes]
    category = ("failure" if "failed" in message else
                "failover" if source == "failover" else "notification")
    return [RdsEvent("db-cluster", cluster, (category,), text)]
