"""Operating the registry by hand: what is where (`status`), a manual `promote`, a `rollback`.

    qlora-ops status                       # champion, challenger, recent versions and runs with verdicts
    qlora-ops promote 7                    # the same paired policy as automatic promotion, vs the champion
    qlora-ops promote 7 --force --reason "hotfix for ticket 123"   # recorded: who, why, when
    qlora-ops rollback --reason "bad answers in prod"              # champion back to the previous one

The same write order as tasks.registry.register: a killed writer's plan is finished first, then this
command's writes are planned in one write and applied (tasks.registry.journal), so a kill anywhere is
repaired by the next writer. A
version whose status is not `ready` (its run died halfway, or it was rolled back) is never promoted.
"""
from __future__ import annotations

import getpass
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from qlora_ops.tasks.gates import ledger
from qlora_ops.tasks.gates.policy import PromotionPolicy, decide
from qlora_ops.tasks.registry import journal
from qlora_ops.tasks.registry.register import DEFERRED, READY, REJECTED, PromotionError, _alias_holder
from qlora_ops.tasks.core.secrets import redact_url
from qlora_ops.tasks.gates.gate import gate_scores
from qlora_ops.tasks.metrics import get


@dataclass(frozen=True)
class Actor:
    """Who writes: `user`, and `auth`, how we know it (recorded beside the user on every promote/rollback)."""
    user: str
    authenticated: bool
    auth: str

    def tags(self, prefix: str) -> dict[str, str]:
        return {f"{prefix}_by": self.user, f"{prefix}_by_auth": self.auth}


CURRENT_USER = "/api/2.0/mlflow/users/current"  # MLflow's auth app: the user the server authenticated


def whoami(tracking_uri: str) -> Actor:
    """The user the tracking server authenticated for this client's credentials (MLFLOW_TRACKING_USERNAME
    / _PASSWORD or ~/.mlflow/credentials, as every MLflow call here sends them), asked of the server
    itself. A server without MLflow's auth app, or a local store, cannot say: then the OS user, marked
    unauthenticated (anyone can set $USER)."""
    os_user = getpass.getuser()
    if not tracking_uri.startswith(("http://", "https://")):
        return Actor(os_user, False, f"unauthenticated: OS user of a local store ({tracking_uri.split(':', 1)[0]})")
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request


    r = http_request(get_default_host_creds(tracking_uri), CURRENT_USER, "GET", max_retries=2, timeout=30,
                     raise_on_status=False)
    if r.status_code == 200 and (user := (r.json().get("user") or {}).get("username")):
        return Actor(user, True, f"authenticated by the tracking server {redact_url(tracking_uri)} (MLflow auth)")
    if r.status_code == 404:  # no auth app: it cannot tell who we are
        return Actor(os_user, False, f"unauthenticated: OS user; the tracking server {redact_url(tracking_uri)} "
                                     "has no authentication")
    raise PromotionError(f"the tracking server {redact_url(tracking_uri)} refused to say who these credentials are "
                         f"(HTTP {r.status_code} from {CURRENT_USER}); check MLFLOW_TRACKING_USERNAME / "
                         "MLFLOW_TRACKING_PASSWORD")


def _tags(client: MlflowClient, name: str, v: int | str) -> dict:
    return dict(client.get_model_version(name, str(v)).tags or {})


def lineage_of(tags: dict) -> int | None:
    """The test-set lineage a version was scored on (None: registered before lineages were tagged)."""
    try:
        return int(tags["test_lineage"])
    except (KeyError, ValueError):
        return None


def version_lineage(model_name: str, version: int, client: MlflowClient | None = None) -> int | None:
    """The test-set lineage `version` was decided on (its tag), None where it has none."""
    return lineage_of(dict((client or MlflowClient()).get_model_version(model_name, str(version)).tags or {}))


def budget(model_name: str, policy: PromotionPolicy, lineage: int | None, client: MlflowClient | None = None) -> dict:
    """The yearly false-promotion budget of `lineage`, from the decision ledger (tasks.gates.ledger) that
    the versions of `model_name` carry."""
    c = client or MlflowClient()
    versions = {int(v.version): dict(v.tags or {}) for v in c.search_model_versions(f"name = '{model_name}'")}
    return ledger.account(policy, ledger.ledger_of(versions), lineage)


