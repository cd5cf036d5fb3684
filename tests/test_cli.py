"""pipeline.py's command line: parameters, and submit against a fake kfp.Client (no KFP runs here)."""

import types

import kfp
import pytest

import pipeline


def test_params_are_typed_by_the_pipeline_signature():
    assert pipeline.parse_params(["n_estimators=5", "margin=0.5", "source=s3://b/k.csv"]) == {
        "n_estimators": 5, "margin": 0.5, "source": "s3://b/k.csv"}


@pytest.mark.parametrize("pair, message", [
    ("trees=5", "expected key=value with key one of"),
    ("n_estimators", "expected key=value"),
    ("n_estimators=many", "'many' is not a valid int"),
])
def test_bad_params_are_refused_with_a_message(pair, message):
    with pytest.raises(SystemExit, match=message):
        pipeline.parse_params([pair])


class FakeClient:
    """Records what submit asks of KFP; answers with a run in the given final state."""

    calls = []
    final_state = "SUCCEEDED"

    def __init__(self, host):
        self.calls.append(("host", host))

    def create_run_from_pipeline_package(self, spec, arguments, experiment_name, enable_caching=None):
        self.calls.append(("create", spec, arguments, experiment_name, enable_caching))
        return types.SimpleNamespace(run_id="run-123")

    def wait_for_run_completion(self, run_id, timeout):
        self.calls.append(("wait", run_id, timeout))
        return types.SimpleNamespace(state=self.final_state)


@pytest.mark.parametrize("state, code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_submit_prints_the_dashboard_url_and_waits_on_request(monkeypatch, capsys, tmp_path, state, code):
    FakeClient.calls, FakeClient.final_state = [], state
    monkeypatch.setattr(kfp, "Client", FakeClient)
    spec = tmp_path / "p.yaml"
    spec.write_text("{}")
    assert pipeline.main(["submit", "--spec", str(spec), "--host", "http://127.0.0.1:8080/", "--param",
                          "n_estimators=3", "--wait", "--timeout", "60"]) == code
    assert FakeClient.calls == [("host", "http://127.0.0.1:8080/"), ("create", str(spec), {"n_estimators": 3},
                                "rental-price", True), ("wait", "run-123", 60)]
    out = capsys.readouterr().out
    assert "started run run-123: http://127.0.0.1:8080/#/runs/details/run-123" in out
    assert f"finished: {state}" in out


def test_submit_without_wait_does_not_wait_and_can_reuse_nothing(monkeypatch, tmp_path):
    FakeClient.calls = []
    monkeypatch.setattr(kfp, "Client", FakeClient)
    (tmp_path / "p.yaml").write_text("{}")
    assert pipeline.main(["submit", "--spec", str(tmp_path / "p.yaml"), "--host", "http://h", "--no-cache"]) == 0
    assert [c[0] for c in FakeClient.calls] == ["host", "create"]
    assert FakeClient.calls[1][-1] is False  # enable_caching


def test_submit_names_what_is_missing(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="no pipeline spec at .*nope.yaml: run `make compile` first"):
        pipeline.main(["submit", "--spec", str(tmp_path / "nope.yaml")])

    def refuse(host):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(kfp, "Client", refuse)
    (tmp_path / "p.yaml").write_text("{}")
    with pytest.raises(SystemExit, match=r"KFP at http://127.0.0.1:9 refused or did not answer \(ConnectionError"):
        pipeline.main(["submit", "--spec", str(tmp_path / "p.yaml"), "--host", "http://127.0.0.1:9"])
