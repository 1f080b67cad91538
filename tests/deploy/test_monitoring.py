"""The monitoring deployment (deploy/, docker-compose.yml's ``monitoring`` profile) agrees with
itself and with what the coordinator serves at /metrics.

No Docker engine runs here, so the files are parsed: Prometheus scrapes the compose service
and port of the coordinator at a path the app serves; Grafana's provisioned data source is
that Prometheus, and the dashboard uses its uid; the files are mounted where the services'
configuration says; every metric and label a panel's query or legend names is served by the
app's /metrics after a small swarm has booked and refused sessions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.service import telemetry
from app.settings import Settings
from tests.api.conftest import FakeClock, admin, example_scenario
from tests.deploy.test_deploy_files import compose, coordinator_env

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "bprr.json"
PROMQL_FUNCTIONS = {"sum", "rate", "increase", "histogram_quantile", "changes", "max", "avg"}
PROMQL_WORDS = {"by", "without", "ignoring", "on", "and", "or", "unless", "bool"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str, str]]:
    """(panel or annotation title, expr, legend) of every query of the dashboard."""
    out = [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in panels()
        for target in panel["targets"]
    ]
    for annotation in dashboard()["annotations"]["list"]:
        if "expr" in annotation:
            out.append((annotation["name"], annotation["expr"], ""))
    return out


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a compose service: repository path -> container path."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            out[source[2:]] = target
    return out


def test_monitoring_services_are_an_optional_profile() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        service = services[name]
        assert service["profiles"] == ["monitoring"], name
        tag = service["image"].partition(":")[2]
        assert tag and tag != "latest", f"{name}: pin the image version"
        for published in service["ports"]:
            assert str(published).startswith("127.0.0.1:"), f"{name} listens on loopback only"
        for source in mounts(service):
            assert (ROOT / source).exists(), source
            assert source.startswith("deploy/"), source
    # The default `docker compose up` is unchanged: the coordinator and PostgreSQL only.
    assert "profiles" not in services["coordinator"] and "profiles" not in services["postgres"]
    volumes = compose()["volumes"]
    for name in ("prometheus", "grafana"):
        named = [v.split(":")[0] for v in services[name]["volumes"] if not v.startswith("./")]
        assert named and all(v in volumes for v in named), name


def test_prometheus_scrapes_the_coordinator(tmp_path: Path, sqlite_client: TestClient) -> None:
    service = compose()["services"]["prometheus"]
    config_flag = [a for a in service["command"] if a.startswith("--config.file=")]
    assert config_flag == [f"--config.file={mounts(service)['deploy/prometheus/prometheus.yml']}"]
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = config["scrape_configs"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    port = coordinator_env()["BPRR_PORT"]
    assert port == str(Settings.model_fields["port"].default)
    assert targets == [f"coordinator:{port}"]
    assert "coordinator" in compose()["services"]
    assert service["depends_on"] == ["coordinator"]
    scraped = sqlite_client.get(job["metrics_path"])
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert "bprr_live_servers" in scraped.text


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    service = compose()["services"]["grafana"]
    mounted = mounts(service)
    provisioning = mounted["deploy/grafana/provisioning"]
    assert provisioning == "/etc/grafana/provisioning"  # where Grafana reads provisioning
    (source,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    prometheus_port = compose()["services"]["prometheus"]["ports"][0].split(":")[-1]
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = load_yaml(DEPLOY / "grafana/provisioning/dashboards/bprr.yml")["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == mounted["deploy/grafana/dashboards"]
    home = service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{mounted['deploy/grafana/dashboards']}/{DASHBOARD.name}"
    # Every panel and query uses the provisioned data source.
    board = dashboard()
    assert board["uid"] and board["title"]
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    taken: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = taken.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']} overlaps {other}"


def names_in(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) of a PromQL expression, which must parse (syntax,
    function names and argument types, by promql-parser); fails on an unknown word."""
    try:
        promql_parser.parse(expr)
    except ValueError as error:
        raise AssertionError(f"{expr!r} is not valid PromQL: {error}") from None
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without|ignoring|on)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|ignoring|on)\s*\([^)]*\)", " ", expr)
    bare = re.sub(r'"[^"]*"', " ", bare)
    metrics = set()
    for word in re.findall(r"[a-zA-Z_:][\w:]*", bare):
        if word in PROMQL_FUNCTIONS or word in PROMQL_WORDS:
            continue
        assert word.startswith(("bprr_", "http_")), f"unknown word {word!r} in {expr!r}"
        metrics.add(word)
    assert metrics, f"no metric in {expr!r}"
    return metrics, labels


def served(client: TestClient) -> dict[str, set[str]]:
    """Sample name -> label names, for every sample /metrics serves (and, for a declared
    family without samples yet, its sample names with no labels known)."""
    out: dict[str, set[str]] = {}
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_count", "_sum"],
            "summary": ["_count", "_sum"],
        }.get(family.type, [""])
        for suffix in suffixes:
            out.setdefault(family.name + suffix, set())
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


@pytest.fixture
def sqlite_client(make_client: Any, sqlite_url: str) -> TestClient:
    client: TestClient = make_client(sqlite_url)
    return client


def test_every_panel_metric_and_label_is_served(
    sqlite_client: TestClient, clock: FakeClock
) -> None:
    client = sqlite_client
    booking = {"client_site": "cluster0", "input_tokens": 20, "output_tokens": 64}
    assert client.post("/v1/scenario", json=example_scenario(), headers=admin()).status_code == 201
    assert client.post("/v1/sessions", json=booking).status_code == 201
    generation = client.get("/v1/overview").json()["generation"]
    # What the sessions and placement code record (the same functions); here directly, so the
    # label sets exist whatever this flow happened to exercise.
    telemetry.record_booking("cluster0", "refused", 0.0)
    telemetry.record_booking("cluster0", "booked", 1.5)
    telemetry.record_replan(generation, "scenario_loaded")
    telemetry.record_prediction(generation, 12.0)
    telemetry.record_measurement(generation, 13.0)
    available = served(client)
    for title, expr, legend in queries():
        metrics, labels = names_in(expr)
        for metric in metrics:
            assert metric in available, f"{title}: {metric} is not served at /metrics"
        known = set().union(*(available[m] for m in metrics)) | {"le"}
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        missing = (labels | shown) - known
        assert not missing, f"{title}: labels {sorted(missing)} not on {sorted(metrics)}"


def test_the_name_check_catches_a_wrong_metric() -> None:
    """The control: a misspelt metric or an unknown word fails the check."""
    metrics, labels = names_in('sum by (client_site) (rate(bprr_bookings_total{outcome="x"}[5m]))')
    assert metrics == {"bprr_bookings_total"} and labels == {"client_site", "outcome"}
    with pytest.raises(AssertionError, match="unknown word"):
        names_in("rate(process_cpu_seconds_total[5m])")
    for broken in ("sum by (client_site (rate(bprr_x[5m]))", "rate(bprr_x)", "ratez(bprr_x[5m])"):
        with pytest.raises(AssertionError, match="not valid PromQL"):
            names_in(broken)
