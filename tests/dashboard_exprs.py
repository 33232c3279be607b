"""The PromQL expressions of the Grafana dashboard and the Prometheus rules, ready to evaluate.

`all_expressions(repo_root)` lists every expression in the dashboard's panel targets and in the
recording and alerting rules, with Grafana's variables replaced so that each one is plain PromQL
that Prometheus' HTTP API accepts.
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

DASHBOARD = Path("deploy/grafana/cispo-dashboard.json")
RULES = Path("deploy/prometheus/rules.yaml")

# Values for the Grafana variables the dashboard's queries use.
DEFAULT_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "job": "cispo",
    "instance": ".*",
    "run": ".*",
}

# $name, ${name}, ${name:format} and the legacy [[name]].
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    """`expr` with every Grafana variable replaced; KeyError for a variable with no value."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def replace(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def load_dashboard(repo_root: str | Path) -> dict:
    return json.loads((Path(repo_root) / DASHBOARD).read_text())


def load_rules(repo_root: str | Path) -> dict:
    return yaml.safe_load((Path(repo_root) / RULES).read_text())


def dashboard_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def all_expressions(repo_root: str | Path, variables: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(where, promql) for each dashboard target and each rule, variables substituted.

    `where` is `dashboard panel '<title>' target <refId>`, `rules.yaml record <name>` or
    `rules.yaml alert <name>`. An alert's expression is its condition: it returns data only
    while the condition holds. `variables` overrides DEFAULT_VARIABLES (e.g. a shorter
    `__rate_interval` for a fast scrape interval).
    """
    expressions = []
    for panel in dashboard_panels(load_dashboard(repo_root)):
        for target in panel.get("targets", []):
            where = f"dashboard panel {panel['title']!r} target {target['refId']}"
            expressions.append((where, substitute(target["expr"], variables)))
    for group in load_rules(repo_root)["groups"]:
        for rule in group["rules"]:
            where = f"rules.yaml record {rule['record']}" if "record" in rule else (f"rules.yaml alert {rule['alert']}")
            expressions.append((where, rule["expr"].strip()))
    return expressions
