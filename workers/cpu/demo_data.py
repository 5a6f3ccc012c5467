"""A generated data set for the cpu fleet: what a deception network observed, with findings.

:func:`generate` fills the base tables of an empty database from one ``random.Random(seed)``
(same arguments, same content), in one transaction. :func:`feed` keeps appending live
observations to it, as the sensors of a running network would.

What the workers should find, planted among plenty of background noise:

- campaigns: groups of 5-30 sources from 2-4 shared /24 networks, hitting the same 2-4
  decoys within a few hours, with one client fingerprint and a short credential list;
- reused credentials: honeytokens (planted in lures) and leaked credentials, each tried
  against 2..10 distinct decoys;
- actors: one fingerprint and one or two credentials used from 10-40 sources spread over
  many networks and the whole time span (one actor rotating through proxies).

The noise is realistic, which matters for the workers: popular credentials (root:123456)
and common client fingerprints (stock OpenSSH, libssh) are shared by thousands of sources
and mean nothing on their own.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path

from sqlmodel import SQLModel

from prefork_workers.cpu import db  # imports models.py: its tables are in SQLModel.metadata
from prefork_workers.cpu.db import DatabaseError

SPAN_DAYS = 21  # generated observations cover this many days after ``start``
_DAY = 86_400.0
_HOUR = 3_600.0

# -- vocabulary ------------------------------------------------------------------------

_SITES = [("fra-dc1", "eu-central"), ("iad-dc2", "us-east"), ("sin-edge", "ap-southeast"),
          ("lyon-plant", "eu-west")]
_OT_SITE = 3  # plc and hmi decoys live at the plant

# persona -> (decoys of it, services). The first two services are always deployed and
# include one that takes a login, so every decoy can be the target of credential reuse.
_PERSONAS: dict[str, tuple[int, list[tuple[str, int, str | None]]]] = {
    "web": (10, [("http", 80, "Server: Apache/2.4.41 (Ubuntu)"),
                 ("https", 443, "Server: nginx/1.18.0"),
                 ("ssh", 22, "SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.6")]),
    "plc": (8, [("modbus", 502, None), ("telnet", 23, "PLC console - authorised users only"),
                ("s7", 102, "SIMATIC S7-1200, 6ES7 214-1AG40-0XB0"),
                ("http", 80, "Server: Boa/0.94.13")]),
    "jump-host": (6, [("ssh", 22, "SSH-2.0-OpenSSH_7.4"), ("rdp", 3389, None)]),
    "nas": (6, [("smb", 445, "Samba 4.15.13-Ubuntu"), ("http", 5000, "Server: nginx"),
                ("ssh", 22, "SSH-2.0-OpenSSH_8.2p1"), ("ftp", 21, "220 NAS FTP server ready")]),
    "db": (6, [("mysql", 3306, "5.7.42-log"), ("ssh", 22, "SSH-2.0-OpenSSH_8.4p1 Debian-5"),
               ("postgres", 5432, None)]),
    "camera": (6, [("http", 80, "Server: Hikvision-Webs"),
                   ("telnet", 23, "BusyBox v1.19.4 built-in shell (ash)"),
                   ("rtsp", 554, "RTSP/1.0 200 OK")]),
    "router": (5, [("telnet", 23, "User Access Verification"),
                   ("ssh", 22, "SSH-2.0-Cisco-1.25"), ("http", 80, "Server: mini_httpd/1.19")]),
    "windows-server": (5, [("smb", 445, None), ("rdp", 3389, None), ("mssql", 1433, None)]),
    "hmi": (4, [("vnc", 5900, "RFB 003.008"), ("http", 80, "Server: Microsoft-IIS/8.5"),
                ("rdp", 3389, None)]),
    "mail": (4, [("imap", 143, "* OK [CAPABILITY IMAP4rev1] Dovecot ready."),
                 ("smtp", 25, "220 mail.corp.example ESMTP Postfix"),
                 ("https", 443, "Server: Microsoft-IIS/10.0")]),
}
_LOGIN = frozenset({"ssh", "telnet", "ftp", "rdp", "smb", "mysql", "postgres", "mssql", "vnc",
                    "http", "https", "imap"})
_SHELL = frozenset({"ssh", "telnet"})
_QUERY = frozenset({"mysql", "postgres", "mssql"})
_ICS = frozenset({"modbus", "s7"})
_EXPLOIT = frozenset({"http", "https", "smb", "rtsp", "smtp"})
_FP_KIND = {"ssh": "hassh", "https": "ja4", "http": "ja4h"}  # protocols a client reveals

_TAGS = ["internet-facing", "internal", "dmz", "ot", "iot", "pci", "crown-jewel", "legacy",
         "windows", "linux", "high-interaction", "low-interaction"]
_PERSONA_TAGS = {"plc": ["ot"], "hmi": ["ot", "windows"], "camera": ["iot"],
                 "router": ["iot"], "windows-server": ["windows"], "web": ["dmz", "linux"],
                 "mail": ["dmz"], "jump-host": ["linux"], "nas": ["linux"], "db": ["linux"]}
_LURE_KINDS = ["file", "dns-record", "ssh-key", "browser-bookmark", "share-mapping"]
_LURE_HOSTS = ["WS-FIN-", "WS-HR-", "WS-ENG-", "SRV-APP-", "SRV-FILE-", "LT-SALES-"]
_LURE_PATHS = {
    "credential": ["C:\\Users\\{u}\\Documents\\passwords.txt", "/home/{u}/.pgpass",
                   "C:\\Users\\{u}\\Desktop\\vpn.txt", "/etc/backup/{u}.conf"],
    "file": ["\\\\{h}\\share\\network-diagram.vsdx", "C:\\Users\\{u}\\Documents\\plant-ips.xlsx"],
    "dns-record": ["{h}.corp.example TXT", "backup-{h}.corp.example A"],
    "ssh-key": ["/home/{u}/.ssh/id_rsa", "/root/.ssh/known_hosts"],
    "browser-bookmark": ["C:\\Users\\{u}\\AppData\\Local\\Google\\Chrome\\Bookmarks"],
    "share-mapping": ["HKCU\\Network\\Z ({h})"],
}

_USERS = ["root", "admin", "user", "test", "ubuntu", "pi", "oracle", "postgres", "guest",
          "support", "ftp", "git", "mysql", "administrator", "ubnt", "default", "service",
          "operator", "www", "deploy", "hadoop", "nagios", "steam", "jenkins", "backup", "sa",
          "cisco", "vagrant", "ec2-user", "centos", "debian", "tomcat", "zabbix", "elastic",
          "kali", "dev", "demo", "teste", "usuario", "supervisor"]
_PASSWORDS = ["123456", "password", "admin", "root", "12345678", "123456789", "1234", "qwerty",
              "12345", "111111", "1234567", "dragon", "123123", "abc123", "password1",
              "admin123", "root123", "toor", "changeme", "letmein", "raspberry", "ubnt",
              "default", "pass", "test", "test123", "P@ssw0rd", "Passw0rd!", "welcome",
              "1q2w3e4r", "qwerty123", "000000", "iloveyou", "monkey", "master", "support",
              "guest", "oracle", "postgres", "alpine", "vizxv", "xc3511", "888888", "666666",
              "user", "zaq12wsx", "Admin@123", "Aa123456", "secret", "system"]
# The head of every honeypot's credential statistics, most popular first.
_TOP = [("root", "123456"), ("admin", "admin"), ("root", "root"), ("root", "password"),
        ("admin", "123456"), ("pi", "raspberry"), ("root", "admin"), ("ubnt", "ubnt"),
        ("root", "toor"), ("user", "user"), ("test", "test"), ("admin", "password"),
        ("support", "support"), ("guest", "guest"), ("root", "12345"), ("oracle", "oracle"),
        ("postgres", "postgres"), ("root", "vizxv"), ("admin", "1234"), ("root", "1qaz2wsx")]
_WORDS = ["summer", "winter", "spring", "autumn", "company", "welcome", "dragon", "sunshine",
          "football", "monkey", "shadow", "master", "login", "server", "linux", "cisco",
          "hello", "secret", "office", "system", "princess", "qazwsx", "superman", "Huawei"]
_FIRST = ["j", "m", "a", "s", "k", "d", "r", "l", "t", "c", "p", "n", "e", "b"]
_LAST = ["smith", "mueller", "garcia", "martin", "rossi", "novak", "kowalski", "jensen",
         "dubois", "silva", "tanaka", "nguyen", "schmidt", "brown", "wilson", "moreau"]
_TOKEN_USERS = ["svc_backup", "svc_sql", "scada_eng", "vpn_admin", "it-helpdesk", "adm_jdoe",
                "deploy_bot", "veeam_svc", "hmi_operator", "sap_batch", "svc_monitor",
                "plant_maint", "ad_sync", "fw_admin"]
_SSH_CLIENTS = ["SSH-2.0-OpenSSH_7.4", "SSH-2.0-OpenSSH_8.2p1", "SSH-2.0-OpenSSH_8.9p1",
                "SSH-2.0-OpenSSH_9.6", "SSH-2.0-libssh_0.9.6", "SSH-2.0-libssh2_1.10.0",
                "SSH-2.0-paramiko_2.12.0", "SSH-2.0-paramiko_3.4.0", "SSH-2.0-Go",
                "SSH-2.0-PUTTY", "SSH-2.0-AsyncSSH_2.14.2", "SSH-2.0-JSCH-0.1.54",
                "SSH-2.0-ZGrab ZGrab SSH Survey", "SSH-2.0-dropbear_2022.83"]
_MIMES = ["application/x-executable", "text/x-shellscript", "application/x-dosexec",
          "application/zip", "application/octet-stream", "text/x-python",
          "application/x-sharedlib", None]
_COUNTRIES = ["CN", "US", "RU", "NL", "DE", "BR", "IN", "VN", "KR", "HK", "SG", "FR", "GB",
              "ID", "TW", "IR", "UA", "TR", "RO", "BG", "SC", "PA", "JP", "TH", "AR"]

# One step of a session: (seconds after the previous step, action, credential, payload).
Step = tuple[float, str, int | None, int | None]


def _stamp(t: float) -> str:
    """A unix time as SQLAlchemy stores a DATETIME in SQLite (naive UTC)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _hex(rng: random.Random, digits: int) -> str:
    return f"{rng.getrandbits(4 * digits):0{digits}x}"


