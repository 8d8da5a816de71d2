"""How a sluice component runs as a process: its flags generated from its settings model, and
:func:`run_component` (logging set-up, signals, error output) shared by every long-running command.

Every flag is declared once, as a field of a pydantic settings model: the flag is the field name in
kebab case, its help is the field's attribute docstring, its default the field's default. The
argparse default is always ``None`` ("not given"), so that :func:`given_flags` passes on only the
flags on the command line and the settings model fills in the rest from the environment (and, for
``sluice serve``, its ``--config`` file), then the defaults: flag > env > file > default.

What a field needs beyond its name and type (a different flag, a metavar, a repeatable flag, or no
flag at all) it says with ``json_schema_extra=cli(...)``.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import signal
import sys
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO, Union, cast, get_args, get_origin

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from mesh.observability import logging as sluice_logging

_CLI_KEY = "cli"


def cli(*, flag: str | None = None, metavar: str | None = None, repeat: bool = False,
        hidden: bool = False, deprecated: Sequence[str] = ()) -> dict[str, Any]:
    """Command-line details of a settings field, for ``Field(json_schema_extra=cli(...))``.

    ``flag`` replaces ``--field-name`` (``--etcd`` for ``endpoints``); ``repeat`` makes the flag
    repeatable, collecting a list; ``hidden`` leaves the field to the environment only;
    ``deprecated`` are old spellings still accepted (and not shown).
    """
    return {_CLI_KEY: {"flag": flag, "metavar": metavar, "repeat": repeat, "hidden": hidden,
                       "deprecated": list(deprecated)}}


def _details(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    found = extra.get(_CLI_KEY) if isinstance(extra, dict) else None
    return dict(found) if isinstance(found, dict) else {}


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _shown_default(info: FieldInfo) -> str | None:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined or info.default is None:
        return None
    else:
        value = info.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value) or None
    if isinstance(value, dict):
        return None  # an empty collection: nothing worth showing
    return str(value)


def _help(info: FieldInfo) -> str:
    text = " ".join((info.description or "").split()).replace("``", "")
    shown = _shown_default(info)
    if shown is None or "default" in text.lower():
        return text  # the docstring explains a default that depends on other settings itself
    if not text:
        return f"default {shown}"
    stop = "." if text.endswith(".") else ""
    return f"{text.removesuffix('.')} (default {shown}){stop}"


def add_settings_flags(container: argparse._ActionsContainer, model: type[BaseModel], *,
                       fields: Iterable[str] | None = None, skip: Iterable[str] = ()) -> tuple[str, ...]:
    """Add one flag per field of ``model`` (or of ``fields`` only) to ``container``; returns their names.

    Types come from the annotations: ``bool`` is a ``--x/--no-x`` pair, ``Literal`` gives choices,
    ``int``/``float``/``Path`` convert. Every default is ``None``, meaning "not given".
    """
    chosen = list(fields) if fields is not None else list(model.model_fields)
    skipped = set(skip)
    added: list[str] = []
    for name in chosen:
        if name in skipped:
            continue
        info = model.model_fields[name]
        details = _details(info)
        if details.get("hidden"):
            continue
        flag = details.get("flag") or "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": _help(info)}
        if details.get("metavar"):
            kwargs["metavar"] = details["metavar"]
        annotation = _unwrap_optional(info.annotation)
        if details.get("repeat"):
            kwargs["action"] = "append"
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = list(get_args(annotation))
        elif annotation in (int, float, Path):
            kwargs["type"] = annotation
        elif annotation not in (str, SecretStr) and get_origin(annotation) not in (list, dict):
            raise TypeError(f"{model.__name__}.{name}: no command-line form for {annotation!r}; declare cli(...)")
        container.add_argument(flag, **kwargs)
        for old in details.get("deprecated", ()):
            container.add_argument(old, **{**kwargs, "help": argparse.SUPPRESS})
        added.append(name)
    return tuple(added)


def split_pairs(value: Any, problem: Callable[[str], str], *, need_value: bool = False) -> Any:
    """``MODEL=VALUE`` items (a repeated flag's list, or the environment's comma-separated string)
    as a dict; anything else is returned for the field's own validation. ``problem(item)`` is the
    message for an item without ``=`` (or, with ``need_value``, with nothing after it)."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        return value
    pairs: dict[str, str] = {}
    for item in value:
        key, sep, rest = str(item).partition("=")
        if not sep or (need_value and not rest.strip()):
            raise ValueError(problem(str(item)))
        pairs[key.strip()] = rest.strip()
    return pairs


