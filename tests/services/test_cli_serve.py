"""`densecomm serve` prints the Relay address, serves `densecomm relay`, and stops cleanly on SIGTERM / SIGINT."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_relay_and_clean_shutdown(sig):
    server = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--no-ray", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = None
        deadline = time.time() + 180
        while address is None and time.time() < deadline:
            line = server.stdout.readline()
            assert line or server.poll() is None, "serve exited before it was ready"
            if match := re.search(r"relay ready at (\S+)", line):
                address = match.group(1)
        assert address, "serve never printed its address"
        relay = subprocess.run([sys.executable, "-m", "services.cli", "relay", "recall ann 3 , bob 7 , cal 1 , dee 5 . bob ?",
                                "--address", address, "--mode", "aware"], capture_output=True, text=True, timeout=120)
        assert relay.returncode == 0, relay.stderr
        assert "answer" in relay.stdout and "compression" not in relay.stderr
        assert re.search(r"KV [\d.]+ kB raw -> [\d.]+ kB wire", relay.stdout)
        bad = subprocess.run([sys.executable, "-m", "services.cli", "relay", "x", "--address", address, "--route", "nope"],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 3 and "NOT_FOUND" in bad.stderr
        server.send_signal(sig)
        assert server.wait(timeout=60) == 0
        assert "shutting down" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
