"""A synthetic import floor for the benchmarks: the schema of a deception network.

26 SQLModel tables (sites, sensors, decoys, the services they emulate, honey
credentials, attacker sessions and what was observed in them, fingerprints, identities,
campaigns and their attribution), a few relationships and API read models. Importing it
pays what a real fleet's workers pay before their first line: sqlmodel, SQLAlchemy and
pydantic, the table metadata, configured mappers and pydantic validators, plus the stdlib
an async service carries (asyncio, json, decimal, email, ipaddress, uuid).

The benchmarks import it in the master (``import floor``) and, for comparison, in a fresh
interpreter per worker, which is what a systemd unit per worker pays.
"""

import asyncio  # noqa: F401 - part of the floor
import email.message
import email.utils
import enum
import ipaddress
import json
import logging.handlers  # noqa: F401 - part of the floor
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiosqlite  # noqa: F401 - the async driver a real service would load
from pydantic import BaseModel, ConfigDict, field_validator
from sqlalchemy import JSON, CheckConstraint, Engine, Index, UniqueConstraint, create_engine
from sqlalchemy.orm import configure_mappers
from sqlmodel import Field, Relationship, SQLModel

__all__ = ["TABLES", "make_engine"]


def _now() -> datetime:
    return datetime.now(UTC)


# -- enumerations ------------------------------------------------------------------------


class DecoyKind(enum.StrEnum):
    HOST = "host"
    SERVICE = "service"
    FILE = "file"
    CREDENTIAL = "credential"
    DNS = "dns"
    CLOUD_KEY = "cloud-key"


class Protocol(enum.StrEnum):
    SSH = "ssh"
    TELNET = "telnet"
    HTTP = "http"
    HTTPS = "https"
    SMB = "smb"
    RDP = "rdp"
    MYSQL = "mysql"
    POSTGRES = "postgres"
    REDIS = "redis"
    MODBUS = "modbus"
    SIP = "sip"


