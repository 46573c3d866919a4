"""The PrometheusRule's groups pass `promtool check rules` and the unit tests beside them."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: scripts/install-system-deps.sh installs Debian's prometheus package")
    return path


def rule_groups() -> dict:
    rule = yaml.safe_load((DEPLOY / "base" / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    return {"groups": rule["spec"]["groups"]}


@pytest.fixture
def rules_dir(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups(), sort_keys=False))
    shutil.copy(DEPLOY / "prometheus" / "rules_test.yaml", tmp_path / "rules_test.yaml")
    return tmp_path


def run(*argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_rules_are_valid(rules_dir):
    checked = run("check", "rules", "rules.yaml", cwd=rules_dir)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr


def test_the_rules_pass_their_unit_tests(rules_dir):
    tested = run("test", "rules", "rules_test.yaml", cwd=rules_dir)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_rule_tests_can_fail(rules_dir):
    # The same tests against a rule with the wrong formula must fail: they check values.
    broken = rule_groups()
    for group in broken["groups"]:
        for rule in group["rules"]:
            if rule.get("record") == "medgemma:desired_replicas":
                rule["expr"] = rule["expr"].replace("0.75", "0.5")
    (rules_dir / "rules.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
    assert run("test", "rules", "rules_test.yaml", cwd=rules_dir).returncode != 0


def test_every_alert_has_a_test_case():
    tests = yaml.safe_load((DEPLOY / "prometheus" / "rules_test.yaml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    alerts = {r["alert"] for g in rule_groups()["groups"] for r in g["rules"] if "alert" in r}
    assert alerts <= tested, alerts - tested