def _zipf(n: int, s: float) -> list[float]:
    """Cumulative weights of ranks 0..n-1 with popularity 1/(rank+1)**s."""
    return list(itertools.accumulate((k + 1) ** -s for k in range(n)))


def _picker(rng: random.Random, items: Sequence[int], cum: list[float]) -> Callable[[], int]:
    """Draw from ``items`` by cumulative weights ``cum`` (bisect: O(log n) per draw)."""
    total, uniform, find, last = cum[-1], rng.random, bisect.bisect_right, len(items) - 1

    def pick() -> int:
        return items[min(find(cum, uniform() * total), last)]

    return pick


def _fingerprint_value(rng: random.Random, kind: str) -> str:
    if kind == "hassh":
        return f"{rng.choice(_SSH_CLIENTS)}|{_hex(rng, 32)}"
    if kind == "ja4":
        alpn = rng.choice(["h2", "h1", "00"])
        return f"t13d{rng.randint(8, 20):02d}{rng.randint(6, 18):02d}{alpn}_{_hex(rng, 12)}_" \
               f"{_hex(rng, 12)}"
    method = rng.choice(["ge", "ge", "po", "he"])
    head = f"{method}{rng.choice(['11', '20'])}{rng.choice('cn')}{rng.choice('rn')}" \
           f"{rng.randint(3, 14):02d}{rng.choice(['enus', '0000', 'zhcn', 'ruru'])}"
    return f"{head}_{_hex(rng, 12)}_{_hex(rng, 12)}_{_hex(rng, 12)}"


# -- sessions --------------------------------------------------------------------------


def _steps(rng: random.Random, style: str, protocol: str, cred: Callable[[], int],
           payload: Callable[[], int | None]) -> list[Step]:
    """What a background session of ``style`` does on ``protocol``, step by step."""
    uniform, randint = rng.uniform, rng.randint
    if style == "scan" or (style in ("brute", "bot") and protocol not in _LOGIN):
        return [(uniform(0.05, 2.0), "scan", None, None) for _ in range(randint(1, 3))]
    if style == "exploit":
        steps: list[Step] = [(uniform(0.1, 3.0), "scan", None, None)]
        if protocol in _ICS:
            steps += [(uniform(0.5, 20.0), "read", None, None) for _ in range(randint(2, 6))]
            if rng.random() < 0.1:
                steps.append((uniform(1.0, 30.0), "write", None, None))
        elif protocol in _EXPLOIT:
            steps += [(uniform(0.2, 5.0), "exploit", None, payload())
                      for _ in range(randint(1, 4))]
        return steps
    if style == "brute":
        # Short bursts mostly, a long dictionary run now and then.
        tries = min(60, 1 + int(rng.expovariate(1 / 6.0)))
        return [(uniform(0.3, 4.0), "login", cred(), None) for _ in range(tries)]
    # "bot": a few tries, in, then a scripted shell or queries; fetches and drops a payload.
    steps = [(uniform(0.5, 3.0), "login", cred(), None) for _ in range(randint(1, 3))]
    used = steps[-1][2]
    verb = "query" if protocol in _QUERY else "command"
    if protocol in _SHELL or protocol in _QUERY:
        steps += [(uniform(0.5, 12.0), verb, used, None) for _ in range(randint(1, 10))]
        if rng.random() < 0.6:
            steps.append((uniform(1.0, 20.0), "download", used, payload()))
            if rng.random() < 0.7:
                steps.append((uniform(1.0, 10.0), "upload", used, payload()))
                steps.append((uniform(0.5, 5.0), "command", used, None))
    return steps


