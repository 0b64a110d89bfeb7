"""Run every benchmark: ``python -m bench [NAME ...]``.

Each ``bench/bench_*.py`` module defines ``main() -> None``. A module that
needs something this machine may lack (root, KVM, QEMU, a built image)
declares it, and is skipped with the reason printed:

- ``REQUIRES: str | None`` at module level: a human description of what the
  module needs (``None``: nothing); informational, printed in the header;
- ``def skip_reason() -> str | None``: optional, called before ``main()``;
  a string means "cannot run here, because ...".

Modules run in name order; NAME arguments (``protocol``, ``bench_client``)
select a subset. A module that raises is reported and the run goes on; the
exit status is 1 if any did.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path


def discover() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(p.stem for p in here.glob("bench_*.py"))


def _wanted(name: str, selectors: list[str]) -> bool:
    return not selectors or any(name in (s, f"bench_{s}") for s in selectors)


def main(argv: list[str] | None = None) -> int:
    selectors = sys.argv[1:] if argv is None else argv
    failed: list[str] = []
    names = [n for n in discover() if _wanted(n, selectors)]
    if not names:
        print(f"no benchmark matches {selectors}; have: {', '.join(discover())}")
        return 2
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        requires = getattr(module, "REQUIRES", None)
        print(f"\n# {name}" + (f" (requires: {requires})" if requires else ""), flush=True)
        skip = getattr(module, "skip_reason", None)
        reason = skip() if callable(skip) else None
        if reason:
            print(f"skipped: {reason}", flush=True)
            continue
        started = time.perf_counter()
        try:
            module.main()
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"({name}: {time.perf_counter() - started:.1f} s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
