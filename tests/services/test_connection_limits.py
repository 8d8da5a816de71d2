"""What one client connection can make the real service hold: answers it never reads.

The client here is a few lines of raw HTTP/2 over a socket (no gRPC library), because a gRPC
client always reads its answers: it grants no flow-control window (SETTINGS_INITIAL_WINDOW_SIZE 0),
so the service cannot send a byte of any answer, and every call it opens stays open.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from bench.fuzz import GOOD, Case, build_repo, send
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle

HEADERS, DATA, RST_STREAM, SETTINGS, PING = 1, 0, 3, 4, 6
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
REFUSED_STREAM = 7
INITIAL_WINDOW_SIZE = 0x4


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, no Huffman coding (short names and values)."""
    encoded_name, encoded_value = name.encode(), value.encode()
    return b"\x00" + bytes([len(encoded_name)]) + encoded_name + bytes([len(encoded_value)]) + encoded_value


class NonReadingClient:
    """One HTTP/2 connection that opens ModelInfer calls and never lets an answer through."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.refused: list[int] = []
        self.data_frames = 0
        self._lock = threading.Lock()
        # gRPC enforces its stream limit once the client acknowledged the SETTINGS that announce it:
        # calls sent before that ACK may all be accepted (seen on a loaded machine).
        self._settings_acked = threading.Event()
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                          + _frame(SETTINGS, 0, 0, struct.pack(">HI", INITIAL_WINDOW_SIZE, 0)))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, flags, stream = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                payload, buffer = buffer[9:9 + length], buffer[9 + length:]
                with self._lock:
                    if kind == RST_STREAM and int.from_bytes(payload, "big") == REFUSED_STREAM:
                        self.refused.append(stream)
                    elif kind == DATA:
                        self.data_frames += 1
                try:  # the connection stays healthy: settings and pings are acknowledged
                    if kind == SETTINGS and not flags & ACK:
                        self.sock.sendall(_frame(SETTINGS, ACK, 0, b""))
                        self._settings_acked.set()
                    elif kind == PING and not flags & ACK:
                        self.sock.sendall(_frame(PING, ACK, 0, payload))
                except OSError:
                    return

    def open_calls(self, count: int) -> None:
        if not self._settings_acked.wait(10.0):
            raise AssertionError("the service sent no HTTP/2 SETTINGS within 10 s")
        headers = b"".join(_literal(n, v) for n, v in (
            (":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
            (":authority", "127.0.0.1"), ("content-type", "application/grpc"), ("te", "trailers")))
        message = b"\x00" + struct.pack(">I", len(GOOD)) + GOOD
        for index in range(count):
            stream = 1 + 2 * index
            self.sock.sendall(_frame(HEADERS, END_HEADERS, stream, headers)
                              + _frame(DATA, END_STREAM, stream, message))

    def refused_count(self) -> int:
        with self._lock:
            return len(self.refused)

    def close(self) -> None:
        self.sock.close()
        self._reader.join(5)


def test_one_connection_cannot_keep_more_than_100_unread_answers(start_service: Callable[..., ServiceHandle],
                                                                  tmp_path: Path) -> None:
    """Unread answers stay in the server's memory (+257 MB measured for 16 unread 4 MiB answers):
    the calls one connection may have open are capped (--max-calls-per-connection, default 100),
    and a call over the cap is refused by HTTP/2 (REFUSED_STREAM) before it costs anything."""
    service = start_service(build_repo(tmp_path / "repo"), "--no-watch")
    client = NonReadingClient(service.port)
    try:
        client.open_calls(120)
        wait_for(lambda: client.refused_count() >= 20, 30.0, "20 of 120 calls refused (REFUSED_STREAM)")
        time.sleep(0.5)  # nothing more is refused: the first 100 stay open, their answers unsent
        assert client.refused_count() == 20
        assert client.data_frames == 0
        # Other connections are served as usual meanwhile.
        with grpc.insecure_channel(service.address) as channel:
            outcome = send(channel, Case("good", GOOD, grpc.StatusCode.OK, ""), timeout=15.0)
        assert outcome.code == grpc.StatusCode.OK, outcome.details
        assert service.process.alive()
    finally:
        client.close()


def test_concurrent_clients_on_one_connection_are_never_refused(start_service: Callable[..., ServiceHandle],
                                                                tmp_path: Path) -> None:
    """Channels to one address share one HTTP/2 connection: eight clients with one call at a time
    stay far below the 100 calls it may have open, so none may be refused. (Finished calls once
    stayed counted while idle handler threads held them, and most calls were refused.)"""
    service = start_service(build_repo(tmp_path / "repo"), "--no-watch")
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def client() -> None:
        with grpc.insecure_channel(service.address) as channel:
            for _ in range(250):
                outcome = send(channel, Case("good", GOOD, grpc.StatusCode.OK, ""), timeout=15.0)
                with lock:
                    codes[outcome.code.name] = codes.get(outcome.code.name, 0) + 1
    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert codes == {"OK": 2000}, codes
