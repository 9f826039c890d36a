"""The Helm chart: values validate against the schema, the rendered config keys exist, dashboards query real series."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import jsonschema
import pytest
import yaml

from services.config import Resources, RouteConfig, ServeConfig
from services.metrics import ServiceMetrics

CHART = Path(__file__).resolve().parent.parent / "helm" / "densecomm"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def merged(overrides: str) -> dict:
    """values.yaml overlaid with a values file, as helm merges them (maps deep, lists replaced)."""

    def merge(base, extra):
        if isinstance(base, dict) and isinstance(extra, dict):
            return {k: merge(base[k], v) if k in base else v for k, v in extra.items()} | {k: v for k, v in base.items() if k not in extra}
        return extra

    base = yaml.safe_load((CHART / "values.yaml").read_text())
    return merge(base, yaml.safe_load((CHART / overrides).read_text())) if overrides else base


@pytest.mark.parametrize("values", ["", "ci/test-values.yaml"])
def test_values_match_the_schema(values):
    data = merged(values)
    if not values:
        data["image"]["repository"] = "example/densecomm"  # required at install time
    jsonschema.validate(data, SCHEMA)
    assert data["defaultRoute"] in [r["name"] for r in data["routes"]]


def test_schema_rejects_bad_values():
    data = merged("ci/test-values.yaml")
    data["services"]["sender"]["replicas"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, SCHEMA)
    data = merged("ci/test-values.yaml")
    data["routes"][0]["dtype"] = "int8"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, SCHEMA)


def test_every_top_level_value_has_a_doc_comment():
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-zA-Z]\w*:", line):
            documented = lines[i - 1].startswith("# --") or (i + 1 < len(lines) and lines[i + 1].strip().startswith("# --"))
            assert documented, line


def test_rendered_service_config_keys_exist():
    template = (CHART / "templates/configmap.yaml").read_text()
    keys = set(re.findall(r"^\s{4}(\w+) =", template, flags=re.M))
    known = {f.name for f in fields(ServeConfig)} | {f.name for f in fields(RouteConfig)} | {f.name for f in fields(Resources)}
    assert keys and keys <= known, keys - known
    sections = set(re.findall(r"^\s{4}\[\[?(\w+)", template, flags=re.M))
    assert sections <= {"routes", "{{"} | {f.name for f in fields(ServeConfig)}


def test_dashboard_queries_only_series_the_services_export():
    dashboard = json.loads((CHART / "dashboards/densecomm.json").read_text())
    exported = {metric.name for metric in ServiceMetrics("x").registry.collect()}
    exported |= {f"{name}_{suffix}" for name in exported for suffix in ("total", "bucket", "count", "sum")}
    queried = {name for panel in dashboard["panels"] for target in panel["targets"] for name in re.findall(r"densecomm_\w+", target["expr"])}
    assert queried and queried <= exported, queried - exported
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
