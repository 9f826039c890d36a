"""A real Prometheus scrapes a running stack: every dashboard query and every alert expression returns data.

Starts LocalStack (zoo route, loopback) and `prometheus` (Debian package) scraping the four metrics ports
every 0.5 s, sends a few relays (good ones and one with an unknown route), then asks Prometheus's HTTP API.
Skipped where `prometheus` is not on PATH; `.ci/run` installs it (`apt-get install prometheus`).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from services.client import build_request
from services.config import load_config
from services.stack import LocalStack, free_port
from tests.deploy.tools import prometheus_tools
from tests.services.conftest import collect, run, status_of

CHART = Path(__file__).resolve().parents[2] / "helm" / "densecomm"
pytestmark = pytest.mark.skipif(prometheus_tools() is None,
                                reason="prometheus not on PATH: apt-get install prometheus (.ci/run installs it)")
COMPARISON = re.compile(r"\s*(>|<|>=|<=|==|!=)\s*[\d.]+\s*$")


def scrape_config(metrics_ports: dict[str, int]) -> dict:
    """One job per service (job = densecomm-<service>, as the alert on `up` expects), loopback targets."""
    return {"global": {"scrape_interval": "500ms", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": f"densecomm-{kind}", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                               for kind, port in metrics_ports.items()]}


def queries() -> dict[str, str]:
    """name -> PromQL: every dashboard target and every alert expression (its threshold comparison cut off, so
    a healthy stack still returns the series the alert compares)."""
    dashboard = json.loads((CHART / "dashboards/densecomm.json").read_text())
    out = {f"panel {p['id']} {t['refId']}": t["expr"] for p in dashboard["panels"] for t in p["targets"]}
    rules = yaml.safe_load((CHART / "prometheus/densecomm-rules.yaml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        out[f"alert {rule['alert']}"] = COMPARISON.sub("", rule["expr"].strip())
        out[f"alert {rule['alert']} (full)"] = rule["expr"]
    return out


def instant(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def has_data(answer: dict) -> bool:
    return answer["status"] == "success" and any(math.isfinite(float(r["value"][1])) for r in answer["data"]["result"])


@pytest.fixture(scope="module")
def stack():
    with LocalStack(load_config(None, relay_port=0)) as stack:
        yield stack


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    server, promtool = prometheus_tools()
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(stack.metrics_ports)))
    check = subprocess.run([promtool, "check", "config", config], check=False, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port("127.0.0.1")
    log = open(work / "prometheus.log", "w")
    process = subprocess.Popen([server, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (work / "prometheus.log").read_text()
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def test_every_dashboard_and_alert_query_returns_data(stack, prometheus):
    jobs = {f"densecomm-{k}" for k in ("relay", "sender", "adapter", "receiver")}
    deadline = time.monotonic() + 15
    while {t["metric"]["job"] for t in instant(prometheus, "up == 1")["data"]["result"]} < jobs:  # first scrape of each
        assert time.monotonic() < deadline, instant(prometheus, "up")["data"]["result"]
        time.sleep(0.25)
    for i in range(4):
        events = run(collect(stack.relay_address, build_request(f"Relay number {i}: the cat sat.", mode="unaware", max_new_tokens=6)))
        assert events[-1].stats.wire_bytes > 0
    assert status_of(stack.relay_address, build_request("x", route="no-such-route")) != grpc.StatusCode.OK
    wanted = queries()
    deadline = time.monotonic() + 30
    while True:
        answers = {name: instant(prometheus, expr) for name, expr in wanted.items()}
        assert all(a["status"] == "success" for a in answers.values()), {n: a for n, a in answers.items() if a["status"] != "success"}
        missing = [name for name, a in answers.items() if not name.endswith("(full)") and not has_data(a)]
        if not missing:
            break
        assert time.monotonic() < deadline, f"no data for {missing}: {[answers[m] for m in missing]}"
        run(collect(stack.relay_address, build_request("One more relay.", mode="unaware", max_new_tokens=6)))  # fresh samples
        time.sleep(1)
    # the error-rate alert's series: the unknown route counted with its status code at the relay
    codes = {r["metric"]["code"] for r in answers["alert DenseCommErrorRateHigh"]["data"]["result"]}
    assert codes and "OK" not in codes
