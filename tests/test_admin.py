"""The operators' listener (`[admin]`): what it answers, what the ingest listener no
longer answers, its bearer token, reload over HTTP, and `check` on the [admin] table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from tests.daemon import Daemon, signal_record, wait_until

FIREHOSE = """
[firehoses.files]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.01
"""
ADMIN_TOKEN = "admin-secret-token"


def admin_table(daemon: Daemon, extra: str = "") -> str:
    return f'\n[admin]\nlisten = "127.0.0.1:{daemon.admin_port}"\n{extra}'


def assert_json_error(response: requests.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert isinstance(response.json()["error"], str) and response.json()["error"]


ADMIN_ROUTES = [
    ("GET", "/metrics"),
    ("GET", "/v1/status"),
    ("POST", "/v1/reload"),
    ("POST", "/v1/replay"),
    ("POST", "/v1/firehoses/files/replay"),
    ("GET", "/v1/tail"),
    ("GET", "/"),
]


def test_the_ingest_listener_answers_404_for_every_admin_path(make_daemon) -> None:
    daemon = make_daemon(FIREHOSE).start()
    for method, path in ADMIN_ROUTES:
        response = daemon.session.request(method, f"{daemon.url}{path}", timeout=10)
        assert_json_error(response, 404)
    # Load balancers keep their probes on the ingest listener.
    assert daemon.get("/healthz").status_code == 200
    assert daemon.get("/readyz").status_code == 200


def test_status_metrics_and_probes_answer_on_the_admin_listener(make_daemon) -> None:
    daemon = make_daemon(FIREHOSE).start()
    assert daemon.post([signal_record(1), signal_record(2)]).status_code == 202
    wait_until(lambda: daemon.status()["firehoses"]["files"]["last_delivery"])
    status = daemon.status()
    assert status["accepting"] is True
    assert status["firehoses"]["files"]["queued_records"] == 0
    metrics = daemon.admin("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert 'firehosed_signals_accepted_total{account="acme"} 2.0' in metrics.text
    assert daemon.admin("/healthz").json() == {"status": "ok"}
    assert daemon.admin("/readyz").json()["status"] == "ready"
    assert_json_error(daemon.admin("/v1/nothing"), 404)
    assert_json_error(daemon.admin("/v1/status", "POST"), 405)


def test_with_a_token_every_admin_route_needs_it(make_daemon) -> None:
    daemon = make_daemon()
    daemon.write_config(FIREHOSE + admin_table(daemon, 'token_env = "FH_ADMIN"\n'))
    daemon.start(env={"FH_ADMIN": ADMIN_TOKEN})
    for method, path in [*ADMIN_ROUTES, ("GET", "/healthz"), ("GET", "/readyz")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}):
            response = daemon.admin(path, method, headers=headers)
            assert_json_error(response, 401)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    daemon.admin_token = ADMIN_TOKEN
    assert daemon.status()["firehoses"]["files"]["paused"] is False
    assert daemon.admin("/metrics").status_code == 200
    assert daemon.admin("/healthz").status_code == 200
    # The account token of the ingest side opens nothing here.
    assert daemon.admin("/v1/status", headers={"Authorization": "Bearer test-token"}).ok is False


def test_replay_goes_to_the_admin_listener_with_its_token(make_daemon, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be: every delivery fails")
    daemon = make_daemon()
    broken = f"""
[channels.down]
type = "directory"
path = "{blocker}/export"

[firehoses.files]
account = "acme"
channel = "down"
format = "ndjson"
minutes_between_files = 0.01
retry_for = "1s"
"""
    daemon.write_config(broken + admin_table(daemon, 'token_env = "FH_ADMIN"\n'))
    daemon.start(env={"FH_ADMIN": ADMIN_TOKEN})
    assert daemon.post([signal_record(n) for n in range(3)]).status_code == 202
    wait_until(lambda: daemon.events("batch.dead_lettered"))
    wrong = daemon.cli("replay", env={"FH_ADMIN": "not-the-token"})
    assert wrong.returncode == 1 and "401" in wrong.stdout
    result = daemon.cli("replay", env={"FH_ADMIN": ADMIN_TOKEN})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replay files: 1 batches back in delivery" in result.stdout
    # DESIGN's POST /v1/replay: every firehose (or ?firehose=NAME), lines naming it.
    daemon.admin_token = ADMIN_TOKEN
    wait_until(lambda: len(list((daemon.root / "var" / "dead" / "files").glob("*.json"))))
    assert_json_error(daemon.admin("/v1/replay?firehose=nope", "POST"), 404)
    again = daemon.admin("/v1/replay", "POST")
    assert again.status_code == 200, again.text
    lines = [json.loads(line) for line in again.text.splitlines()]
    assert [(x["firehose"], x["records"]) for x in lines] == [("files", 3)]


def test_reload_over_http_answers_ok_or_every_config_error(make_daemon) -> None:
    daemon = make_daemon(FIREHOSE).start()
    good = daemon.config_path.read_text()
    more = '\n[firehoses.more]\naccount = "acme"\nchannel = "local"\n'
    daemon.config_path.write_text(good + more)
    response = daemon.admin("/v1/reload", "POST")
    assert response.status_code == 200, response.text
    assert response.json() == {"reloaded": True}
    assert set(daemon.status()["firehoses"]) == {"files", "more"}
    daemon.config_path.write_text(good.replace('format = "ndjson"', 'format = "xml"'))
    response = daemon.admin("/v1/reload", "POST")
    assert response.status_code == 422, response.text
    (error,) = response.json()["errors"]
    line = good.splitlines().index('format = "ndjson"') + 1
    assert error.startswith(f"{daemon.config_path}:{line}: firehoses.files.format:")
    assert set(daemon.status()["firehoses"]) == {"files", "more"}  # the old config runs on


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('listen = "127.0.0.1:{port}"', "admin.listen: must differ from server.listen"),
        ('listen = "0.0.0.0:{port}"', "admin.listen: must differ from server.listen"),
        ('listen = "localhost"', 'admin.listen: expected "host:port" or "unix:/path"'),
        ('token_env = "FIREHOSED_TEST_SURELY_UNSET"', "admin.token_env: environment variable"),
        ('tokn = "x"', "admin.tokn: unknown key"),
    ],
)
def test_check_reports_admin_problems_with_file_and_line(make_daemon, table, message) -> None:
    daemon = make_daemon()
    daemon.write_config(FIREHOSE + "\n[admin]\n" + table.format(port=daemon.port) + "\n")
    result = daemon.cli("check")
    assert result.returncode == 2, result.stdout
    line = daemon.config_path.read_text().splitlines().index("[admin]") + 2
    assert f"{daemon.config_path}:{line}: {message}" in result.stderr