def status(model_name: str, aliases: tuple[str, ...], experiment: str | None, limit: int = 10,
           policy: PromotionPolicy | None = None) -> dict:
    import pandas as pd

    c = MlflowClient()
    versions = sorted(c.search_model_versions(f"name = '{model_name}'"), key=lambda v: -int(v.version))[:limit]
    held = dict(c.get_registered_model(model_name).aliases or {}) if versions else {}
    by_v: dict[str, list[str]] = {}
    for a, v in held.items():
        by_v.setdefault(str(v), []).append(a)
    vt = pd.DataFrame([{"version": int(v.version), "aliases": ",".join(sorted(by_v.get(str(v.version), []))) or "-",
                        "status": v.tags.get("status", "?"), "promoted": v.tags.get("promoted", "?"),
                        "accuracy": f"{float(v.tags['test_accuracy']):.4f}" if "test_accuracy" in v.tags else "?",
                        # the metric the version was judged (and is promoted) on, and its score
                        "gate": f"{v.tags['gate_metric']}={float(v.tags['gate_score']):.4f}" if "gate_score" in v.tags else "-",
                        "data": v.tags.get("data_version", "?"),
                        "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
                        "why": (v.tags.get("rejected_reason") or v.tags.get("promotion_reason", ""))[:70]}
                       for v in versions])
    runs = pd.DataFrame()
    exp = mlflow.get_experiment_by_name(experiment) if experiment else None
    if exp is not None:
        rs = c.search_runs([exp.experiment_id], "tags.`qlora_ops.fingerprint` != ''", max_results=limit,
                           order_by=["attributes.start_time DESC"])
        runs = pd.DataFrame([{"run": r.info.run_id[:12], "status": r.info.status,
                              "outcome": r.data.tags.get("qlora_ops.outcome", "-"),
                              "version": r.data.tags.get("qlora_ops.registered_version", "-"),
                              "data": r.data.tags.get("qlora_ops.data_version", "?"),
                              "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000)),
                              "gates": r.data.tags.get("qlora_ops.gate_reason", "")[:60]} for r in rs])
    out = {"model_name": model_name, "aliases": {a: held.get(a) for a in aliases}, "versions": vt, "runs": runs,
           "pending": journal.pending(c, model_name) if versions else None}
    if policy is not None and versions:  # the newest version's test-set lineage: the one decisions are made on
        out["budget"] = budget(model_name, policy, lineage_of(versions[0].tags or {}), c)
    return out


def format_status(s: dict) -> str:
    L = [f"registered model {s['model_name']}"]
    L += [f"  {a:<11} -> {'v' + str(v) if v else '(none)'}" for a, v in s["aliases"].items()]
    if p := s.get("pending"):  # a writer killed mid-commit: the next writer (promote, rollback, a run) finishes it
        L += [f"  pending    : {p['op']} begun by {p.get('by', '?')} at {p.get('at', '?')}, not finished; the next "
              "run, promote or rollback finishes it"]
    if b := s.get("budget"):
        L += [f"  decisions  : {ledger.explain(b)}"]
    L += ["", "versions:", s["versions"].to_string(index=False) if len(s["versions"]) else "  (none)"]
    L += ["", "recent runs:", s["runs"].to_string(index=False) if len(s["runs"]) else "  (none)"]
    return "\n".join(L)


def version_rows(model_name: str, v: int, dst: Path) -> tuple[str, dict]:
    """(score_key, per-row results) of a registered version: the merged model's saved predictions."""
    from qlora_ops.tasks.evaluate.predict import per_row

    t = _tags(MlflowClient(), model_name, v)
    d = mlflow.artifacts.download_artifacts(f"runs:/{t['mlflow_run_id']}/eval/merged", dst_path=str(dst / f"v{v}"))
    return t.get("score_key", ""), per_row(Path(d))


def _reconcile(c: MlflowClient, model_name: str) -> None:
    """A killed writer's plan, finished or dropped before this command reads anything (the caller holds the lock)."""
    if (done := journal.reconcile(c, model_name)) is not None:
        print(f"registry {model_name}: {done}", flush=True)