class _Events:
    """Sessions and observations collected in any order; :meth:`rows` puts them in append
    order (ids ascending with time), which the workers' watermarks rely on."""

    def __init__(self) -> None:
        self.sessions: list[tuple[int, int, int, int | None]] = []  # source, decoy, svc, fp
        # (observed_at, session index, action, credential, payload, alert or None)
        self.observations: list[tuple[float, int, str, int | None, int | None,
                                      tuple[str, str] | None]] = []

    def add(self, source: int, decoy: int, service: int, fingerprint: int | None, t: float,
            steps: Sequence[Step], alert: tuple[str, str] | None = None,
            alert_step: int = 0) -> None:
        """One session from ``source`` to ``service`` on ``decoy``, starting at ``t``."""
        index = len(self.sessions)
        self.sessions.append((source, decoy, service, fingerprint))
        append = self.observations.append
        for n, (dt, action, credential, payload) in enumerate(steps):
            t += dt
            append((t, index, action, credential, payload, alert if n == alert_step else None))

    def rows(self, first_session: int, first_observation: int) -> tuple[
            list[tuple], list[tuple], list[tuple[int, str, str]], dict[int, list[float]]]:
        """(session rows, observation rows, alerts as (observation id, severity, message),
        {source: [first_seen, last_seen]}). Sessions left without observations are dropped."""
        observations = sorted(self.observations, key=itemgetter(0))
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        for t, index, *_ in observations:
            first.setdefault(index, t)
            last[index] = t
        order = sorted(first, key=lambda i: (first[i], i))
        session_id = {index: first_session + n for n, index in enumerate(order)}
        sessions = []
        seen: dict[int, list[float]] = {}
        for index in order:
            source, decoy, service, fingerprint = self.sessions[index]
            sessions.append((session_id[index], source, decoy, service, fingerprint,
                             first[index], last[index] + 0.5))
            span = seen.get(source)
            if span is None:
                seen[source] = [first[index], last[index]]
            else:
                span[0] = min(span[0], first[index])
                span[1] = max(span[1], last[index])
        rows = []
        alerts = []
        sessions_of = self.sessions
        for n, (t, index, action, credential, payload, alert) in enumerate(observations):
            source, decoy, service, fingerprint = sessions_of[index]
            rows.append((first_observation + n, t, session_id[index], source, decoy, service,
                         action, credential, fingerprint, payload))
            if alert is not None:
                alerts.append((first_observation + n, *alert))
        return sessions, rows, alerts, seen


# -- generate --------------------------------------------------------------------------


@dataclass
class _Network:
    id: int
    cidr: str
    asn: int | None
    country: str | None
    used: set[int]

    def address(self, rng: random.Random) -> str:
        """A new, unused host address in this network."""
        v6 = ":" in self.cidr
        while True:
            host = rng.getrandbits(16) if v6 else rng.randint(1, 254)
            if host not in self.used:
                self.used.add(host)
                prefix = self.cidr.split("/")[0]
                return f"{prefix}{host:x}" if v6 else f"{prefix.rsplit('.', 1)[0]}.{host}"


def _public_slash24(rng: random.Random, taken: set[str]) -> str:
    while True:
        a, b, c = rng.randint(1, 223), rng.randint(0, 255), rng.randint(0, 255)
        if a in (10, 127) or (a == 172 and 16 <= b < 32) or (a == 192 and b == 168) \
                or (a == 100 and 64 <= b < 128) or (a == 169 and b == 254):
            continue
        cidr = f"{a}.{b}.{c}.0/24"
        if cidr not in taken:
            taken.add(cidr)
            return cidr


