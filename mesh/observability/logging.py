"""structlog set-up shared by every sluice process: JSON lines in production, console on a TTY.

The standard library's logging (grpc, asyncio, aetcd…) goes through the same processors, so one
process writes one format.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar
from typing import Any, Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


class RequestFields:
    """The log fields of one RPC, filled in as it goes and rendered only when a line is logged.

    On the inference path binding them as structlog context variables cost more than the rest of
    the bookkeeping together (a ``ContextVar.set`` per field and per request, for lines that are
    almost never written); an RPC sets this one object instead (:func:`bind_request`) and
    :func:`merge_request_fields` adds what is set to each line logged within the RPC.
    """

    __slots__ = ("model", "peer", "request_id", "rpc", "span_id", "trace_id", "version")

    def __init__(self, rpc: str | None = None, peer: Callable[[], str] | None = None) -> None:
        self.rpc = rpc
        self.peer = peer
        """Called when a line is logged (the peer address is rarely needed)."""
        self.model: str | None = None
        self.version: int | None = None
        self.request_id: str | None = None
        self.trace_id: str | None = None
        self.span_id: str | None = None

    def render(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self.rpc is not None:
            fields["rpc"] = self.rpc
        if self.peer is not None:
            try:
                fields["peer"] = self.peer()
            except Exception:  # a finished call may no longer know its peer; the line still goes out
                fields["peer"] = "unknown"
        for name in ("trace_id", "span_id", "model", "version", "request_id"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        return fields


_REQUEST: ContextVar[RequestFields | None] = ContextVar("sluice_request_fields", default=None)


def request_fields() -> RequestFields | None:
    """The current RPC's fields, if one is bound in this context."""
    return _REQUEST.get()


def bind_request(fields: RequestFields) -> RequestFields:
    """Bind ``fields`` for the rest of the current context (gRPC gives every RPC a fresh one)."""
    _REQUEST.set(fields)
    return fields


def merge_request_fields(logger: Any, method: str, event_dict: MutableMapping[str, Any]
                         ) -> MutableMapping[str, Any]:
    """structlog processor: the bound RPC's fields, where the line does not set them itself."""
    fields = _REQUEST.get()
    if fields is not None:
        for key, value in fields.render().items():
            event_dict.setdefault(key, value)
    return event_dict


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
        merge_request_fields,
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