def promote(model_name: str, version: int, alias: str, policy: PromotionPolicy, work: Path, *,
            force: bool = False, reason: str | None = None, by: Actor | None = None) -> dict:
    """Move `alias` to `version` if the paired policy says it beats the champion on the same rows;
    with force, regardless. Every promotion records who (`by`, default whoami()) and why."""
    c = MlflowClient()
    by = by or whoami(mlflow.get_tracking_uri())
    _reconcile(c, model_name)
    t = _tags(c, model_name, version)
    if t.get("status") not in (READY, DEFERRED):  # deferred: complete, its run could not decide; a person may
        raise PromotionError(f"{model_name} v{version} has status {t.get('status', 'unknown')!r}, not 'ready': "
                             "an incomplete or rolled-back version is never promoted")
    champ = _alias_holder(c, model_name, alias)
    if champ == version:
        return {"version": version, "promoted": False, "reason": f"v{version} already holds '{alias}'"}
    if force:
        if not reason:
            raise PromotionError("--force needs --reason: a forced promotion records who and why")
        why = f"forced by {by.user}: {reason}"
        decision_tags = {"forced_promotion_by": by.user, "forced_promotion_reason": reason[:5000]}
    elif champ is None:
        why, decision_tags = f"manual: first champion, no version held '{alias}'", {}
    else:
        lin = lineage_of(t)  # before any look at the rows: a spent budget refuses the look itself
        if not (b := budget(model_name, policy, lin, c))["can_decide"]:
            raise PromotionError(ledger.spent_message(b))
        ck, cand = version_rows(model_name, version, work)
        pk, prev = version_rows(model_name, champ, work)
        if ck != pk or cand["ids"] != prev["ids"]:
            raise PromotionError(f"v{version} and champion v{champ} were scored under different score keys (test "
                                 "set or eval settings differ), so they cannot be compared row by row; retrain on the "
                                 "current data or use --force --reason")
        # The gate metric each version was decided on (exact match for versions registered before it was tagged).
        names = {t.get("gate_metric", "exact_match"), _tags(c, model_name, champ).get("gate_metric", "exact_match")}
        if len(names) > 1:
            raise PromotionError(f"v{version} and champion v{champ} were judged on different gate metrics "
                                 f"({' vs '.join(sorted(names))}); retrain with one eval.metric or use --force --reason")

        m = get(names.pop())
        if m.name == "nll" and None not in (cand.get("tokenizer"), prev.get("tokenizer")) and \
                cand["tokenizer"] != prev["tokenizer"]:
            raise PromotionError(f"v{version} and champion v{champ} were scored in nll per token under different "
                                 "tokenizers: not comparable; compare bits per byte (the report) and use --force --reason")
        d = decide(policy, gate_scores(cand, m), gate_scores(prev, m), higher_is_better=m.higher_is_better,
                         binary=m.binary, metric_name=m.name)
        # a look at the test rows, whatever it concluded: one ledger entry on the candidate
        entry = ledger.entry_tag(policy.alpha, lin, f"promote by {by.user}")
        if not d["promote"]:
            c.set_model_version_tag(model_name, str(version), *entry)
            return {"version": version, "promoted": False, "reason": d["reason"]}
        why, decision_tags = f"manual: {d['reason']}", dict([entry])
    tags = {**decision_tags, **by.tags("promoted"), "promoted": "true", "promotion_reason": why[:5000]}
    if champ is not None:
        tags["previous_champion"] = str(champ)
    # One plan, written first, then its writes (tasks.registry.journal): a kill anywhere is finished by the
    # next writer; the champion alias move is the last write.
    writes = [["tag", str(version), k, v] for k, v in tags.items()]
    if champ is not None:
        writes.append(["tag", str(champ), "replaced_by", str(version)])
    writes.append(["alias", alias, str(version)])
    journal.run(c, model_name, journal.plan("promote", writes=writes,
                                            expect={alias: None if champ is None else str(champ)}))
    return {"version": version, "promoted": True, "previous_champion": champ, "reason": why, "by": by.user,
            "auth": by.auth}


def rollback(model_name: str, alias: str, *, reason: str, by: Actor | None = None) -> dict:
    """Champion back to the version it replaced; the demoted one is tagged rejected (with who: `by`, default
    whoami()), and a run with its fingerprint is never auto-promoted again (tasks.registry.register checks for a
    rejected twin)."""
    c = MlflowClient()
    by = by or whoami(mlflow.get_tracking_uri())
    _reconcile(c, model_name)
    cur = _alias_holder(c, model_name, alias)
    if cur is None:
        raise PromotionError(f"{model_name} has no '{alias}': nothing to roll back")
    prev = _tags(c, model_name, cur).get("previous_champion")
    if not prev:
        raise PromotionError(f"{model_name} v{cur} replaced no earlier champion (it was the first): nothing to roll back to")
    if _tags(c, model_name, prev).get("status") not in (READY, None):
        raise PromotionError(f"previous champion v{prev} has status {_tags(c, model_name, prev).get('status')!r}; "
                             f"promote another version by hand (`qlora-ops promote N --force --reason ...`)")
    # One plan, written first (tasks.registry.journal): the alias moves back first, then the demoted version
    # is tagged rejected; a kill anywhere is finished by the next writer, so `champion` never stays on a
    # version tagged rejected.
    writes = [["alias", alias, str(prev)]]
    writes += [["tag", str(cur), k, v] for k, v in {
        **by.tags("rolled_back"), "rejected_reason": f"rolled back by {by.user}: {reason}"[:3000],
        "rejected_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": REJECTED}.items()]
    journal.run(c, model_name, journal.plan("rollback", writes=writes, expect={alias: str(cur)}))
    return {"demoted": cur, "champion": int(prev), "reason": reason, "by": by.user, "auth": by.auth}

