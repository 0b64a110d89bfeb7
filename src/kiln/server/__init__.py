"""The kiln daemon: HTTP API (:mod:`.app`, :mod:`.routes`), business logic
(:mod:`.services`) and the process that runs them (:mod:`.daemon`).

    services = Services(store=store, engine=engine, config=config)
    app = create_app(services)            # a FastAPI app; /openapi.json describes it
    asyncio.run(serve(config))            # or run(config): the whole daemon
"""

from .app import create_app
from .daemon import run, serve
from .errors import ApiError
from .services import Services

__all__ = ["ApiError", "Services", "create_app", "run", "serve"]
