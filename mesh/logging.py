"""structlog set-up shared by every sluice process: JSON lines in production, console on a TTY.

The standard library's logging (grpc, asyncio, aetcd…) goes through the same processors, so one
process writes one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


def parse_levels(spec: str | None) -> dict[str, str]:
    """``"services.batcher=debug,mesh=warning"`` → per-logger levels (a logger covers its children)."""
    levels: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, level = part.partition("=")
        if not sep or level.strip().upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"log level {part.strip()!r} is not <logger>=<level> (e.g. services.batcher=debug)")
        levels[name.strip()] = level.strip().upper()
    return levels


def configure(level: str = "info", fmt: LogFormat = "auto", levels: dict[str, str] | None = None) -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        # filter_by_level first: a disabled debug line costs a level check, nothing more.
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([] if use_console else [structlog.processors.format_exc_info]),
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # watchfiles logs every batch of changes at INFO; sluice logs what it does about them.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    for name, name_level in (levels or {}).items():
        logging.getLogger(name).setLevel(name_level)
