"""The Prometheus rules pass promtool, and the dashboard and rules use only the exported metrics."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from dashboard_exprs import all_expressions, dashboard_panels, load_dashboard, load_rules

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# The series the server exports (names fixed by the telemetry contract), plus Prometheus' `up`.
EXPORTED = {
    "cispo_tokens_total",
    "cispo_loss_sum",
    "cispo_grad_norm",
    "cispo_optim_steps_total",
    "cispo_tokens_processed_total",
    "cispo_operation_errors_total",
    "cispo_queue_depth",
    "cispo_inflight_requests",
    "cispo_world_size",
    "cispo_cuda_memory_allocated_bytes",
    "cispo_cuda_memory_reserved_bytes",
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "cispo_sampled_tokens_total",
    "cispo_sampled_sequences_total",
    "cispo_sampler_queue_depth",
    "cispo_training_runs",
    "cispo_training_runs_max",
    "cispo_run_trainable_bytes",
    "up",
}
HISTOGRAMS = {
    "cispo_importance_ratio",
    "cispo_batch_clip_fraction",
    "cispo_sampler_trainer_kl",
    "cispo_request_seconds",
    "grpc_server_handling_seconds",
}
EXPORTED |= {name + suffix for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
# The series of one training run each (label `run`).
PER_RUN = {
    "cispo_tokens_total",
    "cispo_loss_sum",
    "cispo_grad_norm",
    "cispo_optim_steps_total",
    "cispo_run_trainable_bytes",
} | {
    name + suffix
    for name in ("cispo_importance_ratio", "cispo_batch_clip_fraction", "cispo_sampler_trainer_kl")
    for suffix in ("_bucket", "_sum", "_count")
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool"}


def promtool(*args: str) -> None:
    if shutil.which("promtool") is None:
        pytest.fail("promtool not found: `make test-tools` installs it (Debian package prometheus)")
    result = subprocess.run(["promtool", *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def metric_names(promql: str) -> set[str]:
    """Names of the series a PromQL expression selects."""
    promql = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)  # string literals
    promql = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", promql)  # label matchers, ranges
    promql = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", promql)
    promql = re.sub(r"\boffset\s+\w+", "", promql)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", promql):
        word, call = match.groups()
        if not call and word not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def test_rules_pass_promtool_check():
    promtool("check", "rules", "rules.yaml")


def test_rules_pass_promtool_unit_tests():
    promtool("test", "rules", "rules_test.yaml")


def test_example_prometheus_config_is_valid():
    promtool("check", "config", "prometheus.yml")


def test_each_alert_has_tests_that_fire_and_that_stay_quiet():
    rules = [rule for group in load_rules(REPO)["groups"] for rule in group["rules"]]
    tests = yaml.safe_load((PROMETHEUS_DIR / "rules_test.yaml").read_text())["tests"]
    alert_tests = [case for test in tests for case in test.get("alert_rule_test", [])]
    checked_exprs = " ".join(case["expr"] for test in tests for case in test.get("promql_expr_test", []))
    for rule in rules:
        if "record" in rule:
            assert rule["record"] in checked_exprs, f"no promql_expr_test for {rule['record']}"
            continue
        name = rule["alert"]
        cases = [case for case in alert_tests if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in cases), f"no test where {name} fires"
        assert any(not case["exp_alerts"] for case in cases), f"no test where {name} stays quiet"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description"} <= rule["annotations"].keys(), name


def test_dashboard_panels_use_the_datasource_variable():
    dashboard = load_dashboard(REPO)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    queried = [p for p in dashboard_panels(dashboard) if p["type"] not in ("row", "text")]
    assert queried
    for panel in queried:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            # Range selectors follow the scrape interval and the zoom.
            for window in re.findall(r"\[([^\]]*)\]", target["expr"]):
                assert window == "$__rate_interval", (panel["title"], target["expr"])
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_dashboard_panels_do_not_overlap():
    taken = set()
    for panel in dashboard_panels(load_dashboard(REPO)):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


def test_dashboard_and_rules_use_only_exported_metrics():
    rules = load_rules(REPO)
    recorded = {rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule}
    queries = list(all_expressions(REPO))
    for variable in load_dashboard(REPO)["templating"]["list"]:
        if variable["type"] == "query":  # label_values(<selector>, <label>): keep the selector
            queries.append((f"variable {variable['name']}", re.sub(r",\s*\w+\)\s*$", ")", variable["query"])))
    used = set()
    for where, promql in queries:
        names = metric_names(promql)
        assert names, f"{where}: no metric found in {promql!r}"
        unknown = {n for n in names - EXPORTED - recorded if not n.startswith("process_")}
        assert not unknown, f"{where}: unknown metrics {sorted(unknown)} in {promql!r}"
        used |= names
    # The board shows the clip, ratio and KL telemetry the issue asks for.
    assert {
        "cispo_tokens_total",
        "cispo_importance_ratio_bucket",
        "cispo_sampler_trainer_kl_sum",
        "cispo_loss_sum",
        "cispo_grad_norm",
        "cispo_request_seconds_bucket",
        "cispo_queue_depth",
        "grpc_server_handled_total",
        "cispo_operation_errors_total",
        "cispo_training_runs",
        "cispo_run_trainable_bytes",
    } <= used


def test_dashboard_shows_the_runs_the_run_variable_selects():
    """`run` lists the runs (several, or all); every per-run selector filters by it, and a panel
    that aggregates them keeps one series per run, except the ratio heatmap (one distribution of
    the selected runs) and plain totals."""
    dashboard = load_dashboard(REPO)
    run = next(v for v in dashboard["templating"]["list"] if v["name"] == "run")
    assert re.fullmatch(r"label_values\(cispo_tokens_total(\{[^}]*\})?, run\)", run["query"]), run["query"]
    assert run["multi"] and run["includeAll"] and run["allValue"] == ".*"
    filtered = 0
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr):
                if name in PER_RUN:
                    assert 'run=~"$run"' in matchers, (panel["title"], expr)
                    filtered += 1
            if not metric_names(expr) & PER_RUN or panel["type"] == "heatmap":
                continue
            for grouping in re.findall(r"\bby \(([^)]*)\)", expr):
                assert "run" in re.split(r",\s*", grouping), (panel["title"], expr)
            if "by (" in expr or "sum(" not in expr:
                assert "{{run}}" in target["legendFormat"], (panel["title"], target["legendFormat"])
    assert filtered >= 15


def test_expressions_have_no_grafana_variables_left():
    expressions = all_expressions(REPO)
    assert len(expressions) > 20
    for where, promql in expressions:
        assert "$" not in promql, where
