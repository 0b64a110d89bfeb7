"""Parsing /proc/net/tcp{,6} for listening ports."""

from __future__ import annotations

from kiln.engine.ports import parse_listening_ports

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0400 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 00000000:0401 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 3 1
   3: 020D150A:0400 010D150A:A2C4 01 00000000:00000000 00:00000000 00000000     0        0 4 1
   4: 00000000:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5 1
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A 0:0 0
   1: 00000000000000000000000001000000:1388 00000000000000000000000000000000:0000 0A 0:0 0
   2: 00000000000000000000000001000000:2328 00000000000000000000000000000000:D431 06 0:0 0
"""


def test_listening_sockets_only_without_the_agent_ports() -> None:
    # 0x1F90 = 8080, 0x0BB8 = 3000 (in both files), 0x1388 = 5000; 1024/1025 are the agent's;
    # the ESTABLISHED (01) and TIME_WAIT (06) lines are not listeners.
    assert parse_listening_ports(TCP + TCP6) == [3000, 5000, 8080]


def test_exclusions_are_configurable() -> None:
    assert parse_listening_ports(TCP, exclude=()) == [1024, 1025, 3000, 8080]


def test_garbage_is_ignored() -> None:
    text = "hello\n  0: nonsense\n  1: 00000000:ZZZZ 00000000:0000 0A\n  2: 0000 x 0A\n"
    assert parse_listening_ports(text) == []
    assert parse_listening_ports("") == []


def test_lower_case_state_and_port_zero() -> None:
    text = "  0: 00000000:0050 00000000:0000 0a\n  1: 00000000:0000 00000000:0000 0A\n"
    assert parse_listening_ports(text) == [80]
