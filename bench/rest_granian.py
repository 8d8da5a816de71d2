"""A sluice model service whose REST port runs on granian instead of uvicorn (bench only).

The same service as ``sluice serve`` (services.server.ModelServer: gRPC port, model manager,
batchers, validation), started with its own REST server off, plus the same ASGI application
(services.rest.app.RestApp over the same data plane, its own ``rest-handler`` thread pool sized as
``sluice serve`` sizes it) served by granian's embedded server in the service's own event loop, as
uvicorn is in ``sluice serve``. Only the HTTP server differs. granian is no dependency of sluice:
``python -m bench --setup-only`` installs it into ``bench/.venvs/granian`` (a ``pip --target``
folder) and ``bench.rest_servers`` puts that folder on this process's ``PYTHONPATH``.

    python -m bench.rest_granian --repo DIR --port P --rest-port Q [--runtime-threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # `python bench/rest_granian.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.observability.component import run_component
from services.rest.app import RestApp
from services.server import ModelServer
from services.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True, help="model repository")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="gRPC port")
    parser.add_argument("--rest-port", type=int, required=True, help="REST port (granian)")
    parser.add_argument("--runtime-threads", type=int, default=1, help="granian's Rust I/O threads (default 1)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    try:
        from granian.constants import HTTPModes, Interfaces
        from granian.server.embed import Server as EmbeddedGranian
    except ImportError as exc:
        print(f"granian is not importable ({exc}): run `python -m bench --setup-only`", file=sys.stderr)
        return 2
    settings = load_settings({"repo": args.repo, "host": args.host, "port": args.port, "rest_port": -1,
                              "metrics_port": -1, "log_level": args.log_level})

    async def serve(stop: asyncio.Event) -> None:
        server = ModelServer(settings)
        executor = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="rest-handler")
        granian: EmbeddedGranian | None = None
        task: asyncio.Task[None] | None = None
        try:
            await server.start()
            app = RestApp(server.plane, server.manager, executor, max_bytes=settings.max_message_mb * 1024 * 1024,
                          max_in_flight=settings.max_concurrency * 4)
            # ASGINL: ASGI without the lifespan protocol (the service starts and stops itself), as
            # services/rest/server.py runs uvicorn with lifespan="off".
            granian = EmbeddedGranian(app, address=args.host, port=args.rest_port, interface=Interfaces.ASGINL,
                                      runtime_threads=args.runtime_threads, http=HTTPModes.http1,
                                      websockets=False, log_enabled=args.log_level in ("debug", "info"))
            task = asyncio.create_task(granian.serve())
            await stop.wait()
        finally:
            if granian is not None and task is not None:
                granian.stop()
                await asyncio.wait_for(task, 15)
            executor.shutdown(wait=False, cancel_futures=True)
            await server.shutdown()

    return run_component("rest-granian", serve, log=settings, log_levels=settings.log_levels)


if __name__ == "__main__":
    sys.exit(main())
