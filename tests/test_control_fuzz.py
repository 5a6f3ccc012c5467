"""The control socket against hostile clients, on a real master (issue 15).

One master with one worker is fed random and adversarial requests (seeded, so a failure
can be replayed with ``PREFORK_FUZZ_SEED``), then crowded with connections, while its
worker is SIGKILLed again and again; the master must go on supervising (the worker comes
back), answer ``status`` correctly and stop cleanly. Nothing sleeps: every wait is on a
socket, the events FIFO or the master's log.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from conftest import WAIT, Events, MasterProcess
from prefork.client import request
from prefork.control import MAX_CONNECTIONS, MAX_REQUEST
from prefork.paths import socket_path

SEED = int(os.environ.get("PREFORK_FUZZ_SEED", "15"))
REQUESTS = 4000  # random requests, one connection each (about 1 s)
KILLS = 3  # times the worker is SIGKILLed while the requests go on (the start limit is 5)
HELD = MAX_CONNECTIONS - 4  # clients kept open at most while fuzzing: status still gets in
CROWD = 300  # connections open at once, far beyond MAX_CONNECTIONS
BURST = 2000  # connect-and-close, one after the other

TOKENS = [b"{", b"}", b"[", b"]", b":", b",", b" ", b'"command"', b'"status"', b'"scale"',
          b'"worker"', b'"delta"', b"1", b"-1", b"0.5", b"true", b"null", b"NaN", b"-Infinity",
          b"1e999999", b'"\\ud800"', b'"\\u0000"', b"\x00", b"\xff", b"\xc3\x28", b"\xed\xa0\x80",
          b'"', b"\\", b"\r", b"\n"]
VALID = [b'{"command": "status"}', b'{"command": "scale", "worker": "nobody", "delta": 1}']


def deep(rng: random.Random) -> bytes:
    opener = rng.choice([b"[", b'{"a":', b'{"command": [', b'{"command": {"x":'])
    return opener * rng.randint(200, 14000)  # often past json's recursion limit


def huge_number(rng: random.Random) -> bytes:
    number = rng.choice([b"1e999999", b"-1e999999", b"1" * rng.randint(4000, 30000),
                         b"0." + b"0" * 20000 + b"1", b"9" * 400 + b"e-999999"])
    return rng.choice([number, b'{"command": "scale", "worker": "w", "delta": ' + number + b"}",
                       b'{"command": ' + number + b"}"])


def token_soup(rng: random.Random) -> bytes:
    return b"".join(rng.choices(TOKENS, k=rng.randint(1, 300)))


def mutated(rng: random.Random) -> bytes:
    data = bytearray(rng.choice(VALID))
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def foreign_encoding(rng: random.Random) -> bytes:
    return rng.choice(VALID).decode().encode(rng.choice(["utf-16", "utf-16-be", "utf-32-le"]))


def oversized(rng: random.Random) -> bytes:
    return rng.choice([b"x", b"[", b"\x00"]) * rng.randint(MAX_REQUEST + 1, MAX_REQUEST * 2)


PAYLOADS: list[Callable[[random.Random], bytes]] = [
    deep, huge_number, token_soup, token_soup, mutated, mutated, foreign_encoding, oversized,
    lambda rng: rng.randbytes(rng.randint(0, 4000)),
    lambda rng: b"\x00" * rng.randint(1, 5000),
    lambda rng: rng.choice(VALID),
    lambda rng: b"",
]


def connect(path: Path) -> socket.socket:
    """Connect, waiting (WAIT at most) for room in the listener's backlog: a socket with a
    Python timeout is non-blocking, and its connect() fails at once with EAGAIN there."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(WAIT), 0))
    client.connect(str(path))
    client.settimeout(WAIT)
    return client


