"""The cpu fleet's floor: SQLModel tables for what a deception network observes and what the
workers derive from it. Importing this module imports SQLModel, SQLAlchemy and pydantic
and builds every table's metadata; the master does it once, before forking.

Event times (``observed_at``, ``started_at``, ``first_seen``...) are unix seconds (UTC) as
REAL: the workers read hundreds of thousands of them per batch, and a float needs no
parsing. Administrative times are datetimes. Result tables are keyed so that writing the
same batch twice leaves one row: a cluster's id is its smallest observation id, a
campaign's its smallest cluster id, an identity's its smallest session id.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 1  # PRAGMA user_version of a database this code created


def _now() -> datetime:
    return datetime.now(UTC)


# -- the deception network -----------------------------------------------------------


class Site(SQLModel, table=True):
    __tablename__ = "sites"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=64)
    region: str = Field(max_length=32)
    created_at: datetime = Field(default_factory=_now)


class Sensor(SQLModel, table=True):
    __tablename__ = "sensors"
    id: int | None = Field(default=None, primary_key=True)
    site_id: int = Field(foreign_key="sites.id", index=True)
    hostname: str = Field(unique=True, max_length=128)
    version: str = Field(max_length=32)
    last_heartbeat: float | None = None


class Decoy(SQLModel, table=True):
    __tablename__ = "decoys"
    id: int | None = Field(default=None, primary_key=True)
    site_id: int = Field(foreign_key="sites.id", index=True)
    sensor_id: int | None = Field(default=None, foreign_key="sensors.id")
    name: str = Field(unique=True, max_length=64)
    address: str = Field(index=True, max_length=45)
    persona: str = Field(max_length=32)  # e.g. "plc", "nas", "jump-host"
    enabled: bool = True
    deployed_at: datetime = Field(default_factory=_now)


class Service(SQLModel, table=True):
    __tablename__ = "services"
    id: int | None = Field(default=None, primary_key=True)
    decoy_id: int = Field(foreign_key="decoys.id", index=True)
    protocol: str = Field(max_length=16)  # ssh, telnet, http, smb, modbus...
    port: int
    banner: str | None = Field(default=None, max_length=256)


class Lure(SQLModel, table=True):
    """A planted breadcrumb (file, credential, DNS record) that points at a decoy."""

    __tablename__ = "lures"
    id: int | None = Field(default=None, primary_key=True)
    decoy_id: int = Field(foreign_key="decoys.id", index=True)
    kind: str = Field(max_length=32)
    location: str = Field(max_length=256)
    planted_at: datetime = Field(default_factory=_now)


class Tag(SQLModel, table=True):
    __tablename__ = "tags"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=64)


class DecoyTag(SQLModel, table=True):
    __tablename__ = "decoy_tags"
    decoy_id: int = Field(foreign_key="decoys.id", primary_key=True)
    tag_id: int = Field(foreign_key="tags.id", primary_key=True)


# -- what attackers bring ------------------------------------------------------------


class Source(SQLModel, table=True):
    __tablename__ = "sources"
    id: int | None = Field(default=None, primary_key=True)
    address: str = Field(unique=True, max_length=45)
    network_id: int = Field(foreign_key="networks.id", index=True)
    first_seen: float
    last_seen: float


class Network(SQLModel, table=True):
    """A /24 (IPv4) or /48 (IPv6) that sources belong to."""

    __tablename__ = "networks"
    id: int | None = Field(default=None, primary_key=True)
    cidr: str = Field(unique=True, max_length=49)
    asn: int | None = Field(default=None, index=True)
    country: str | None = Field(default=None, max_length=2)


class Credential(SQLModel, table=True):
    __tablename__ = "credentials"
    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(index=True, max_length=128)
    secret: str = Field(max_length=256)  # the password tried, as received
    honeytoken: bool = False  # one the network planted in a lure
    # On a public wordlist: too common to link observations (the workers' stop-list).
    common: bool = Field(default=False, sa_column_kwargs={"server_default": "0"})


class Fingerprint(SQLModel, table=True):
    """A client fingerprint: SSH client banner + KEX order hash, JA4, HTTP header order..."""

    __tablename__ = "fingerprints"
    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16)
    value: str = Field(unique=True, max_length=128)
    # A stock client shared by unrelated sources: too common to link observations.
    common: bool = Field(default=False, sa_column_kwargs={"server_default": "0"})


class Payload(SQLModel, table=True):
    __tablename__ = "payloads"
    id: int | None = Field(default=None, primary_key=True)
    sha256: str = Field(unique=True, max_length=64)
    size: int
    mime: str | None = Field(default=None, max_length=64)


class Session(SQLModel, table=True):
    __tablename__ = "sessions"
    id: int | None = Field(default=None, primary_key=True)
    source_id: int = Field(foreign_key="sources.id", index=True)
    decoy_id: int = Field(foreign_key="decoys.id", index=True)
    service_id: int = Field(foreign_key="services.id")
    fingerprint_id: int | None = Field(default=None, foreign_key="fingerprints.id", index=True)
    started_at: float = Field(index=True)
    ended_at: float | None = None


class Observation(SQLModel, table=True):
    """One attacker action against a decoy."""

    __tablename__ = "observations"
    id: int | None = Field(default=None, primary_key=True)
    observed_at: float = Field(index=True)
    session_id: int = Field(foreign_key="sessions.id", index=True)
    source_id: int = Field(foreign_key="sources.id", index=True)
    decoy_id: int = Field(foreign_key="decoys.id", index=True)
    service_id: int = Field(foreign_key="services.id")
    action: str = Field(max_length=32)  # login, command, upload, scan...
    credential_id: int | None = Field(default=None, foreign_key="credentials.id", index=True)
    fingerprint_id: int | None = Field(default=None, foreign_key="fingerprints.id", index=True)
    payload_id: int | None = Field(default=None, foreign_key="payloads.id", index=True)


class Alert(SQLModel, table=True):
    __tablename__ = "alerts"
    id: int | None = Field(default=None, primary_key=True)
    observation_id: int = Field(foreign_key="observations.id", index=True)
    severity: str = Field(max_length=16)
    message: str = Field(max_length=512)
    acknowledged: bool = False


class IngestBatch(SQLModel, table=True):
    """A batch of events a sensor delivered; observations are appended in id order."""

    __tablename__ = "ingest_batches"
    id: int | None = Field(default=None, primary_key=True)
    sensor_id: int | None = Field(default=None, foreign_key="sensors.id")
    received_at: datetime = Field(default_factory=_now)
    first_observation_id: int
    last_observation_id: int


# -- what the workers derive ---------------------------------------------------------


class Cluster(SQLModel, table=True):
    """Observations linked by a shared source, credential, fingerprint or payload."""

    __tablename__ = "clusters"
    id: int = Field(primary_key=True)  # its smallest observation id
    observations: int
    sources: int
    decoys: int
    first_seen: float
    last_seen: float


class ObservationCluster(SQLModel, table=True):
    __tablename__ = "observation_clusters"
    observation_id: int = Field(foreign_key="observations.id", primary_key=True)
    cluster_id: int = Field(index=True)


class ClusterIndicator(SQLModel, table=True):
    """Which cluster an indicator (kernels.indicator_key) belongs to, for the next batch."""

    __tablename__ = "cluster_indicators"
    indicator: int = Field(primary_key=True)
    cluster_id: int = Field(index=True)


class Campaign(SQLModel, table=True):
    """Clusters that hit the same decoys or came from the same networks close in time."""

    __tablename__ = "campaigns"
    id: int = Field(primary_key=True)  # its smallest cluster id
    clusters: int
    observations: int
    first_seen: float
    last_seen: float


class CampaignMember(SQLModel, table=True):
    __tablename__ = "campaign_members"
    cluster_id: int = Field(primary_key=True)
    campaign_id: int = Field(foreign_key="campaigns.id", index=True)


class Identity(SQLModel, table=True):
    """Sessions that share a client fingerprint or a credential: one actor."""

    __tablename__ = "identities"
    id: int = Field(primary_key=True)  # its smallest session id
    sessions: int
    sources: int
    first_seen: float
    last_seen: float


class IdentityMember(SQLModel, table=True):
    __tablename__ = "identity_members"
    session_id: int = Field(foreign_key="sessions.id", primary_key=True)
    identity_id: int = Field(index=True)


class Attribution(SQLModel, table=True):
    """An identity seen acting from several sources: one actor behind many addresses."""

    __tablename__ = "attributions"
    identity_id: int = Field(foreign_key="identities.id", primary_key=True)
    sources: int
    sessions: int


class CredentialReuse(SQLModel, table=True):
    """A credential tried against at least ``min_targets`` distinct decoys."""

    __tablename__ = "credential_reuse"
    credential_id: int = Field(foreign_key="credentials.id", primary_key=True)
    decoys: int
    sources: int
    first_seen: float
    last_seen: float


class WorkerWatermark(SQLModel, table=True):
    """How far each worker has read; written in the same transaction as its results."""

    __tablename__ = "worker_watermarks"
    worker: str = Field(primary_key=True, max_length=64)
    last_id: int = 0
    batches: int = 0
    updated_at: float = 0.0


TABLES = sorted(SQLModel.metadata.tables)