class Transport(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class Interaction(enum.StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class SessionOutcome(enum.StrEnum):
    SCANNED = "scanned"
    AUTH_FAILED = "auth-failed"
    AUTHENTICATED = "authenticated"
    INTERACTIVE = "interactive"
    DROPPED_PAYLOAD = "dropped-payload"
    TIMED_OUT = "timed-out"


class ObservationKind(enum.StrEnum):
    CONNECT = "connect"
    AUTH_ATTEMPT = "auth-attempt"
    COMMAND = "command"
    FILE_DROP = "file-drop"
    SCAN = "scan"
    EXPLOIT = "exploit"
    EXFILTRATION = "exfiltration"
    LURE_TRIGGERED = "lure-triggered"


class FingerprintKind(enum.StrEnum):
    JA3 = "ja3"
    JA3S = "ja3s"
    JA4 = "ja4"
    HASSH = "hassh"
    HASSH_SERVER = "hassh-server"
    USER_AGENT = "user-agent"
    P0F = "p0f"


class Motivation(enum.StrEnum):
    FINANCIAL = "financial"
    ESPIONAGE = "espionage"
    HACKTIVISM = "hacktivism"
    BOTNET = "botnet"
    RESEARCH = "research"
    UNKNOWN = "unknown"


class CampaignStatus(enum.StrEnum):
    SUSPECTED = "suspected"
    ACTIVE = "active"
    DORMANT = "dormant"
    CLOSED = "closed"


class Severity(enum.StrEnum):
    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class AlertStatus(enum.StrEnum):
    NEW = "new"
    TRIAGED = "triaged"
    ESCALATED = "escalated"
    DISMISSED = "dismissed"
    RESOLVED = "resolved"


# -- where the decoys live ---------------------------------------------------------------


class Site(SQLModel, table=True):
    """A deployment location: a datacentre, an office VLAN, a cloud VPC."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True, index=True)
    region: str = Field(max_length=32, index=True)
    timezone: str = Field(default="UTC", max_length=48)
    network_cidr: str = Field(max_length=43)
    internet_facing: bool = Field(default=False)
    created_at: datetime = Field(default_factory=_now)

    sensors: list["Sensor"] = Relationship(back_populates="site")


class Sensor(SQLModel, table=True):
    """A host that runs decoys and ships what they see."""

    id: int | None = Field(default=None, primary_key=True)
    site_id: int = Field(foreign_key="site.id", index=True, ondelete="CASCADE")
    hostname: str = Field(max_length=253, unique=True)
    ip_address: str = Field(max_length=45, index=True)
    agent_version: str = Field(max_length=32)
    enabled: bool = Field(default=True, index=True)
    last_heartbeat: datetime | None = Field(default=None, index=True)
    clock_skew_ms: int = Field(default=0)

    site: Site | None = Relationship(back_populates="sensors")
    decoys: list["Decoy"] = Relationship(back_populates="sensor")

    @field_validator("ip_address")
    @classmethod
    def _valid_ip(cls, value: str) -> str:
        return str(ipaddress.ip_address(value))


class Decoy(SQLModel, table=True):
    """Something planted to be found: a fake host, a file, a credential, a DNS name."""

    __table_args__ = (UniqueConstraint("sensor_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    sensor_id: int = Field(foreign_key="sensor.id", index=True, ondelete="CASCADE")
    name: str = Field(max_length=128)
    kind: DecoyKind = Field(index=True)
    os_family: str | None = Field(default=None, max_length=32)
    persona: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    deployed_at: datetime = Field(default_factory=_now, index=True)
    retired_at: datetime | None = Field(default=None)

    sensor: Sensor | None = Relationship(back_populates="decoys")
    services: list["Service"] = Relationship(back_populates="decoy")


class Service(SQLModel, table=True):
    """A network service a decoy emulates, on one port."""

    __table_args__ = (
        UniqueConstraint("decoy_id", "port", "transport"),
        CheckConstraint("port > 0 AND port < 65536", name="service_port_range"),
    )

    id: int | None = Field(default=None, primary_key=True)
    decoy_id: int = Field(foreign_key="decoy.id", index=True, ondelete="CASCADE")
    protocol: Protocol = Field(index=True)
    transport: Transport = Field(default=Transport.TCP)
    port: int = Field(ge=1, le=65535)
    banner: str | None = Field(default=None, max_length=512)
    interaction: Interaction = Field(default=Interaction.LOW)
    tls: bool = Field(default=False)

    decoy: Decoy | None = Relationship(back_populates="services")


class Lure(SQLModel, table=True):
    """A breadcrumb that points an intruder at a decoy: a config line, a bookmark, a key."""

    id: int | None = Field(default=None, primary_key=True)
    decoy_id: int = Field(foreign_key="decoy.id", index=True, ondelete="CASCADE")
    kind: str = Field(max_length=32, index=True)
    placement: str = Field(max_length=1024)
    token: str = Field(max_length=64, unique=True)
    planted_at: datetime = Field(default_factory=_now)
    triggered_count: int = Field(default=0, ge=0)
    last_triggered_at: datetime | None = Field(default=None, index=True)


class HoneyCredential(SQLModel, table=True):
    """A username and secret that no legitimate user will ever type."""

    __table_args__ = (Index("ix_honeycredential_username_service", "username", "service_id"),)

    id: int | None = Field(default=None, primary_key=True)
    service_id: int | None = Field(default=None, foreign_key="service.id", index=True)
    lure_id: int | None = Field(default=None, foreign_key="lure.id", index=True)
    username: str = Field(max_length=128)
    secret_sha256: str = Field(max_length=64, unique=True)
    secret_hint: str | None = Field(default=None, max_length=16)
    issued_at: datetime = Field(default_factory=_now)
    revoked: bool = Field(default=False)


# -- who comes knocking ------------------------------------------------------------------


class AutonomousSystem(SQLModel, table=True):
    asn: int = Field(primary_key=True, ge=0, le=4_294_967_295)
    organisation: str = Field(max_length=256, index=True)
    country_code: str | None = Field(default=None, min_length=2, max_length=2)
    hosting_provider: bool = Field(default=False)
    updated_at: datetime = Field(default_factory=_now)


class Source(SQLModel, table=True):
    """A remote address that touched a decoy."""

    id: int | None = Field(default=None, primary_key=True)
    ip_address: str = Field(max_length=45, unique=True, index=True)
    asn: int | None = Field(default=None, foreign_key="autonomoussystem.asn", index=True)
    country_code: str | None = Field(default=None, max_length=2, index=True)
    reverse_dns: str | None = Field(default=None, max_length=253)
    is_tor_exit: bool = Field(default=False)
    is_vpn: bool = Field(default=False)
    reputation: Decimal = Field(default=Decimal("0.00"), max_digits=5, decimal_places=2)
    first_seen: datetime = Field(default_factory=_now, index=True)
    last_seen: datetime = Field(default_factory=_now, index=True)

    sessions: list["Session"] = Relationship(back_populates="source")

    @field_validator("ip_address")
    @classmethod
    def _valid_ip(cls, value: str) -> str:
        return str(ipaddress.ip_address(value))


class Session(SQLModel, table=True):
    """One connection from a source to a service, from SYN to close."""

    __table_args__ = (Index("ix_session_service_started", "service_id", "started_at"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    service_id: int = Field(foreign_key="service.id", index=True)
    source_id: int = Field(foreign_key="source.id", index=True)
    source_port: int = Field(ge=0, le=65535)
    started_at: datetime = Field(default_factory=_now, index=True)
    ended_at: datetime | None = Field(default=None)
    bytes_in: int = Field(default=0, ge=0)
    bytes_out: int = Field(default=0, ge=0)
    outcome: SessionOutcome = Field(default=SessionOutcome.SCANNED, index=True)
    client_version: str | None = Field(default=None, max_length=256)

    source: Source | None = Relationship(back_populates="sessions")
    observations: list["Observation"] = Relationship(back_populates="session")


class Observation(SQLModel, table=True):
    """Something a sensor saw: the raw event every other table is derived from."""

    __table_args__ = (Index("ix_observation_kind_time", "kind", "observed_at"),)

    id: int | None = Field(default=None, primary_key=True)
    session_id: uuid.UUID | None = Field(default=None, foreign_key="session.id", index=True)
    sensor_id: int = Field(foreign_key="sensor.id", index=True)
    observed_at: datetime = Field(default_factory=_now, index=True)
    kind: ObservationKind
    severity: int = Field(default=0, ge=0, le=10)
    summary: str = Field(max_length=512)
    raw: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)

    session: Session | None = Relationship(back_populates="observations")


class AuthAttempt(SQLModel, table=True):
    """A login tried against a decoy service; ``credential_id`` is set when it was bait."""

    id: int | None = Field(default=None, primary_key=True)
    session_id: uuid.UUID = Field(foreign_key="session.id", index=True)
    credential_id: int | None = Field(default=None, foreign_key="honeycredential.id",
                                      index=True)
    method: str = Field(default="password", max_length=32)
    username: str = Field(max_length=256, index=True)
    password: str | None = Field(default=None, max_length=256)
    public_key_fingerprint: str | None = Field(default=None, max_length=128)
    succeeded: bool = Field(default=False)
    attempted_at: datetime = Field(default_factory=_now)


class Command(SQLModel, table=True):
    """A command line typed into an interactive decoy."""

    __table_args__ = (UniqueConstraint("session_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    session_id: uuid.UUID = Field(foreign_key="session.id", index=True)
    seq: int = Field(ge=0)
    issued_at: datetime = Field(default_factory=_now)
    command_line: str = Field(max_length=8192)
    emulated_exit_status: int | None = Field(default=None)
    known_bad: bool = Field(default=False, index=True)


class Artifact(SQLModel, table=True):
    """A file an attacker uploaded or fetched, kept by content hash."""

    id: int | None = Field(default=None, primary_key=True)
    sha256: str = Field(max_length=64, unique=True, index=True)
    md5: str = Field(max_length=32, index=True)
    size: int = Field(ge=0)
    mime_type: str | None = Field(default=None, max_length=128)
    first_seen: datetime = Field(default_factory=_now)
    filename: str | None = Field(default=None, max_length=255)
    yara_matches: list[str] = Field(default_factory=list, sa_type=JSON)


class ArtifactDrop(SQLModel, table=True):
    """Where and when an artifact arrived: which session, which path, from which URL."""

    id: int | None = Field(default=None, primary_key=True)
    artifact_id: int = Field(foreign_key="artifact.id", index=True)
    session_id: uuid.UUID = Field(foreign_key="session.id", index=True)
    path: str = Field(max_length=4096)
    url: str | None = Field(default=None, max_length=2048)
    dropped_at: datetime = Field(default_factory=_now, index=True)


class Fingerprint(SQLModel, table=True):
    """A client or server fingerprint (JA3, HASSH, p0f, User-Agent) seen in sessions."""

    __table_args__ = (UniqueConstraint("kind", "digest"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: FingerprintKind = Field(index=True)
    digest: str = Field(max_length=128, index=True)
    value: str = Field(max_length=4096)
    label: str | None = Field(default=None, max_length=128)
    first_seen: datetime = Field(default_factory=_now)


class SessionFingerprint(SQLModel, table=True):
    session_id: uuid.UUID = Field(foreign_key="session.id", primary_key=True)
    fingerprint_id: int = Field(foreign_key="fingerprint.id", primary_key=True, index=True)
    seen_at: datetime = Field(default_factory=_now)


# -- who they are ------------------------------------------------------------------------


class Analyst(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=254, unique=True, index=True)
    display_name: str = Field(max_length=128)
    team: str = Field(default="soc", max_length=32, index=True)
    active: bool = Field(default=True)

    @field_validator("email")
    @classmethod
    def _valid_email(cls, value: str) -> str:
        _, address = email.utils.parseaddr(value)
        if "@" not in address:
            raise ValueError(f"not an e-mail address: {value!r}")
        return address.lower()


class Identity(SQLModel, table=True):
    """An attacker persona, clustered from sources, fingerprints and habits."""

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    handle: str = Field(max_length=64, unique=True)
    confidence: Decimal = Field(default=Decimal("0.50"), max_digits=3, decimal_places=2)
    first_seen: datetime = Field(default_factory=_now, index=True)
    last_seen: datetime = Field(default_factory=_now, index=True)
    notes: str | None = Field(default=None, max_length=4096)


class IdentityEvidence(SQLModel, table=True):
    """Why a source, fingerprint or credential use is tied to an identity, and how much."""

    id: int | None = Field(default=None, primary_key=True)
    identity_id: uuid.UUID = Field(foreign_key="identity.id", index=True, ondelete="CASCADE")
    source_id: int | None = Field(default=None, foreign_key="source.id", index=True)
    fingerprint_id: int | None = Field(default=None, foreign_key="fingerprint.id", index=True)
    auth_attempt_id: int | None = Field(default=None, foreign_key="authattempt.id")
    weight: Decimal = Field(default=Decimal("1.000"), max_digits=4, decimal_places=3)
    reason: str = Field(max_length=512)
    recorded_by_id: int | None = Field(default=None, foreign_key="analyst.id")
    recorded_at: datetime = Field(default_factory=_now)


class ThreatActor(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, unique=True)
    aliases: list[str] = Field(default_factory=list, sa_type=JSON)
    motivation: Motivation = Field(default=Motivation.UNKNOWN, index=True)
    suspected_origin: str | None = Field(default=None, max_length=2)
    mitre_group_id: str | None = Field(default=None, max_length=8, unique=True)


class Campaign(SQLModel, table=True):
    """A run of activity judged to share an operator and an objective."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, unique=True)
    objective: str | None = Field(default=None, max_length=512)
    status: CampaignStatus = Field(default=CampaignStatus.SUSPECTED, index=True)
    started_at: datetime = Field(default_factory=_now, index=True)
    ended_at: datetime | None = Field(default=None)
    lead_analyst_id: int | None = Field(default=None, foreign_key="analyst.id", index=True)

    attributions: list["Attribution"] = Relationship(back_populates="campaign")


class CampaignMember(SQLModel, table=True):
    campaign_id: int = Field(foreign_key="campaign.id", primary_key=True)
    identity_id: uuid.UUID = Field(foreign_key="identity.id", primary_key=True, index=True)
    role: str = Field(default="operator", max_length=32)
    joined_at: datetime = Field(default_factory=_now)


class Attribution(SQLModel, table=True):
    """An analyst's judgement that a campaign is a threat actor's, with a confidence."""

    __table_args__ = (
        CheckConstraint("confidence >= 0 AND confidence <= 1", name="attribution_confidence"),
    )

    id: int | None = Field(default=None, primary_key=True)
    campaign_id: int = Field(foreign_key="campaign.id", index=True)
    threat_actor_id: int = Field(foreign_key="threatactor.id", index=True)
    analyst_id: int = Field(foreign_key="analyst.id", index=True)
    confidence: Decimal = Field(max_digits=3, decimal_places=2, ge=0, le=1)
    assessed_at: datetime = Field(default_factory=_now)
    rationale: str = Field(max_length=8192)
    superseded_by_id: int | None = Field(default=None, foreign_key="attribution.id")

    campaign: Campaign | None = Relationship(back_populates="attributions")


class Technique(SQLModel, table=True):
    """A MITRE ATT&CK technique, keyed by its ID (``T1110.001``)."""

    id: str = Field(primary_key=True, max_length=16)
    name: str = Field(max_length=256)
    tactic: str = Field(max_length=64, index=True)
    url: str | None = Field(default=None, max_length=512)


class ObservationTechnique(SQLModel, table=True):
    observation_id: int = Field(foreign_key="observation.id", primary_key=True)
    technique_id: str = Field(foreign_key="technique.id", primary_key=True, index=True)
    confidence: Decimal = Field(default=Decimal("0.80"), max_digits=3, decimal_places=2)


class Alert(SQLModel, table=True):
    """What a human is asked to look at."""

    id: int | None = Field(default=None, primary_key=True)
    observation_id: int = Field(foreign_key="observation.id", index=True)
    campaign_id: int | None = Field(default=None, foreign_key="campaign.id", index=True)
    assignee_id: int | None = Field(default=None, foreign_key="analyst.id", index=True)
    severity: Severity = Field(default=Severity.MEDIUM, index=True)
    status: AlertStatus = Field(default=AlertStatus.NEW, index=True)
    dedup_key: str = Field(max_length=128, unique=True)
    raised_at: datetime = Field(default_factory=_now, index=True)
    closed_at: datetime | None = Field(default=None)


# -- API read models (pydantic only, no table) ------------------------------------------


class SessionSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    source_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    protocol: Protocol
    port: int
    started_at: datetime
    outcome: SessionOutcome
    commands: list[str] = []
    fingerprints: dict[FingerprintKind, str] = {}


class CampaignReport(BaseModel):
    campaign: str
    status: CampaignStatus
    identities: list[uuid.UUID]
    attributed_to: str | None = None
    confidence: Decimal | None = None
    techniques: list[str] = []
    sessions: list[SessionSummary] = []


configure_mappers()  # what the first query would otherwise pay in each worker

TABLES: tuple[str, ...] = tuple(sorted(SQLModel.metadata.tables))
# Round-trip the schemas once, as a service's start-up self-check would.
_SCHEMA_JSON = json.dumps(CampaignReport.model_json_schema())


def make_engine(url: str = "sqlite:///:memory:") -> Engine:
    """The engine a worker would open after the fork (never in the master: a pooled
    connection must not cross a fork). SQLAlchemy's asyncio extension needs greenlet,
    which prefork does not depend on, so the floor stays synchronous."""
    return create_engine(url)
