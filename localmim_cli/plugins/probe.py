"""Importing every installed plugin without risking the caller: for `localmim plugins list`.

A plugin's import runs arbitrary code: it may hang, call `os._exit`, raise KeyboardInterrupt or
crash the interpreter, which no `try` in this process survives. So the imports run in a child
process (`python -m localmim_cli.plugins.probe KEY...`) that reports on each plugin as one JSON
line before and after importing it. When the child dies or a plugin's import outlasts the
timeout, the plugin it was importing is the broken one: it is recorded so, and a new child
carries on with the rest. One child does it all when every plugin behaves.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass

from localmim_cli.plugins import registry

TIMEOUT_VARIABLE = "LOCALMIM_PLUGIN_IMPORT_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
STARTUP_S = 120.0     # for the child to start (and between two imports): a busy machine is slow


@dataclass(frozen=True)
class Probe:
    """What importing one plugin gave: its summary when it loaded, its error when not."""
    ok: bool
    text: str


def _key(kind: str, index: int) -> str:
    return f"{kind}/{index}"


def probe_all(timeout_s: float | None = None) -> dict[tuple[str, int], Probe]:
    """{(kind, index in registry.entries(kind)): Probe} for every installed plugin."""
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S))
    pending = [_key(kind, i) for kind in registry.GROUPS for i, _ in enumerate(registry.entries(kind))]
    results: dict[str, Probe] = {}
    while pending:
        done, blamed = _child(pending, timeout_s)
        results.update(done)
        pending = [k for k in pending if k not in results]
        if blamed is None:       # the child failed before any plugin: nothing to blame, stop
            for k in pending:
                results[k] = Probe(False, "could not be imported: the checking process failed to start")
            break
        results[blamed[0]] = Probe(False, blamed[1])
        pending = [k for k in pending if k != blamed[0]]
    out = {}
    for key, probe in results.items():
        kind, index = key.split("/")
        out[(kind, int(index))] = probe
    return out


def _child(keys: list[str], timeout_s: float) -> tuple[dict[str, Probe], tuple[str, str] | None]:
    """Import `keys` in one child: (what it reported, (key, why) for the plugin it died on or
    hung in, or None when it reported on all of them or none)."""
    proc = subprocess.Popen([sys.executable, "-m", "localmim_cli.plugins.probe", *keys],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    done: dict[str, Probe] = {}
    current: str | None = None
    # The clock runs per plugin import; the child's own start-up (an interpreter) gets longer.
    deadline = time.monotonic() + max(timeout_s, STARTUP_S)
    buffer = b""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                return done, ((current, f"import did not finish within {timeout_s:g} s (hangs?); raise "
                                        f"{TIMEOUT_VARIABLE} if it is only slow") if current else None)
            if not selector.select(timeout=left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:   # the child exited
                code = proc.wait()
                if current is None:
                    return done, None
                return done, (current, f"its import ended the process (exit status {code}; os._exit, "
                                       "KeyboardInterrupt or a crash)")
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    message = json.loads(line)
                except ValueError:
                    continue   # a plugin printing to stdout
                if not isinstance(message, dict) or "key" not in message:
                    continue
                if message.get("start"):
                    current = message["key"]
                    deadline = time.monotonic() + timeout_s
                else:
                    done[message["key"]] = Probe(bool(message["ok"]), str(message["text"]))
                    current = None
                    deadline = time.monotonic() + max(timeout_s, STARTUP_S)
    finally:
        selector.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def _report(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def main(keys: list[str]) -> None:
    """The child: import each plugin in turn, one JSON line before and one after."""
    # localmim's own heavy dependencies first, so a plugin's clock counts only its own import.
    import timm  # noqa: F401
    import torch  # noqa: F401

    for key in keys:
        kind, index = key.split("/")
        record = registry.entries(kind)[int(index)]
        _report({"key": key, "start": True})
        try:
            record.load()
        except BaseException as exc:   # what _load lets through (KeyboardInterrupt): still report it
            record.error = f"failed to import {record.value}: {type(exc).__name__}: {exc}"
        ok = record.ok
        _report({"key": key, "ok": ok, "text": record.plugin.summary if ok else record.error})


if __name__ == "__main__":
    main(sys.argv[1:])
