"""A year in minutes (issue 25, item 5): twelve rounds of new data through the real `qlora-ops run` (tiny
random Llama, a temp git + DVC workspace whose data.source is a drop directory, a real Prefect server and
the session's real `mlflow server`), with the invariants of docs/reliability.md ("A year unattended")
checked after every round:

- no test row, nor a near-duplicate of one, in any training split ever prepared (each synthetic item `Item
  <i>` is one cluster: its recased, re-punctuated copies are its near-duplicates);
- exactly one `champion`, on a complete version whose promotion is recorded (tags: ready, promoted or forced,
  a reason); nothing `incomplete` once the next command has run; `serving` never on a rejected version;
- the quarantined drops listed by `status`, and the loop still running after them;
- the decision ledger within the yearly budget on every test-set lineage.

The rounds: adds; near-duplicates of test rows; cosmetic edits; a corrections file; a bad drop
(quarantined); adds after the budget of lineage 1 is spent (deferred); a split-setting change (refused,
then with `data new-lineage`); a kill at the first registry commit write; the next run repairing it; a
manual `promote --force` racing a run; near-duplicates of trained rows; adds.

The tiny model cannot learn: the gates are lax (this proves the loop's bookkeeping, not a gain), and
decisions_per_year 3 makes the budget run out within the year.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_workspace, start_prefect_server

pytestmark = pytest.mark.slow

LABELS = ["json", "os", "re", "math"]
ITEM = re.compile(r"item (\d+)", re.I)
# Dies at the first write of a registry commit (the plan is written, its writes not yet applied): a kill
# between the two, in the real run process, when QLORA_YEAR_KILL is set.
PLANT = '''
import os
if os.environ.get("QLORA_YEAR_KILL"):
    from mlflow.tracking import MlflowClient
    _real = MlflowClient.set_model_version_tag
    def _die(self, name, version, key, value):
        if key == "status" and value in ("ready", "deferred"):
            os._exit(9)
        return _real(self, name, version, key, value)
    MlflowClient.set_model_version_tag = _die
'''


def row(i: int, label: str | None = None, variant: int = 0) -> str:
    text = f"Item {i} is about {LABELS[i % 4]} things, number {i}."
    if variant == 1:  # recased, punctuation gone: a near-duplicate (the same normalised prompt)
        text = text.upper().replace(",", "").replace(".", "")
    elif variant == 2:  # cosmetic edit: spacing and punctuation
        text = text.replace(" is about", "  is about").replace(".", " !")
    return json.dumps({"instruction": "Which module is this about?", "input": text,
                       "output": label or LABELS[i % 4]}) + "\n"


def rows(ids, **kw) -> str:
    return "".join(row(i, **kw) for i in ids)


class Year:
    def __init__(self, ws: Path, drops: Path, prefect, mlflow_uri: str, name: str):
        self.ws, self.drops, self.prefect, self.uri, self.name = ws, drops, prefect, mlflow_uri, name
        self.trained: set[int] = set()  # every item ever in a prepared train split
        self.log: list[str] = []
        self.t = time.monotonic()

    def cli(self, *args: str, kill: bool = False, wait: bool = True):
        env = self.prefect.client_env(PYTHONPATH=f"{self.ws.parent / 'plant'}:{self.ws}", MLFLOW_TRACKING_URI=self.uri)
        if kill:
            env["QLORA_YEAR_KILL"] = "1"
        cmd = [sys.executable, "-m", "qlora_ops.flows.cli", *args, "--workspace", str(self.ws)]
        if not wait:
            return subprocess.Popen(cmd, cwd=self.ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        return subprocess.run(cmd, cwd=self.ws, env=env, capture_output=True, text=True, timeout=600)

    def run(self, expect: int, kill: bool = False) -> str:
        r = self.cli("run", "--params", "params/year.yaml", kill=kill)
        out = r.stdout + r.stderr
        assert r.returncode == expect, f"expected exit {expect}, got {r.returncode}:\n{out[-4000:]}"
        self.log += [f"  {x.strip()}" for x in out.splitlines() if x.startswith(("stage seconds:", "total wall time:"))]
        return out

    def params(self, **split) -> None:
        p = {"model": {"source": str(self.ws.parent / "model"), "max_seq_len": 96},
             "data": {"source": str(self.drops), "raw": "data/raw/year", "prepared": "data/prepared/year",
                      "split": {"val": 0.15, "test": 0.25, **split}},
             "training": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1,
                          "warmup_steps": 1},
             "eval": {"batch_size": 16, "max_new_tokens": 3},
             "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0},
             "registry": {"model_name": self.name, "experiment": self.name, "yearly_false_promotion": 0.05,
                          "decisions_per_year": 3},
             "orchestration": {"retries": 0}}
        (self.ws / "params" / "year.yaml").write_text(yaml.safe_dump(p))

    def versions(self) -> dict[int, dict]:
        from mlflow.tracking import MlflowClient

        c = MlflowClient(self.uri)
        return {int(v.version): dict(v.tags or {}) for v in c.search_model_versions(f"name = '{self.name}'")}

    def entries(self) -> list:
        from qlora_ops.tasks.gates import ledger

        return ledger.ledger_of(self.versions())

    # ------------------------------------------------------------ the invariants
    def split_items(self, split: str) -> set[int]:
        f = self.ws / "data" / "prepared" / "year" / f"{split}.jsonl"
        return {int(ITEM.search(json.loads(x)["prompt"]).group(1)) for x in f.read_text().splitlines()}

    def check(self, what: str) -> None:
        from mlflow.tracking import MlflowClient

        from qlora_ops.tasks.gates import ledger
        from qlora_ops.tasks.registry.journal import pending

        self.trained |= self.split_items("train")
        test = self.split_items("test")
        assert not test & self.trained, f"{what}: test items ever trained on: {sorted(test & self.trained)}"

        c = MlflowClient(self.uri)
        versions = {int(v.version): dict(v.tags or {}) for v in c.search_model_versions(f"name = '{self.name}'")}
        aliases = dict(c.get_registered_model(self.name).aliases or {})
        champ = int(aliases["champion"])  # exactly one: an alias names one version
        t = versions[champ]
        assert t.get("status") == "ready" and t.get("promotion_reason"), (what, champ, t)
        assert t.get("promoted") == "true" or t.get("forced_promotion_by"), (what, champ, t)
        if "serving" in aliases:
            assert versions[int(aliases["serving"])].get("status") != "rejected", what
        if pending(c, self.name) is None:  # a killed commit is finished by the next command; none left over
            assert not [v for v, t in versions.items() if t.get("status") == "incomplete"], (what, versions)
        budget = 0.05
        for lin in {e.lineage for e in ledger.ledger_of(versions)}:
            spent = sum(e.alpha / 2 for e in ledger.ledger_of(versions) if e.lineage == lin)
            assert spent <= budget + 1e-9, (what, lin, spent)
        self.log.append(f"{what}: champion v{champ}, {len(versions)} versions, test {len(test)} items, "
                        f"{len(ledger.ledger_of(versions))} decisions, {time.monotonic() - self.t:.0f} s")
        self.t = time.monotonic()


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    with start_prefect_server(tmp_path_factory.mktemp("prefect-year") / "home") as server:
        yield server


@pytest.mark.timeout(1200)
def test_a_year_of_drops_keeps_every_invariant(tmp_path, prefect, mlflow_server, tiny_model_dir):
    import shutil
    import uuid

    ws = make_workspace(tmp_path / "repo")
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    (tmp_path / "plant").mkdir()
    (tmp_path / "plant" / "sitecustomize.py").write_text(PLANT)
    drops = tmp_path / "drops"
    drops.mkdir()
    y = Year(ws, drops, prefect, mlflow_server, f"year-{uuid.uuid4().hex[:8]}")
    y.params()
    t0 = time.time()

    # 1. the first drop: the first champion
    (drops / "week01.jsonl").write_text(rows(range(0, 60)))
    y.run(0)
    y.check("1 first drop")
    tested = sorted(y.split_items("test"))

    # 2. adds, and near-duplicates of rows in test: they join their test cluster
    (drops / "week02.jsonl").write_text(rows(range(60, 80)) + rows(tested[:4], variant=1))
    out = y.run(0)
    assert re.search(r"data version \w+ vs \w+: rows \d+ -> \d+: \+\d+ added", out), out[-3000:]  # the data card
    y.check("2 adds + near-duplicates of test rows")
    assert set(tested) <= y.split_items("test")  # pinned: test rows stay in test

    # 3. cosmetic edits of earlier rows (the same normalised prompt and answer: duplicates, dropped)
    (drops / "week03.jsonl").write_text(rows(range(80, 90)) + rows(range(10, 14), variant=2))
    y.run(0)
    y.check("3 edits")

    # 4. a corrections file: a label corrected by prompt
    fixed = sorted(y.split_items("train"))[0]
    (drops / "week04.corrections.jsonl").write_text(row(fixed, label=LABELS[(fixed + 1) % 4]))
    y.run(0)
    y.check("4 corrections")

    # 5. a bad drop (a corrected label in an ordinary file): quarantined, the loop goes on (exit 6)
    (drops / "week05.jsonl").write_text(rows(range(90, 95)) + row(fixed + 1, label=LABELS[(fixed + 2) % 4]))
    out = y.run(6)
    assert "week05.jsonl" in out
    y.check("5 bad drop")
    st = y.cli("status", "--params", "params/year.yaml")
    assert st.returncode == 0 and "week05.jsonl" in st.stdout, st.stdout + st.stderr

    # 6. adds after three decisions on lineage 1: the budget is spent, the version is registered deferred
    (drops / "week06.jsonl").write_text(rows(range(100, 120)))
    y.run(0)
    newest = max(y.versions())
    assert y.versions()[newest]["status"] == "deferred", y.versions()[newest]
    assert "budget of test-set lineage 1 is spent" in y.versions()[newest]["promotion_reason"]
    y.check("6 budget spent")

    # 7. a split-setting change: refused naming the key, then a new test-set lineage
    y.params(seed=7)
    out = y.run(2)
    assert "split.seed" in out and "new-lineage" in out, out[-3000:]
    r = y.cli("data", "new-lineage", "--params", "params/year.yaml", "--reason", "seed 7")
    assert r.returncode == 0, r.stdout + r.stderr
    (drops / "week07.jsonl").write_text(rows(range(120, 140)))
    out = y.run(0)
    assert "test-set lineage 2 is new to champion v1" in out and "comparisons with the champion restart" in out, out[-3000:]
    assert "re-evaluated on these rows" in out  # the champion scored again, on the new lineage's test rows
    newest = max(y.versions())
    assert y.versions()[newest]["status"] == "ready"  # decided again: a new lineage has a whole budget
    assert [e.lineage for e in y.entries() if e.version == newest] == [2]
    y.check("7 new lineage")

    # 8. killed at the first write of the registry commit; 9. the next run finishes it (then Skipped)
    (drops / "week08.jsonl").write_text(rows(range(140, 150)))
    r = y.cli("run", "--params", "params/year.yaml", kill=True)
    assert r.returncode == 9, (r.stdout + r.stderr)[-3000:]
    y.check("8 killed at a registry write")
    out = y.run(0)
    assert "skipped" in out.lower(), out[-3000:]
    y.check("9 repaired")

    # 10. a manual promote racing a run: the registry slot serialises them
    (drops / "week10.jsonl").write_text(rows(range(150, 165)))
    racing = y.cli("run", "--params", "params/year.yaml", wait=False)
    time.sleep(5)
    from mlflow.tracking import MlflowClient
    c = MlflowClient(mlflow_server)
    ready = sorted(int(v.version) for v in c.search_model_versions(f"name = '{y.name}'")
                   if v.tags.get("status") == "ready")
    champ = int(c.get_registered_model(y.name).aliases["champion"])
    other = next(v for v in reversed(ready) if v != champ)
    p = y.cli("promote", str(other), "--force", "--reason", "a person's call, racing the run",
              "--params", "params/year.yaml")
    out = racing.communicate(timeout=600)[0]
    assert p.returncode == 0, p.stdout + p.stderr
    assert racing.returncode == 0, out[-3000:]
    y.check("10 promote racing a run")

    # 11. near-duplicates of rows ever trained on: they join their train cluster, never test
    old = sorted(y.trained)[:5]
    (drops / "week11.jsonl").write_text(rows(range(170, 180)) + rows(old, variant=1))
    y.run(0)
    y.check("11 near-duplicates of trained rows")
    assert not set(old) & y.split_items("test")

    # 12. adds
    (drops / "week12.jsonl").write_text(rows(range(180, 200)))
    y.run(0)
    y.check("12 adds")
    d = y.cli("data", "diff", "1", str(max(y.versions())), "--params", "params/year.yaml")
    assert d.returncode == 0 and "added" in d.stdout, d.stdout + d.stderr  # a year's change, version to version
    print("\n".join([*y.log, f"12 rounds in {time.time() - t0:.0f} s"]))
