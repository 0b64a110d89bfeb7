"""Small programs the engine tests run inside guests (python3 is in every image)."""

from __future__ import annotations

#: A TCP echo server on 127.0.0.1:PORT that first sends a banner with a random
#: token held only in its memory: the same banner after a restore proves the
#: process (not just the disk) survived.
ECHO_SERVER = """\
import secrets, socket, sys, threading
token = secrets.token_hex(8)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen()
def serve(conn):
    with conn:
        conn.sendall(f"TOKEN {token}\\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

#: ICMP echo to argv[1] over a raw socket (needs root); exit 0 on a reply.
PING = """\
import os, socket, struct, sys
def csum(b):
    b += b"\\0" * (len(b) % 2)
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF
target = sys.argv[1]
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(2)
ident = os.getpid() & 0xFFFF
for seq in range(5):
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"kiln"
    sock.sendto(struct.pack("!BBHHH", 8, 0, csum(body), ident, seq) + b"kiln", (target, 0))
    try:
        while True:
            data, addr = sock.recvfrom(1024)
            ihl = (data[0] & 15) * 4
            kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if kind == 0 and rid == ident and addr[0] == target:
                print("reply from", addr[0])
                sys.exit(0)
    except socket.timeout:
        pass
sys.exit(1)
"""
