.PHONY: serve test bench lint sdk
serve:  ## set up everything, then run the kiln daemon with embedded defaults
	scripts/bootstrap
	.venv/bin/kiln serve

test:   ## set up everything, then run lint, type checks and the whole test suite
	scripts/test

bench:  ## performance benchmarks (p50/p95/p99 tables)
	scripts/bench

lint:
	.venv/bin/ruff check src tests bench && .venv/bin/ruff format --check src tests bench && .venv/bin/mypy
	.venv/bin/python scripts/gen_sync_sdk --check

sdk:    ## regenerate the sync SDK (src/kiln/sdk/_sync.py) from the asyncio one (_async.py)
	.venv/bin/python scripts/gen_sync_sdk
