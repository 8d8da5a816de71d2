"""The documented commands, run as written against a live `sluice up`.

A fenced block of README.md, docs/etcd-schema.md or docs/observability.md runs when the line
before it says so:

    <!-- test: run -->                      the block must exit 0
    <!-- test: run; expect: REGEX -->       ... and its output (stdout and stderr) must match REGEX

``sh``/``bash`` blocks run with ``bash -e -o pipefail``, ``python`` blocks with the venv's
interpreter; each in a fresh shell after ``eval "$(.venv/bin/sluice env)"``, in the order of
the file, from a folder laid out as a clone (``.venv``, ``examples``) whose `sluice up` runs with
the default run directory, exactly as the README starts it. A block whose output depends on
which process served a request makes every process serve one first (the README's metrics block
calls each service directly), so that what it greps for is there.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mesh.devstack.command import ENV_EXPORTS
from mesh.ports import free_port
from tests.fixtures.processes import ManagedProcess

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/etcd-schema.md", "docs/observability.md")
SECURE_UP = ("up", "--secure", "--services", "1", "--run-dir", ".sluice-secure")
_MARKED = re.compile(r"^<!-- test: run(?:; expect: (?P<expect>.+?))? -->\n```(?P<lang>\w+)\n(?P<body>.*?)^```$",
                     re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    lang: str
    body: str
    expect: str | None

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}"


def marked_blocks(doc: str) -> list[Block]:
    text = (ROOT / doc).read_text()
    return [Block(doc, text.count("\n", 0, match.start()) + 2, match["lang"], match["body"], match["expect"])
            for match in _MARKED.finditer(text)]


def test_the_marker_is_found() -> None:
    """A marker the pattern misses would silently test nothing: every marker belongs to a block."""
    for doc in DOCS:
        assert (ROOT / doc).read_text().count("<!-- test: run") == len(marked_blocks(doc)), doc
    assert marked_blocks("docs/etcd-schema.md"), "the lease example is marked"


def clean_env() -> dict[str, str]:
    """The test's environment without a developer's stack settings: the blocks get theirs from `sluice env`."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "ETCDCTL_"))}


def run_block(block: Block, cwd: Path) -> subprocess.CompletedProcess[str]:
    prelude = 'eval "$(.venv/bin/sluice env)"\nset -e -o pipefail\n'
    if block.lang in ("sh", "bash"):
        script = prelude + block.body
    elif block.lang == "python":
        script = f"{prelude}.venv/bin/python - <<'SLUICE_DOC_BLOCK'\n{block.body}SLUICE_DOC_BLOCK\n"
    else:
        raise AssertionError(f"{block}: no runner for ```{block.lang} blocks")
    try:
        return subprocess.run(["bash", "-c", script], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                              timeout=120, check=False)
    except subprocess.TimeoutExpired as exc:  # a wait loop of the block that never ends
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return subprocess.CompletedProcess(exc.cmd, 124, partial, f"timed out after {exc.timeout}s")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_documented_commands_run_as_written(tmp_path: Path, process_factory: Callable[..., ManagedProcess]) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / ".venv").symlink_to(Path(sys.executable).parents[1])
    (clone / "examples").symlink_to(ROOT / "examples")
    up = process_factory("sluice-up", [str(clone / ".venv" / "bin" / "sluice"), "up"], env=clean_env(), cwd=clone)
    # The README's secure mode runs a second stack beside it, as its unmarked command starts it;
    # both start at once (as from two terminals), so their start-ups overlap.
    secure = process_factory("sluice-up-secure", [str(clone / ".venv" / "bin" / "sluice"), *SECURE_UP],
                             env=clean_env(), cwd=clone)
    try:
        run_the_blocks(clone, up, secure)
    finally:  # both stacks stop at once; the fixture forces what is left after 20 s
        for stack in (secure, up):
            stack.signal(signal.SIGTERM)
        for stack in (secure, up):
            with contextlib.suppress(subprocess.TimeoutExpired):
                stack.proc.wait(timeout=20)


def run_the_blocks(clone: Path, up: ManagedProcess, secure: ManagedProcess) -> None:
    up.wait_until(lambda: "Press Ctrl-C" in up.log_text(), 200, "the stack up (README command 1)")
    secure.wait_until(lambda: "Press Ctrl-C" in secure.log_text(), 200, "the secure stack up (README secure mode)")
    assert f".venv/bin/sluice {' '.join(SECURE_UP)}\n" in (ROOT / "README.md").read_text()
    assert 'eval "$(.venv/bin/sluice env)"' in up.log_text()  # the default run directory needs no flag

    failures = []
    for doc in DOCS:
        for block in marked_blocks(doc):
            result = run_block(block, clone)
            output = result.stdout + result.stderr
            if result.returncode != 0:
                failures.append(f"{block} exited {result.returncode}:\n{output}")
            elif block.expect and not re.search(block.expect, output, re.MULTILINE):
                failures.append(f"{block}: output does not match {block.expect!r}:\n{output}")
    assert not failures, "\n\n".join(failures)

    # What `sluice env` exports is what README and its help list.
    exported = subprocess.run([".venv/bin/sluice", "env"], cwd=clone, env=clean_env(), capture_output=True,
                              text=True, timeout=60, check=True).stdout
    names = [line.removeprefix("export ").partition("=")[0] for line in exported.splitlines()]
    assert names[:len(ENV_EXPORTS)] == list(ENV_EXPORTS) and set(names[len(ENV_EXPORTS):]) <= {"PATH"}
    tour_env = next(block.body for block in marked_blocks("README.md") if "sluice env" in block.body)
    assert all(name in tour_env for name in ENV_EXPORTS), tour_env
    cli = (ROOT / "docs" / "cli.md").read_text()
    assert all(f"`{name}" in cli for name in ENV_EXPORTS)

    # A registry command without the stack's environment says how to get it.
    nobody = f"127.0.0.1:{free_port()}"  # as the default 127.0.0.1:2379, but surely without an etcd
    status = subprocess.run([".venv/bin/sluice", "status", "--etcd", nobody], cwd=clone, env=clean_env(),
                            capture_output=True, text=True, timeout=60, check=False)
    assert status.returncode == 1, status
    assert 'sluice: hint: `sluice up` runs a stack from .sluice with etcd at 127.0.0.1:' in status.stderr
    assert 'run eval "$(sluice env)" first' in status.stderr
