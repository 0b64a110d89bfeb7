"""The NAT and forwarding rules of the sandbox bridge, applied with the ``iptables`` CLI.

No Python library drives both iptables backends, so this is the one place that
shells out for rules: whatever ``iptables`` is on the host (nft or legacy) is
used, inside the configured namespace via ``ip netns exec``. Every rule carries
the comment ``kiln:<bridge>`` so it is recognizable in ``iptables-save`` and a
rule someone else wrote is never removed by accident.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from .errors import OperationFailed, ToolMissing
from .netns import find_tool, netns_exec_argv

COMMAND_TIMEOUT = 30.0
XTABLES_LOCK_WAIT = "5"  # seconds; the legacy backend serializes on a lock file
_MAX_DUPLICATES = 16  # removal loop bound when a rule was added many times by hand


@dataclass(frozen=True, slots=True)
class Rule:
    table: str
    chain: str
    spec: tuple[str, ...]
    insert: bool = False  # -I (top of the chain) rather than -A (bottom)


def bridge_rules(bridge: str, subnet: str) -> tuple[Rule, ...]:
    """Masquerade for egress, plus FORWARD accepts that survive a DROP policy.

    The FORWARD rules go to the top of the chain because hosts with Docker or a
    firewall end FORWARD in DROP/REJECT; they let guests start connections and
    let only replies back in.
    """
    tag = ("-m", "comment", "--comment", f"kiln:{bridge}")
    replies = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED")
    return (
        Rule("nat", "POSTROUTING", ("-s", subnet, "!", "-o", bridge, *tag, "-j", "MASQUERADE")),
        Rule("filter", "FORWARD", ("-i", bridge, *tag, "-j", "ACCEPT"), insert=True),
        Rule("filter", "FORWARD", ("-o", bridge, *replies, *tag, "-j", "ACCEPT"), insert=True),
    )


class Iptables:
    """``iptables`` inside namespace ``ns`` (``None`` = the current namespace)."""

    def __init__(self, ns: str | None) -> None:
        self._ns = ns

    @staticmethod
    def available() -> bool:
        return find_tool("iptables") is not None

    @staticmethod
    def require() -> str:
        """The path of ``iptables``, or ToolMissing with what to do about it."""
        exe = find_tool("iptables")
        if exe is None:
            raise ToolMissing(
                "the 'iptables' program is not on PATH; install the iptables package "
                "(either the nft or the legacy backend works), or set nat=False"
            )
        return exe

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        exe = self.require()
        argv = netns_exec_argv(self._ns, [exe, "-w", XTABLES_LOCK_WAIT, *args])
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise OperationFailed(
                f"{' '.join(argv)} did not finish in {COMMAND_TIMEOUT} s"
            ) from exc

    @staticmethod
    def _check(proc: subprocess.CompletedProcess[str]) -> None:
        try:
            proc.check_returncode()
        except subprocess.CalledProcessError as exc:
            detail = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
            raise OperationFailed(f"{' '.join(proc.args)}: {detail}") from exc

    def exists(self, rule: Rule) -> bool:
        proc = self._run("-t", rule.table, "-C", rule.chain, *rule.spec)
        # 1 = "Bad rule (does a matching rule exist in that chain?)"; 2+ = real errors
        if proc.returncode != 1:
            self._check(proc)
        return proc.returncode == 0

    def ensure(self, rule: Rule) -> bool:
        """Add ``rule`` unless ``iptables -C`` finds it; True if it was added."""
        if self.exists(rule):
            return False
        op = ("-I", rule.chain, "1") if rule.insert else ("-A", rule.chain)
        self._check(self._run("-t", rule.table, *op, *rule.spec))
        return True

    def remove(self, rule: Rule) -> int:
        """Delete every copy of ``rule``; the number removed."""
        removed = 0
        while removed < _MAX_DUPLICATES and self.exists(rule):
            self._check(self._run("-t", rule.table, "-D", rule.chain, *rule.spec))
            removed += 1
        return removed
