"""Small programs the conformance suite runs inside sandboxes.

Every image has ``sh`` and ``python3``; nothing here needs more. Each program is
given to ``python3 -c``, so it is one string without a file to upload.
"""

from __future__ import annotations

from typing import Final

#: An echo server on 127.0.0.1 at a port the kernel picks. It writes that port to
#: the file argv[1] (atomically: whoever sees the file can connect), greets every
#: connection with ``HELLO\n``, then echoes.
ECHO_SERVER: Final = """\
import os, socket, sys, threading
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    f.write(str(srv.getsockname()[1]))
os.rename(tmp, sys.argv[1])
def serve(conn):
    with conn:
        conn.sendall(b"HELLO\\n")
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

#: Print the pid of every process whose command line is exactly argv[1:], one a line.
#: (From /proc, so it needs no ps; on an engine whose sandboxes share the host's
#: process table it sees the host's too, which is the point: a leak shows.)
PIDS_OF: Final = """\
import os, sys
want = "\\0".join(sys.argv[1:]) + "\\0"
for pid in sorted(os.listdir("/proc")):
    if not pid.isdigit():
        continue
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            if f.read() == want:
                print(pid)
    except OSError:
        pass
"""
