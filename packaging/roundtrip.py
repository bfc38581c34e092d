#!/usr/bin/env python3
"""Chat round trip against a running scalechat: two WebSocket clients (stdlib only), one sends,
both must receive the message with the same id, and the sender its ack.

    python3 packaging/roundtrip.py HOST:PORT
"""
import base64
import json
import os
import socket
import struct
import sys


class Client:
    def __init__(self, addr, query):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /ws?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            sys.exit(f"handshake refused: {head.decode(errors='replace')}")

    def _recv(self):
        data = self.sock.recv(65536)
        if not data:
            sys.exit("server closed the connection")
        return data

    def _need(self, n):
        while len(self.buf) < n:
            self.buf += self._recv()

    def recv(self):
        """The next text frame as JSON (skipping pings)."""
        while True:
            self._need(2)
            opcode, length = self.buf[0] & 0x0F, self.buf[1] & 0x7F
            start = 2
            if length == 126:
                self._need(4)
                length, start = struct.unpack(">H", self.buf[2:4])[0], 4
            elif length == 127:
                self._need(10)
                length, start = struct.unpack(">Q", self.buf[2:10])[0], 10
            self._need(start + length)
            payload, self.buf = self.buf[start:start + length], self.buf[start + length:]
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x8:
                sys.exit(f"server closed: {payload!r}")

    def send(self, obj):
        data, mask = json.dumps(obj).encode(), os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        header = bytes([0x81, 0x80 | len(data)]) if len(data) < 126 else \
            bytes([0x81, 0x80 | 126]) + struct.pack(">H", len(data))
        self.sock.sendall(header + mask + masked)


def main():
    addr = sys.argv[1]
    alice, bob = Client(addr, "name=alice"), Client(addr, "name=bob")
    for c in (alice, bob):
        assert c.recv()["type"] == "welcome"
        assert c.recv()["type"] == "joined"
    alice.send({"type": "send", "message": "static hello", "ref": "s-1"})
    got = bob.recv()
    assert got["type"] == "message" and got["message"] == "static hello", got
    frames = [alice.recv(), alice.recv()]
    ack = next(f for f in frames if f["type"] == "ack")
    assert ack["ref"] == "s-1" and ack["id"] == got["id"], (ack, got)
    print(f"ok: round trip through {addr}, message id {got['id']}")


if __name__ == "__main__":
    main()
