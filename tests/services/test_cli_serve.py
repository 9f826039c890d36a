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


def test_codec_calibrate_writes_both_bases_and_the_route_then_relays_through_pca(random_route, tmp_path):
    """`densecomm codec calibrate` on saved checkpoints: bases beside the sender and the adapter, for the
    spaces each hop ships (RoPE stripped); a stack serving that route then relays with codec pca."""
    import shutil

    from densecomm_core.codec.transform import BASIS_FILE, KVBasis
    from densecomm_core.models import load_model
    from densecomm_core.zoo import tasks
    from services.cli import main
    from services.client import build_request
    from services.config import load_config
    from services.stack import LocalStack
    from tests.services.conftest import collect, run

    route = {key: (str(shutil.copytree(path, tmp_path / key)) if key != "name" else path) for key, path in random_route.items()}
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(e.context for e in tasks.make_split("train", 4)) + "\n")
    assert main(["codec", "calibrate", "--sender", route["sender"], "--adapter", route["adapter"],
                 "--receiver", route["receiver"], "--texts", str(texts)]) == 0
    sender_basis = KVBasis.load(f"{route['sender']}/{BASIS_FILE}")
    receiver_basis = KVBasis.load(f"{route['adapter']}/{BASIS_FILE}")
    assert sender_basis.cache_fingerprint == load_model(route["sender"]).geometry.fingerprint()
    assert receiver_basis.cache_fingerprint == load_model(route["receiver"]).geometry.fingerprint()
    assert not sender_basis.rope_applied and not receiver_basis.rope_applied
    route["name"] = "calibrated"
    with LocalStack(load_config(None, relay_port=0, routes=[route], default_route="calibrated")) as stack:
        stats = run(collect(stack.relay_address, build_request("recall ann 3 , bob 7 . bob ?", route="calibrated",
                                                                codec="pca", max_new_tokens=4)))[-1].stats
    assert [hop.codec for hop in stats.hops] == ["pca", "pca"] and stats.hops[0].wire_bytes < stats.hops[0].raw_bytes


def test_codec_calibrate_loads_both_models_and_the_adapter_on_device(monkeypatch, tmp_path):
    """--device reaches both load_model calls and the adapter follows the sender's device. The recording
    load_model puts the models on the data-free ``meta`` device, where calibrate (recorded, not run) would run."""
    import torch

    import densecomm_core.codec.calibrate as calibration
    import densecomm_core.models as models
    from densecomm_core.zoo.pair import zoo_model_dirs
    from services.cli import main

    real, loads, calibrated = models.load_model, [], []

    def recording_load_model(path, dtype=None, device="cpu"):
        loads.append((str(path), dtype, device))
        model = real(path, dtype=dtype)
        model.model.to("meta")
        return model

    def recording_calibrate(sender, texts, adapter=None, receiver=None, strip_rope=True):
        calibrated.append((texts, next(adapter.parameters()).device, sender.model.device, receiver.model.device))
        return None, None  # nothing written beside the committed zoo weights

    monkeypatch.setattr(models, "load_model", recording_load_model)
    monkeypatch.setattr(calibration, "calibrate", recording_calibrate)
    texts = tmp_path / "texts.txt"
    texts.write_text("recall ann 3 , bob 7 . bob ?\nrecall cal 1 . cal ?\n")
    assert main(["codec", "calibrate", "--texts", str(texts), "--device", "cuda:1", "--dtype", "bfloat16"]) == 0
    sender, receiver = (str(d) for d in zoo_model_dirs())
    assert loads == [(sender, torch.bfloat16, "cuda:1"), (receiver, torch.bfloat16, "cuda:1")]
    meta = torch.device("meta")
    assert calibrated == [(["recall ann 3 , bob 7 . bob ?", "recall cal 1 . cal ?"], meta, meta, meta)]
    loads.clear()
    assert main(["codec", "calibrate", "--texts", str(texts)]) == 0
    assert [device for *_, device in loads] == ["cpu", "cpu"]  # the default: as before
