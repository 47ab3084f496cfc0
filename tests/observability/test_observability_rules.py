"""The alert rules, dashboards and provisioning files, checked without a running agent:
promtool's syntax check and unit tests, and the structure Grafana needs."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from harness.prometheus import PROMTOOL

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
ALERTS = GRAFANA / "alerts.yml"
ALERT_TESTS = GRAFANA / "alerts_test.yml"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE_UID = "virtrelay-prometheus"
# Grafana's own variables that panel queries may use.
BUILTIN_VARIABLES = {"__rate_interval", "__range", "__interval"}
METRIC = re.compile(r"\b(virtrelay_[a-z0-9_]+)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARDS}


def panels(board: dict) -> list[dict]:
    """Every panel, rows excluded (nested panels of collapsed rows included)."""
    found = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def test_alert_rules_pass_promtool_check():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_unit_tests_pass_promtool():
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_can_fail():
    """A wrong expectation must fail: the unit tests are not vacuous."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    case = next(c for group in tests["tests"] for c in group["alert_rule_test"]
                if c["exp_alerts"])
    case["exp_alerts"] = []
    broken = ALERT_TESTS.with_name(".alerts_test_broken.yml")
    try:
        broken.write_text(yaml.safe_dump(tests))
        result = promtool("test", "rules", str(broken))
    finally:
        broken.unlink(missing_ok=True)
    assert result.returncode != 0 and case["alertname"] in result.stdout + result.stderr


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_stays_quiet():
    cases = [case for group in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
             for case in group["alert_rule_test"]]
    for rule in alert_rules():
        name = rule["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name}: no case where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{name}: no case where it is quiet"


def test_every_alert_says_what_to_do():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert rule["alert"].startswith("VirtRelay"), rule["alert"]


def test_example_prometheus_config_is_valid(tmp_path):
    config = (GRAFANA / "prometheus.example.yml").read_text()
    assert "/etc/prometheus/virt-relay-alerts.yml" in config
    local = tmp_path / "prometheus.yml"
    local.write_text(config.replace("/etc/prometheus/virt-relay-alerts.yml", str(ALERTS)))
    result = promtool("check", "config", str(local))
    assert result.returncode == 0, result.stdout + result.stderr
    scrape = yaml.safe_load(config)["scrape_configs"]
    assert [job["job_name"] for job in scrape] == ["virt-relay-agent", "virt-relay-console"]
    for rule in alert_rules():
        if "up{" in rule["expr"]:
            job = "virt-relay-console" if "Console" in rule["alert"] else "virt-relay-agent"
            assert f'job="{job}"' in rule["expr"], rule["alert"]


def test_four_dashboards_with_unique_uids():
    boards = dashboards()
    assert set(boards) == {"virt-relay-fleet.json", "virt-relay-host.json",
                           "virt-relay-commands.json", "virt-relay-console.json"}
    uids = [board["uid"] for board in boards.values()]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("name", [path.name for path in DASHBOARDS])
def test_dashboard_is_well_formed(name):
    board = dashboards()[name]
    assert board["title"].startswith("virt-relay / ") and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    selector = "console" if name == "virt-relay-console.json" else "host"
    assert set(variables) == {"datasource", "job", selector}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["current"]["value"] == DATASOURCE_UID
    instance_query = variables[selector]["query"]["query"]
    assert instance_query.startswith("label_values(") and instance_query.endswith(", instance)")
    assert '{job="$job"}' in instance_query
    ids = [p["id"] for p in board["panels"]] + [
        p["id"] for row in board["panels"] if row["type"] == "row" for p in row["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
    for panel in panels(board):
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel.get("description"), f"{title}: say what the panel shows"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            expr = target["expr"]
            assert METRIC.search(expr) or "up{" in expr, f"{title}: {expr}"
            used = set(re.findall(r"\$\{?(\w+)", expr))
            assert used <= set(variables) | BUILTIN_VARIABLES, f"{title}: {used}"
            if "virtrelay_" in expr and f"${selector}" not in expr:
                raise AssertionError(f"{title}: {expr} ignores the ${selector} selection")


def test_provisioning_points_at_the_dashboards_and_the_data_source():
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning/datasources/virt-relay.yml").read_text())
    [source] = datasources["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/virt-relay.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_every_metric_in_dashboards_and_alerts_is_documented():
    documented = set(METRIC.findall((ROOT / "docs/metrics.md").read_text()))
    named = set(METRIC.findall(ALERTS.read_text()))
    for board in dashboards().values():
        for panel in panels(board):
            for target in panel["targets"]:
                named |= set(METRIC.findall(target["expr"]))
    named = {re.sub(r"_(bucket|sum|count)$", "", name) for name in named}
    assert named - documented == set(), "document these in docs/metrics.md"


def test_grafana_readme_lists_every_panel_and_alert():
    readme = (GRAFANA / "README.md").read_text()
    for board in dashboards().values():
        for panel in panels(board):
            assert panel["title"] in readme, f"grafana/README.md: panel {panel['title']!r}"
    for rule in alert_rules():
        assert rule["alert"] in readme, f"grafana/README.md: alert {rule['alert']}"
