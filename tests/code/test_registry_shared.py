"""One lock for every shared store (issue 25): which tracking URIs other workspaces can reach, and a
writer of one without the shared slot is refused, saying how to get it."""
from __future__ import annotations

import pytest

from qlora_ops.flows.registry_slot import RegistryLockUnavailable, check_writer, is_shared


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.team", "databricks", "databricks://prof",
                                 "postgresql://u:p@db/mlflow", "postgresql+psycopg2://db/mlflow", "mysql://db/mlflow",
                                 "mysql+pymysql://db/m", "mssql+pyodbc://db/m", "sqlite:////shared/nfs/mlflow.db"])
def test_every_store_other_workspaces_can_reach_is_shared(uri, tmp_path):
    assert is_shared(uri, tmp_path / ".qlora-ops")


def test_private_stores(tmp_path):
    state = tmp_path / "ws" / ".qlora-ops"
    assert not is_shared(f"sqlite:///{state.resolve()}/mlflow.db", state)  # the workspace's default store
    assert is_shared(f"sqlite:///{state.resolve()}/mlflow.db")  # without knowing the workspace: the safe side
    assert is_shared(f"sqlite:///{tmp_path.resolve()}/other/mlflow.db", state)  # a sqlite file elsewhere
    assert not is_shared(str(tmp_path / "mlruns"), state) and not is_shared(f"file://{tmp_path}/mlruns", state)


@pytest.mark.parametrize("uri", ["postgresql://u:secret@db/mlflow", "mysql://db/mlflow", "databricks",
                                 "sqlite:////shared/mlflow.db"])
def test_a_writer_of_a_shared_store_without_the_slot_is_refused_with_how(uri, monkeypatch, tmp_path):
    """Today only http(s) took the slot: two workspaces on one postgres were not serialised."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(RegistryLockUnavailable, match=r"without its lock: PREFECT_API_URL is unset.*export PREFECT_API_URL") as e:
        check_writer(uri, "m", tmp_path / ".qlora-ops")
    assert "secret" not in str(e.value)


def test_the_serving_move_without_the_slot_is_refused(monkeypatch, tmp_path):
    """`verify-serving` and `serve --follow` move `serving` under the slot every writer takes; on a shared store
    without the team's Prefect API the move is refused naming how to get the slot (it was only warned about)."""
    from qlora_ops.flows.cli.serving import _serving_writer
    from qlora_ops.flows.registry_slot import RegistryLockUnavailable
    from qlora_ops.tasks.core.config import Params

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(RegistryLockUnavailable, match="export PREFECT_API_URL"):
        with _serving_writer("postgresql://db/mlflow", "m", Params(), tmp_path):
            pass


def test_the_webhook_records_under_the_writer_and_checks_outside_it(monkeypatch, tmp_path):
    """The follower's record (the alias move, champion re-read) runs inside the slot; the parity check before
    it (minutes of test rows) does not hold it."""
    import contextlib

    from qlora_ops.tasks.serving import webhook

    events: list[str] = []

    @contextlib.contextmanager
    def writer():
        events.append("slot taken")
        yield
        events.append("slot given back")

    @contextlib.contextmanager
    def server(local, digest, port):
        yield f"http://127.0.0.1:{port}"

    monkeypatch.setattr(webhook, "fetch_model", lambda name, v, work: (tmp_path / "m", "d" * 64))
    monkeypatch.setattr(webhook, "scoring_server", server)
    monkeypatch.setattr(webhook, "check", lambda *a, **k: events.append("check") or {"passed": True})
    monkeypatch.setattr(webhook, "record", lambda res, alias, **k: events.append(f"record {k['lock_path']}")
                        or {**res, "alias_moved": False})
    handle = webhook.champion_checker("m", "champion", threshold=0.02, confidence=0.95, work=tmp_path,
                                      writer=writer, lock_path=tmp_path / "registry.lock")
    handle("m", "champion", 3)
    assert events == ["check", "slot taken", f"record {tmp_path / 'registry.lock'}", "slot given back"]