def send(client: socket.socket, data: bytes) -> bool:
    """Send ``data``; False if the master had already closed the connection."""
    try:
        client.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def read_to_eof(client: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := client.recv(65536):
            data += chunk
    except ConnectionResetError:  # closed with our bytes unread (an oversized request)
        pass
    client.close()
    return data


def check_reply(reply: bytes, sent: bytes, seed: int, index: int) -> None:
    """One JSON object on one line, or nothing for what the master drops unanswered."""
    where = f"seed {seed}, request {index}: {sent[:80]!r}... ({len(sent)} bytes)"
    if not reply:
        assert not sent.strip() or len(sent) > MAX_REQUEST, f"no reply; {where}"
        return
    assert is_reply(reply), f"{reply[:200]!r}; {where}"


def is_reply(reply: bytes) -> bool:
    """One line, one JSON object: an error, or a status (from a valid request)."""
    if not reply.endswith(b"\n") or reply.count(b"\n") != 1:
        return False
    answer = json.loads(reply)
    return isinstance(answer, dict) and ("error" in answer or "workers" in answer)


def test_the_master_keeps_supervising_whatever_its_control_socket_is_fed(
        start_master: Callable[..., MasterProcess], events: Events, runtime_dir: Path) -> None:
    master = start_master("fleets.basic:one_sleeper", "--max-backoff", "0.2")
    events.wait_kind("up")  # the master listens before it forks
    killed: list[int] = []
    path = socket_path(runtime_dir, "fleets.basic.one_sleeper")
    rng = random.Random(SEED)
    held: list[socket.socket] = []  # silent, half-sent, or never reading their reply

    for index in range(REQUESTS):
        if index % 50 == 0 and len(killed) < KILLS:
            # Kill each worker as soon as it is up: restarted while the requests go on.
            events.drain()
            if up := [e["pid"] for e in events.of("up") if e["pid"] not in killed]:
                os.kill(up[0], signal.SIGKILL)
                killed.append(up[0])
        if index % 200 == 0:
            assert request(path, {"command": "status"})["master_pid"] == master.pid
        sent = rng.choice(PAYLOADS)(rng)
        client = connect(path)
        ending = rng.choice(["read", "read", "eof", "close", "hold"])
        if ending == "read":  # one line, then the reply
            if send(client, sent + b"\n"):
                check_reply(read_to_eof(client), sent, SEED, index)
            else:
                client.close()
        elif ending == "eof":  # no newline: the end of input ends the request
            if send(client, sent):
                client.shutdown(socket.SHUT_WR)
                check_reply(read_to_eof(client), sent, SEED, index)
            else:
                client.close()
        elif ending == "close":  # a partial line, or a whole one, and gone
            send(client, sent[:rng.randint(0, len(sent))] + rng.choice([b"", b"\n"]))
            client.close()
        elif len(held) < HELD:  # says nothing, half a line, or never reads its reply
            send(client, rng.choice([b"", sent[:rng.randint(0, len(sent))], sent + b"\n"]))
            held.append(client)
        else:
            client.close()

    # Many at once: MAX_CONNECTIONS are kept (waiting for their request), the rest refused.
    crowd = [connect(path) for _ in range(CROWD)]
    # Finish every open connection: a newline completes whatever line it had (and gets
    # an error reply); one already dropped by the master reads EOF. Either way the master
    # has closed it once we read EOF, so none of them takes a place from `status` below.
    for client in held + crowd:
        send(client, b"\n")
        reply = read_to_eof(client)
        assert reply == b"" or is_reply(reply), reply[:200]
    for index in range(BURST):
        client = connect(path)
        if index % 2:
            send(client, b'{"command": "st')
        client.close()

    # The burst may have filled the backlog, where `request()` would say "too busy": this
    # client waits for its turn, so all before it have been accepted once it is answered.
    client = connect(path)
    client.sendall(b'{"command": "status"}\n')
    assert json.loads(read_to_eof(client))["master_pid"] == master.pid

    assert killed, "the worker was never killed"
    restarted = events.wait(lambda e: e["kind"] == "up" and e["pid"] not in killed,
                            what="the killed worker restarted")
    status = request(path, {"command": "status"})
    assert status["master_pid"] == master.pid
    [worker] = status["workers"]
    assert (worker["pid"], worker["state"], worker["restarts"]) == (
        restarted["pid"], "running", len(killed)), worker
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log
    assert "Traceback" not in master.log and "internal error" not in master.log, master.log
    # Hundreds of refusals, and no flood: the first is logged, the rest counted.
    refusals = master.log_matches(r"clients already connected")
    assert 1 <= len(refusals) <= 2, master.log
