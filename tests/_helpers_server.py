"""A real `qora serve` for the server tests: a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from typing import NamedTuple


class Server(NamedTuple):
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT, without /v1
    port: int
    log: list[str]  # its stderr lines so far (a thread keeps reading them)


@contextlib.contextmanager
def running_server(model_path, *args, timeout: float = 60, argv_bytes: bool = False):
    """`python -m qora serve --load MODEL --port 0 ARGS...`; yields a Server once it says where it listens,
    and stops it (terminate, then kill) on the way out."""
    cmd = [sys.executable, "-m", "qora", "serve", "--load", model_path, "--port", "0", *args]
    # argv_bytes: arguments as bytes, for file names that are not valid UTF-8
    cmd = [os.fsencode(c) for c in cmd] if argv_bytes else [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, errors="replace")
    log: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        url = None
        while url is None:
            line = proc.stderr.readline()
            if not line:
                raise AssertionError(f"the server exited early: {''.join(log)}")
            log.append(line)
            if " at http://" in line:
                url = line.split(" at ", 1)[1].split()[0].removesuffix("/v1")
            assert time.monotonic() < deadline, "the server did not start"
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()  # keep the pipe drained
        yield Server(proc, url, int(url.rsplit(":", 1)[1]), log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