def given_flags(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The flags of ``names`` given on the command line (argparse leaves the others ``None``)."""
    return {name: value for name in names if (value := getattr(args, name, None)) is not None}


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: each validation error as ``field: message``, joined by ``; ``."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
                         for error in exc.errors())
    return " ".join(str(exc).split())


def fail(command: str, message: str, code: int, *, file: TextIO | None = None) -> int:
    """Print ``sluice <command>: <message>`` as one line on stderr (or ``file``) and return ``code``."""
    print(f"sluice {command}: {message}", file=file or sys.stderr, flush=True)
    return code


class LogSettings(Protocol):
    """The logging fields every component's settings have."""

    @property
    def log_level(self) -> str: ...
    @property
    def log_format(self) -> Any: ...


class _Signals:
    """The first SIGINT/SIGTERM asks the component to stop; a second one forces the exit (as
    uvicorn does), for a shutdown that hangs or takes longer than whoever pressed Ctrl-C wants."""

    def __init__(self, on_first: Callable[[], object], on_force: Callable[[], object] | None = None) -> None:
        self._on_first = on_first
        self._on_force = on_force
        self._seen = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, _frame: object) -> None:
        if self._seen:
            print(f"\n{signal.Signals(signum).name} again: forcing exit", file=sys.stderr, flush=True)
            if self._on_force is not None:
                self._on_force()
            os._exit(128 + signum)
        self._seen = True
        self._on_first()


def _raise_interrupt() -> None:
    raise KeyboardInterrupt


async def _until_stopped(main: Callable[[asyncio.Event], Awaitable[int | None]],
                         on_force: Callable[[], object] | None) -> int | None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Signal handlers run between bytecodes of the loop's thread; call_soon_threadsafe also wakes
    # a loop that sleeps in select().
    with _Signals(lambda: loop.call_soon_threadsafe(stop.set), on_force):
        return await main(stop)


def run_component(command: str, main: Callable[[asyncio.Event], Awaitable[int | None]] | Callable[[], int],
                  *, log: LogSettings | None = None, log_levels: str | None = None,
                  errors: Mapping[type[BaseException], int] | Sequence[tuple[type[BaseException], int]] = (),
                  on_force: Callable[[], object] | None = None) -> int:
    """Run one component process: configure logging from ``log``, run ``main``, return the exit code.

    An async ``main`` gets an event set by the first SIGINT/SIGTERM and should return soon after;
    a plain ``main`` sees the first signal as :class:`KeyboardInterrupt`. A second signal forces the
    exit, after ``on_force`` (e.g. killing child processes). An exception of a type in ``errors`` is
    one line on stderr and its exit code; ``main`` returning None means 0.
    """
    table = list(errors.items()) if isinstance(errors, Mapping) else list(errors)
    if log is not None:
        try:
            levels = sluice_logging.parse_levels(log_levels)
        except ValueError as exc:
            return fail(command, f"invalid settings: {one_line(exc)}", 2)
        sluice_logging.configure(log.log_level, log.log_format, levels)
    try:
        code: int | None
        if inspect.iscoroutinefunction(main):
            code = asyncio.run(_until_stopped(cast(Callable[[asyncio.Event], Awaitable[int | None]], main), on_force))
        else:
            with _Signals(_raise_interrupt, on_force):
                code = cast(Callable[[], int], main)()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        for kind, exit_code in table:
            if isinstance(exc, kind):
                return fail(command, str(exc), exit_code)
        raise
    return 0 if code is None else int(code)