class _Generator:
    """Builds every row of a data set in memory, from one random stream."""

    def __init__(self, rng: random.Random, observations: int, sources: int,
                 start: float) -> None:
        self.rng = rng
        self.n_observations = observations
        self.n_sources = sources
        self.start = start
        self.end = start + SPAN_DAYS * _DAY
        self.rows: dict[str, list[tuple]] = {}
        self.events = _Events()

    def build(self) -> dict[str, list[tuple]]:
        """Rows per table, each in its model's column order; planted findings before the
        noise, so that the noise gets whatever budget is left."""
        self._network_layout()
        self._credentials()
        self._fingerprints()
        self._payloads()
        self._plant_campaigns()
        self._background_networks()
        self._plant_reuse()
        self._plant_actors()
        self._background()
        self._finish()
        return self.rows

    # -- the deception network ---------------------------------------------------------

    def _network_layout(self) -> None:
        rng, start = self.rng, self.start
        self.rows["sites"] = [(i + 1, name, region, _stamp(start - 180 * _DAY + i * 7 * _DAY))
                              for i, (name, region) in enumerate(_SITES)]
        sensors = []
        for site in range(len(_SITES)):
            for n in range(2):
                sensors.append((len(sensors) + 1, site + 1,
                                f"sensor-{_SITES[site][0]}-{n + 1:02d}.corp.example",
                                rng.choice(["2.4.1", "2.4.3", "2.5.0"]),
                                self.end - rng.uniform(0, 60)))
        self.rows["sensors"] = sensors
        decoys, services, decoy_tags, lures = [], [], [], []
        addresses: set[str] = set()
        self.services: list[tuple[int, int, str]] = []  # (service id, decoy id, protocol)
        for persona, (count, offered) in _PERSONAS.items():
            for n in range(count):
                decoy = len(decoys) + 1
                site = _OT_SITE if persona in ("plc", "hmi") else rng.randrange(len(_SITES))
                while True:
                    address = f"10.{site + 1}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
                    if address not in addresses:
                        addresses.add(address)
                        break
                sensor = site * 2 + rng.randint(1, 2)
                deployed = start - rng.uniform(10, 150) * _DAY
                short = _SITES[site][0].split("-")[0]
                decoys.append((decoy, site + 1, sensor, f"{persona}-{short}-{n + 1:02d}",
                               address, persona, 1, _stamp(deployed)))
                extra = rng.sample(offered[2:], rng.randint(0, len(offered) - 2))
                for protocol, port, banner in offered[:2] + extra:
                    service = len(services) + 1
                    services.append((service, decoy, protocol, port, banner))
                    self.services.append((service, decoy, protocol))
                tags = _PERSONA_TAGS[persona] + rng.sample(_TAGS, rng.randint(0, 2))
                for tag in sorted({_TAGS.index(t) + 1 for t in tags}):
                    decoy_tags.append((decoy, tag))
                for _ in range(rng.randint(1, 2)):
                    kind = rng.choice(_LURE_KINDS)
                    lures.append(self._lure(len(lures) + 1, decoy, kind, rng.choice(_USERS),
                                            deployed))
        self.rows["decoys"] = decoys
        self.rows["services"] = services
        self.rows["tags"] = [(i + 1, name) for i, name in enumerate(_TAGS)]
        self.rows["decoy_tags"] = decoy_tags
        self.rows["lures"] = lures
        self.decoy_names = {row[0]: row[3] for row in decoys}
        self.by_protocol: dict[str, list[tuple[int, int, str]]] = {}
        for entry in self.services:
            self.by_protocol.setdefault(entry[2], []).append(entry)
        self.login_services = [s for s in self.services if s[2] in _LOGIN]

    def _lure(self, lure: int, decoy: int, kind: str, user: str, after: float) -> tuple:
        rng = self.rng
        host = f"{rng.choice(_LURE_HOSTS)}{rng.randint(1, 120):03d}"
        where = rng.choice(_LURE_PATHS[kind]).format(u=user, h=host.lower())
        return (lure, decoy, kind, f"{host}:{where}", _stamp(after + rng.uniform(0, 5) * _DAY))

    # -- what attackers bring ----------------------------------------------------------

    def _credentials(self) -> None:
        """A zipf-popular pool (its order is its popularity), then the planted ones."""
        rng = self.rng
        size = min(20_000, max(300, self.n_observations // 15))
        seen: set[tuple[str, str]] = set()
        creds: list[tuple] = []

        def add(user: str, secret: str, honeytoken: int = 0, common: int = 0) -> int | None:
            if (user, secret) in seen:
                return None
            seen.add((user, secret))
            creds.append((len(creds) + 1, user, secret, honeytoken, common))
            return len(creds)

        # Wordlist pairs are flagged common: the stop-list that keeps every scanner that
        # tries root:123456 from being linked into one cluster.
        for user, secret in _TOP:
            add(user, secret, common=1)
        while len(creds) < size:
            if rng.random() < 0.35 + 0.6 * (len(creds) < 400):
                # Dictionary pairs: the common head of the distribution.
                user = _USERS[int(len(_USERS) * rng.random() ** 2.5)]
                secret = _PASSWORDS[int(len(_PASSWORDS) * rng.random() ** 2)]
                add(user, secret, common=1)
            else:
                user = rng.choice(_USERS) if rng.random() < 0.7 else \
                    f"{rng.choice(_FIRST)}{rng.choice(_LAST)}"
                word = rng.choice(_WORDS)
                if rng.random() < 0.5:
                    word = word.capitalize()
                number = rng.randint(0, 9999) if rng.random() < 0.8 else rng.randint(1990, 2026)
                secret = f"{word}{number}{rng.choice(['', '', '!', '@', '#'])}"
                add(user, secret)
        self.pool = list(range(1, len(creds) + 1))
        self.pick_cred = _picker(rng, self.pool, _zipf(len(creds), 1.05))
        # Honeytokens: twice as many as get used; most lures are never touched.
        self.n_reuse = max(4, min(20, self.n_observations // 15_000))
        self.honeytokens: list[int] = []
        for n in range(self.n_reuse):
            user = f"{_TOKEN_USERS[n % len(_TOKEN_USERS)]}{n // len(_TOKEN_USERS) or ''}"
            secret = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz"
                                        "23456789!#%") for _ in range(14))
            credential = add(user, secret, 1)
            assert credential is not None  # the user names are unique
            self.honeytokens.append(credential)
        self.leaked = []
        while len(self.leaked) < self.n_reuse:
            credential = add(f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}",
                             f"{rng.choice(_WORDS).capitalize()}{rng.randint(2019, 2026)}!")
            if credential is not None:
                self.leaked.append(credential)
        self.credential_rows = creds
        self.add_credential = add

    def _fingerprints(self) -> None:
        rng = self.rng
        self.fingerprint_rows: list[tuple] = []
        self.values: set[str] = set()
        pools: dict[str, list[int]] = {}
        for kind, count in (("hassh", 140), ("ja4", 90), ("ja4h", 70)):
            # Stock clients, shared by thousands of unrelated sources: common.
            pools[kind] = [self._fingerprint(kind, common=1) for _ in range(count)]
        self.pick_fp = {kind: _picker(rng, ids, _zipf(len(ids), 1.2))
                        for kind, ids in pools.items()}

    def _fingerprint(self, kind: str, common: int = 0) -> int:
        while True:
            value = _fingerprint_value(self.rng, kind)
            if value not in self.values:
                self.values.add(value)
                self.fingerprint_rows.append((len(self.fingerprint_rows) + 1, kind, value,
                                              common))
                return len(self.fingerprint_rows)

    def _payloads(self) -> None:
        rng = self.rng
        count = max(60, min(800, self.n_observations // 400))
        self.payload_rows = [self._payload_row(n + 1) for n in range(count)]
        self.pick_payload = _picker(rng, list(range(1, count + 1)), _zipf(count, 0.9))

    def _payload_row(self, payload: int) -> tuple:
        rng = self.rng
        size = max(64, min(50_000_000, int(rng.lognormvariate(9.5, 2.0))))
        return (payload, _hex(rng, 64), size, rng.choice(_MIMES))

    def _new_payload(self) -> int:
        self.payload_rows.append(self._payload_row(len(self.payload_rows) + 1))
        return len(self.payload_rows)

    # -- the planted findings ----------------------------------------------------------

    def _plant_campaigns(self) -> None:
        """Groups of 5-30 sources from 2-4 shared /24s, on 2-4 decoys within hours."""
        rng = self.rng
        taken: set[str] = set()
        self.networks: list[_Network] = []
        asns = [(rng.randint(1_000, 399_999), rng.choice(_COUNTRIES)) for _ in range(90)]
        self.asns = asns
        # Planted sources never crowd out the noise: 60% at most, half of it campaigns.
        self.source_budget = int(self.n_sources * 0.6)
        budget = self.source_budget // 2
        self.source_specs: list[tuple[int, str]] = []  # (network index, address)
        wanted = max(3, min(12, self.n_observations // 25_000))
        for _ in range(wanted):
            members = min(rng.randint(5, 30), budget)
            if members < 5:
                break
            budget -= members
            self.source_budget -= members
            self._campaign(members, taken)
        self.taken = taken

    def _campaign(self, members: int, taken: set[str]) -> None:
        rng = self.rng
        asn, country = rng.choice(self.asns)
        nets = []
        for _ in range(rng.randint(2, 4)):
            if rng.random() < 0.3:
                asn, country = rng.choice(self.asns)
            nets.append(len(self.networks))
            self.networks.append(_Network(len(self.networks) + 1, _public_slash24(rng, taken),
                                          asn, country, set()))
        protocol = rng.choices(["ssh", "http", "https"], [6, 2, 2])[0]
        targets = self.by_protocol[protocol]
        targets = rng.sample(targets, min(len(targets), rng.randint(2, 4)))
        fingerprint = self._fingerprint(_FP_KIND[protocol])
        creds = [self.add_credential(rng.choice(_USERS), f"{rng.choice(_WORDS)}{_hex(rng, 4)}")
                 for _ in range(rng.randint(3, 8))]
        creds = [c for c in creds if c is not None]
        payload = self._new_payload()
        t0 = rng.uniform(self.start + _DAY, self.end - _DAY)
        window = rng.uniform(1, 4) * _HOUR
        alerted = False
        for _ in range(members):
            source = self._new_source(rng.choice(nets))
            for service, decoy, _protocol in targets:
                steps: list[Step] = [(rng.uniform(0.1, 2), "scan", None, None)]
                tried = rng.sample(creds, min(len(creds), rng.randint(2, 5)))
                steps += [(rng.uniform(0.5, 3), "login", c, None) for c in tried]
                if rng.random() < 0.6:
                    if protocol == "ssh":
                        steps += [(rng.uniform(1, 8), "command", tried[-1], None)
                                  for _ in range(rng.randint(1, 4))]
                        steps.append((rng.uniform(1, 10), "upload", tried[-1], payload))
                    else:
                        steps.append((rng.uniform(1, 10), "exploit", tried[-1], payload))
                alert = None
                if not alerted and steps[-1][3] == payload:
                    alerted = True
                    alert = ("medium", f"payload {self.payload_rows[payload - 1][1][:16]} "
                                       f"delivered to {self.decoy_names[decoy]}")
                self.events.add(source, decoy, service, fingerprint,
                                t0 + rng.uniform(0, window), steps, alert, len(steps) - 1)

    def _new_source(self, network: int) -> int:
        """Reserve a source (ids are assigned later, shuffled) in ``self.networks[network]``."""
        self.source_specs.append((network, self.networks[network].address(self.rng)))
        return -len(self.source_specs)  # a placeholder, mapped to its id in _finish()

    def _background_networks(self) -> None:
        rng = self.rng
        count = max(20, self.n_sources // 4)
        weights = [rng.paretovariate(1.2) for _ in range(len(self.asns))]
        self.bg_networks = []
        for _ in range(count):
            asn, country = rng.choices(self.asns, weights)[0]
            if rng.random() < 0.05:
                cidr = f"2a0{rng.randint(1, 9)}:{_hex(rng, 4)}:{_hex(rng, 4)}::/48"
                if cidr in self.taken:
                    continue
                self.taken.add(cidr)
            else:
                cidr = _public_slash24(rng, self.taken)
            if rng.random() < 0.01:
                asn, country = None, None  # not every network resolves
            self.bg_networks.append(len(self.networks))
            self.networks.append(_Network(len(self.networks) + 1, cidr, asn, country, set()))
        # Some networks (hosting providers) hold far more attackers than others.
        self.bg_network_weights = list(itertools.accumulate(
            rng.paretovariate(1.0) for _ in self.bg_networks))

    def _bg_source(self) -> int:
        rng = self.rng
        while True:
            n = bisect.bisect_right(self.bg_network_weights,
                                    rng.random() * self.bg_network_weights[-1])
            network = self.bg_networks[min(n, len(self.bg_networks) - 1)]
            if len(self.networks[network].used) < 200:
                return self._new_source(network)

    def _plant_reuse(self) -> None:
        """Honeytokens and leaked credentials, each tried against 2..10 distinct decoys."""
        rng = self.rng
        self.reuse_sources: list[int] = []
        by_decoy: dict[int, list[tuple[int, int, str]]] = {}
        for entry in self.login_services:
            by_decoy.setdefault(entry[1], []).append(entry)
        lure_rows = self.rows["lures"]
        for credential in self.honeytokens + self.leaked:
            honeytoken = credential in self.honeytokens
            decoys = rng.sample(sorted(by_decoy), rng.randint(2, min(10, len(by_decoy))))
            user = self.credential_rows[credential - 1][1]
            if honeytoken:
                lure_rows.append(self._lure(len(lure_rows) + 1, decoys[0], "credential",
                                            user, self.start - 30 * _DAY))
            if rng.random() < 0.25 and honeytoken and credential != self.honeytokens[0]:
                continue  # a lure nobody found (the first one is always found)
            sources = []
            for _ in range(rng.randint(1, 3)):
                if self.source_budget > 0 or not self.reuse_sources:
                    sources.append(self._bg_source())
                    self.source_budget -= 1
                else:
                    sources.append(rng.choice(self.reuse_sources))
            self.reuse_sources += sources
            t = rng.uniform(self.start, self.end - 3 * _DAY)
            for n, decoy in enumerate(decoys):
                service, _decoy, protocol = rng.choice(by_decoy[decoy])
                source = sources[n % len(sources)]
                steps: list[Step] = [(0.0, "login", credential, None)]
                if protocol in _SHELL:
                    steps += [(rng.uniform(1, 15), "command", credential, None)
                              for _ in range(rng.randint(1, 6))]
                alert = ("high", f"honeytoken {user} used on {self.decoy_names[decoy]}") \
                    if honeytoken else None
                fp = self.pick_fp[_FP_KIND[protocol]]() if protocol in _FP_KIND else None
                self.events.add(source, decoy, service, fp, t, steps, alert)
                t += rng.uniform(0.2, 12) * _HOUR

    def _plant_actors(self) -> None:
        """One fingerprint and one or two credentials from 10-40 sources in many networks."""
        rng = self.rng
        ssh = self.by_protocol["ssh"]
        for _ in range(max(2, min(5, self.n_observations // 60_000))):
            members = min(rng.randint(10, 40), self.source_budget)
            if members < 10:
                break
            self.source_budget -= members
            fingerprint = self._fingerprint("hassh")
            creds = [self.add_credential(rng.choice(_USERS), f"{_hex(rng, 10)}!")
                     for _ in range(rng.randint(1, 2))]
            creds = [c for c in creds if c is not None]
            payload = self._new_payload()
            networks = rng.sample(self.bg_networks, min(members, len(self.bg_networks)))
            for n in range(members):
                source = self._new_source(networks[n % len(networks)])
                for _ in range(rng.randint(1, 3)):
                    service, decoy, _protocol = rng.choice(ssh)
                    credential = rng.choice(creds)
                    steps: list[Step] = [(0.0, "login", credential, None)]
                    steps += [(rng.uniform(1, 20), "command", credential, None)
                              for _ in range(rng.randint(2, 8))]
                    if rng.random() < 0.3:
                        steps.append((rng.uniform(2, 30), "upload", credential, payload))
                    self.events.add(source, decoy, service, fingerprint,
                                    rng.uniform(self.start, self.end - _HOUR), steps)

    # -- noise -------------------------------------------------------------------------

    def _background(self) -> None:
        """Scanners, brute-forcers, bots and exploit kits until the budget is spent."""
        rng = self.rng
        events = self.events
        budget = self.n_observations - len(events.observations)
        # With very few sources the planted ones are all there is; they make noise too.
        sources = [self._bg_source() for _ in range(self.n_sources - len(self.source_specs))] \
            or [-(n + 1) for n in range(len(self.source_specs))]
        count = len(sources)
        styles = rng.choices(["scan", "brute", "bot", "exploit"], [46, 24, 16, 14], k=count)
        # Each source is active for a while (a day or two, a few for some), not all along.
        # Windows overlap the span's edges, and sessions outside it are not written, so
        # traffic neither ramps up over the first days nor piles up at the edges.
        windows = []
        for _ in range(count):
            length = 60 + rng.expovariate(1 / (1.5 * _DAY))
            windows.append((rng.uniform(self.start - length, self.end - 60), length))
        first, last = self.start, self.end - 60
        tools: dict[int, dict[str, int]] = {}
        services_for = {
            "scan": self.services,
            "brute": self.login_services,
            "bot": [s for s in self.services if s[2] in _SHELL | _QUERY],
            "exploit": [s for s in self.services if s[2] in _EXPLOIT | _ICS],
        }
        pick_source = _picker(rng, list(range(count)), _zipf(count, 0.7))
        first_pass = list(range(count))
        rng.shuffle(first_pass)
        pick_cred, pick_payload, pick_fp = self.pick_cred, self.pick_payload, self.pick_fp
        uniform, choice = rng.uniform, rng.choice
        n = 0
        while budget > 0:
            index = first_pass[n] if n < count else pick_source()
            n += 1
            begin, length = windows[index]
            t = begin + uniform(0, length)
            if not first <= t <= last:
                if n > count:
                    continue
                t = min(max(t, first), last)  # every source shows up at least once
            style = styles[index]
            service, decoy, protocol = choice(services_for[style])
            steps = _steps(rng, style, protocol, pick_cred, pick_payload)[:budget]
            budget -= len(steps)
            fingerprint = None
            kind = _FP_KIND.get(protocol)
            if kind is not None and rng.random() < 0.9:  # some drop before the handshake
                tool = tools.setdefault(index, {})
                fingerprint = tool.get(kind)
                if fingerprint is None:
                    fingerprint = tool[kind] = pick_fp[kind]()
            alert = None
            if steps[-1][1] == "write":
                alert = ("critical", f"modbus write on {self.decoy_names[decoy]}")
            events.add(sources[index], decoy, service, fingerprint, t, steps, alert,
                       len(steps) - 1)

    def _finish(self) -> None:
        """Source ids (shuffled, so that no id range gives a finding away), then rows."""
        rng = self.rng
        order = list(range(len(self.source_specs)))
        rng.shuffle(order)
        source_id = {-(spec + 1): n + 1 for n, spec in enumerate(order)}
        events = self.events
        events.sessions = [(source_id[s], d, v, f) for s, d, v, f in events.sessions]
        if len(events.observations) > self.n_observations:
            # Only when asked for fewer observations than the findings need.
            events.observations.sort(key=itemgetter(0))
            del events.observations[self.n_observations:]
        sessions, observations, alerts, seen = events.rows(1, 1)
        sources = []
        for n, spec in enumerate(order):
            network, address = self.source_specs[spec]
            span = seen.get(n + 1)
            if span is None:  # a source whose traffic the budget did not reach
                t = rng.uniform(self.start, self.end)
                span = [t, t]
            sources.append((n + 1, address, self.networks[network].id, span[0], span[1]))
        self.rows["networks"] = [(net.id, net.cidr, net.asn, net.country)
                                 for net in self.networks]
        self.rows["sources"] = sources
        self.rows["credentials"] = self.credential_rows
        self.rows["fingerprints"] = self.fingerprint_rows
        self.rows["payloads"] = self.payload_rows
        self.rows["sessions"] = sessions
        self.rows["observations"] = observations
        self.rows["alerts"] = [(n + 1, observation, severity, message, 0)
                               for n, (observation, severity, message) in enumerate(alerts)]
        # A batch per hour of observations, as the collector delivered them.
        batches = []
        first = 0
        for n in range(1, len(observations) + 1):
            if n == len(observations) or \
                    observations[n][1] // _HOUR != observations[first][1] // _HOUR:
                batches.append((len(batches) + 1, None,
                                _stamp(observations[n - 1][1] + rng.uniform(1, 30)),
                                observations[first][0], observations[n - 1][0]))
                first = n
        self.rows["ingest_batches"] = batches


# The tables generate() fills, in an insertion order that respects foreign keys: parents
# first. Each row's values come in its model's column order (models.py).
_TABLES = ("sites", "sensors", "decoys", "services", "lures", "tags", "decoy_tags", "networks",
           "sources", "credentials", "fingerprints", "payloads", "sessions", "observations",
           "alerts", "ingest_batches")


def _insert(connection: sqlite3.Connection, table: str, rows: Sequence[tuple]) -> None:
    columns = SQLModel.metadata.tables[table].columns.keys()
    connection.executemany(f"INSERT INTO {table} ({', '.join(columns)}) "
                           f"VALUES ({', '.join('?' * len(columns))})", rows)


def _error(path: Path, exc: sqlite3.Error) -> DatabaseError:
    text = " ".join(str(exc).split())
    if "locked" in text or "busy" in text:
        return DatabaseError(f"{path} is locked by another process: {text}")
    return DatabaseError(f"{path}: {text}")


@contextmanager
def _connection(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection in autocommit mode (transactions are explicit), closed on exit."""
    try:
        connection = sqlite3.connect(path, timeout=db.BUSY_TIMEOUT, isolation_level=None)
    except sqlite3.Error as exc:
        raise _error(path, exc) from None
    try:
        connection.execute("PRAGMA foreign_keys = ON")
        yield connection
    except sqlite3.Error as exc:
        raise _error(path, exc) from None
    finally:
        connection.close()


def generate(path: Path, *, observations: int = 300_000, sources: int = 3_000, seed: int = 1,
             start: float = 1_767_225_600.0, if_empty: bool = False) -> dict[str, int]:
    """Fill the empty database at ``path`` with a generated data set; return rows per table.

    Deterministic: the same arguments give the same content. Exactly ``observations``
    observations and ``sources`` sources, over :data:`SPAN_DAYS` days from ``start`` (unix
    seconds). All or nothing: one transaction, rolled back on any error. A database that
    already holds observations is refused (:class:`DatabaseError`), or, with
    ``if_empty=True``, left alone and ``{}`` returned. ``ValueError`` for sizes < 1.
    """
    if observations < 1 or sources < 1:
        raise ValueError("observations and sources must be >= 1")
    db.prepare_database(path)
    with _connection(path) as connection:
        # A demo data set, loaded in one transaction and easy to make again: no fsyncs.
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("PRAGMA cache_size = -131072")  # 128 MiB: index pages stay hot
        connection.execute("BEGIN IMMEDIATE")
        try:
            existing = connection.execute("SELECT count(*) FROM observations").fetchone()[0]
            if existing and if_empty:
                connection.execute("ROLLBACK")
                return {}
            if existing:
                raise DatabaseError(f"{path} already holds {existing} observations; generate "
                                    f"writes only into an empty database (--if-empty skips)")
            if connection.execute("SELECT count(*) FROM sites").fetchone()[0]:
                raise DatabaseError(f"{path} has a deception network but no observations; "
                                    f"generate into a new file")
            rows = _Generator(random.Random(seed), observations, sources, start).build()
            for table in _TABLES:
                _insert(connection, table, rows[table])
            connection.execute("COMMIT")
        except BaseException:
            db.rollback(connection)
            raise
    return {table: len(rows[table]) for table in _TABLES}


# -- feed ------------------------------------------------------------------------------


class _Feeder:
    """What feed() knows about the database, read once; ids are re-read in each write."""

    def __init__(self, connection: sqlite3.Connection, path: Path, rng: random.Random) -> None:
        self.connection = connection
        self.rng = rng
        fetch = connection.execute
        self.services = [tuple(row) for row in fetch(
            "SELECT id, decoy_id, protocol FROM services ORDER BY id")]
        sources = fetch("SELECT id, network_id FROM sources ORDER BY id").fetchall()
        if not self.services or not sources:
            raise DatabaseError(f"{path} has no deception network to feed; run generate first")
        self.sources = [row[0] for row in sources]
        self.networks = [tuple(row) for row in fetch(
            "SELECT id, cidr FROM networks WHERE cidr NOT LIKE '%:%' ORDER BY id")]
        self.decoy_names = dict(fetch("SELECT id, name FROM decoys").fetchall())
        # The planted findings stay recognisable: background traffic never borrows their
        # fingerprints or credentials. Campaigns: a fingerprint from 5+ sources in at most
        # 4 networks that stays on at most 4 decoys. Actors: a fingerprint from 10+ sources
        # that only ever logs in with one or two credentials.
        self.campaigns = [row[0] for row in fetch(
            "SELECT s.fingerprint_id FROM sessions s JOIN sources n ON n.id = s.source_id "
            "WHERE s.fingerprint_id IS NOT NULL GROUP BY s.fingerprint_id "
            "HAVING count(DISTINCT s.source_id) >= 5 AND count(DISTINCT s.decoy_id) <= 4 "
            "AND count(DISTINCT n.network_id) <= 4 ORDER BY 1")]
        actors = [row[0] for row in fetch(
            "SELECT fingerprint_id FROM observations WHERE fingerprint_id IS NOT NULL "
            "GROUP BY fingerprint_id HAVING count(DISTINCT source_id) >= 10 "
            "AND count(credential_id) > 0 AND count(DISTINCT credential_id) <= 2")]
        planted = sorted(set(self.campaigns) | set(actors))
        connection.execute("CREATE TEMP TABLE IF NOT EXISTS feed_planted (id INTEGER)")
        connection.execute("DELETE FROM feed_planted")
        connection.executemany("INSERT INTO feed_planted VALUES (?)", [(f,) for f in planted])
        usage = fetch(
            "SELECT credential_id, count(*) FROM observations WHERE credential_id IS NOT NULL "
            "AND credential_id NOT IN (SELECT id FROM credentials WHERE honeytoken) "
            "AND credential_id NOT IN (SELECT credential_id FROM observations WHERE "
            "fingerprint_id IN (SELECT id FROM feed_planted) AND credential_id IS NOT NULL) "
            "GROUP BY credential_id ORDER BY credential_id").fetchall()
        if not usage:
            usage = fetch("SELECT id, 1 FROM credentials ORDER BY id").fetchall()
        if not usage:
            raise DatabaseError(f"{path} has no credentials to feed; run generate first")
        self.pick_cred = _picker(rng, [row[0] for row in usage],
                                 list(itertools.accumulate(row[1] for row in usage)))
        self.pick_fp: dict[str, Callable[[], int]] = {}
        for kind in ("hassh", "ja4", "ja4h"):
            rows = fetch("SELECT f.id, count(s.id) + 1 FROM fingerprints f LEFT JOIN sessions s"
                         " ON s.fingerprint_id = f.id WHERE f.kind = ? AND f.id NOT IN "
                         "(SELECT id FROM feed_planted) GROUP BY f.id ORDER BY f.id",
                         (kind,)).fetchall()
            if rows:
                self.pick_fp[kind] = _picker(rng, [r[0] for r in rows],
                                             list(itertools.accumulate(r[1] for r in rows)))
        payloads = [row[0] for row in fetch("SELECT id FROM payloads ORDER BY id")]
        self.payloads: list[int | None] = payloads or [None]
        self.styles = ["scan", "brute", "bot", "exploit"]
        self.services_for = {
            "scan": self.services,
            "brute": [s for s in self.services if s[2] in _LOGIN],
            "bot": [s for s in self.services if s[2] in _SHELL | _QUERY] or self.services,
            "exploit": [s for s in self.services if s[2] in _EXPLOIT | _ICS] or self.services,
        }
        self.services_for["brute"] = self.services_for["brute"] or self.services

    def pick_payload(self) -> int | None:
        return self.rng.choice(self.payloads)

    def write(self, count: int, begin: float, end: float) -> tuple[int, int]:
        """Append ``count`` observations timed in [begin, end] in one IMMEDIATE transaction;
        return (observations written, last observation id)."""
        connection, rng = self.connection, self.rng
        connection.execute("BEGIN IMMEDIATE")
        try:
            top = {table: connection.execute(f"SELECT coalesce(max(id), 0) FROM {table}")
                   .fetchone()[0]
                   for table in ("observations", "sessions", "sources", "credentials",
                                 "fingerprints", "alerts", "ingest_batches")}
            latest = connection.execute("SELECT max(observed_at) FROM observations") \
                .fetchone()[0]
            if latest is not None:  # keep ids ascending with time, even if clocks disagree
                begin, end = max(begin, latest), max(end, latest)
            events = _Events()
            new_sources: list[tuple] = []
            new_credentials: list[tuple] = []
            new_fingerprints: list[tuple] = []
            budget = count
            if self.campaigns and rng.random() < 0.03:
                budget -= self._campaign_burst(events, budget, begin, end)
            while budget > 0:
                style = rng.choices(self.styles, [46, 24, 16, 14])[0]
                service, decoy, protocol = rng.choice(self.services_for[style])
                source = rng.choice(self.sources)
                if rng.random() < 0.03 and self.networks:
                    source = self._new_source(top, new_sources, end)
                cred = self.pick_cred
                if rng.random() < 0.01:
                    top["credentials"] += 1
                    new_credentials.append((top["credentials"], rng.choice(_USERS),
                                            f"{rng.choice(_WORDS)}{rng.randint(0, 99999)}", 0,
                                            0))
                    # The new one first, then the usual ones (iter(f, None) calls f forever).
                    cred = itertools.chain([top["credentials"]],
                                           iter(self.pick_cred, None)).__next__
                steps = _steps(rng, style, protocol, cred, self.pick_payload)[:budget]
                budget -= len(steps)
                kind = _FP_KIND.get(protocol)
                fingerprint = None
                if kind in self.pick_fp:
                    if rng.random() < 0.01:
                        top["fingerprints"] += 1
                        fingerprint = top["fingerprints"]
                        new_fingerprints.append((fingerprint, kind,
                                                 _fingerprint_value(rng, kind), 0))
                    else:
                        fingerprint = self.pick_fp[kind]()
                span = sum(step[0] for step in steps)
                alert = None
                if steps[-1][1] == "write":
                    alert = ("critical", f"modbus write on {self.decoy_names.get(decoy, decoy)}")
                events.add(source, decoy, service, fingerprint, begin, steps, alert,
                           len(steps) - 1)
                # Squeeze the session into this write's interval: the steps keep their order.
                scale = (end - begin) / span if span > end - begin else 1.0
                offset = rng.uniform(0, max(0.0, (end - begin) - span * scale))
                observations = events.observations
                first = len(observations) - len(steps)
                for n in range(first, len(observations)):
                    t, *rest = observations[n]
                    observations[n] = (begin + offset + (t - begin) * scale, *rest)
            sessions, rows, alerts, seen = events.rows(top["sessions"] + 1,
                                                       top["observations"] + 1)
            _insert(connection, "sources", new_sources)
            _insert(connection, "credentials", new_credentials)
            _insert(connection, "fingerprints", new_fingerprints)
            _insert(connection, "sessions", sessions)
            _insert(connection, "observations", rows)
            _insert(connection, "alerts", [(top["alerts"] + n + 1, *alert, 0)
                                           for n, alert in enumerate(alerts)])
            connection.executemany(
                "UPDATE sources SET first_seen = min(first_seen, ?), "
                "last_seen = max(last_seen, ?) WHERE id = ?",
                [(first, last, source) for source, (first, last) in seen.items()])
            if rows:
                _insert(connection, "ingest_batches", [(top["ingest_batches"] + 1, None,
                                                        _stamp(time.time()), rows[0][0],
                                                        rows[-1][0])])
            connection.execute("COMMIT")
        except BaseException:
            db.rollback(connection)
            raise
        self.sources += [row[0] for row in new_sources]
        return len(rows), rows[-1][0] if rows else top["observations"]

    def _new_source(self, top: dict[str, int], new: list[tuple], now: float) -> int:
        """A source never seen before, in a known IPv4 network."""
        rng = self.rng
        while True:
            network, cidr = rng.choice(self.networks)
            address = f"{cidr.split('.0/')[0]}.{rng.randint(1, 254)}"
            taken = self.connection.execute("SELECT 1 FROM sources WHERE address = ?",
                                            (address,)).fetchone()
            if taken is None and all(row[1] != address for row in new):
                top["sources"] += 1
                new.append((top["sources"], address, network, now, now))
                return top["sources"]

    def _campaign_burst(self, events: _Events, budget: int, begin: float, end: float) -> int:
        """A known campaign strikes again: its fingerprint, decoys, sources and credentials."""
        rng, fetch = self.rng, self.connection.execute
        fingerprint = rng.choice(self.campaigns)
        targets = fetch("SELECT DISTINCT decoy_id, service_id FROM sessions "
                        "WHERE fingerprint_id = ? ORDER BY decoy_id, service_id",
                        (fingerprint,)).fetchall()
        sources = [row[0] for row in fetch(
            "SELECT DISTINCT source_id FROM sessions WHERE fingerprint_id = ? ORDER BY 1",
            (fingerprint,))]
        creds = [row[0] for row in fetch(
            "SELECT DISTINCT credential_id FROM observations WHERE fingerprint_id = ? "
            "AND credential_id IS NOT NULL ORDER BY 1 LIMIT 10", (fingerprint,))]
        if not creds:
            return 0
        written = 0
        for source in rng.sample(sources, min(len(sources), rng.randint(2, 5))):
            for decoy, service in targets:
                steps = [(rng.uniform(0, end - begin) / 4, "login", rng.choice(creds), None)
                         for _ in range(rng.randint(1, 3))][:budget - written]
                if not steps:
                    return written
                events.add(source, decoy, service, fingerprint, begin, steps)
                written += len(steps)
        return written


def feed(path: Path, *, rate: float = 50.0, duration: float | None = None,
         seed: int | None = None) -> int:
    """Append live observations to a generated database at about ``rate`` per second.

    One ``BEGIN IMMEDIATE`` transaction per second or so, ids continuing after the current
    maximum, ``observed_at`` the time of writing. Runs for ``duration`` seconds (forever if
    None) or until SIGINT/SIGTERM, finishing the transaction under way; returns the
    number of observations added. Progress goes to stderr after the first batch, then
    every ~5 s.
    """
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError("rate must be a finite number > 0")
    if duration is not None and not duration >= 0:
        raise ValueError("duration must be >= 0")
    db.prepare_database(path)
    stop = threading.Event()
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    added = 0
    try:
        with _connection(path) as connection:
            connection.execute("PRAGMA synchronous = NORMAL")  # durable enough under WAL
            feeder = _Feeder(connection, path, random.Random(seed))
            started = last_write = last_report = time.time()
            deadline = math.inf if duration is None else started + duration
            reported, last_id = 0, 0
            while True:
                # Event.wait, not a sleep loop: the signal handler's stop.set() ends it.
                if stop.wait(max(0.0, min(last_write + 1.0, deadline) - time.time())):
                    break
                now = time.time()
                due = int(rate * (min(now, deadline) - started)) - added
                if due > 0:
                    written, last_id = feeder.write(due, last_write, now)
                    added += written
                last_write = now
                # Report the first batch at once (the user sees writes land), then every 5 s.
                if now - last_report >= 5.0 or (added and not reported):
                    print(f"prefork-cpu feed: {added} observations added "
                          f"({(added - reported) / (now - last_report):.0f}/s), "
                          f"last id {last_id}", file=sys.stderr, flush=True)
                    last_report, reported = now, added
                if now >= deadline:
                    break
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
    return added
