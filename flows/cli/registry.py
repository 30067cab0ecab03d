"""`qlora-ops status | promote | rollback`: the registry by hand (tasks.registry.manual), serialized like
automatic promotion; a refused promotion exits 1."""
from __future__ import annotations

import sys

from qlora_ops.flows.cli.exit_codes import EXIT, fail
from qlora_ops.flows.cli.preflight import preflight
from qlora_ops.flows.registry_slot import RegistryLockUnavailable, registry_writer
from qlora_ops.tasks.core.paths import state_dir
from qlora_ops.tasks.serving.server import SERVING_ALIAS  # moved by verify-serving / serve --follow on a pass


def print_quarantined(params) -> None:
    """The drops set aside (tasks/data/quarantine.py), each with the first line of its reason; one line
    when the quarantine cannot be read (status still shows the registry)."""
    from qlora_ops.tasks.data import quarantine

    try:
        found = quarantine.listed(params.data.source, params.data.source_options)
    except Exception as e:
        print(f"quarantined drops: not listed ({type(e).__name__}: {str(e)[:200]})")
        return
    if params.data.source:
        print(f"quarantined drops ({quarantine.quarantine_url(params.data.source)}): {len(found) or 'none'}")
    for q in found:
        print(f"  {q['name']}: {q['reason'].splitlines()[0][:300]}")


def registry_command(a) -> int:
    # MLflow (and, below, pandas and scipy) only for the commands that use them: `qlora-ops --help` stays fast.
    import mlflow

    from qlora_ops.tasks.registry import manual as registry_ops
    from qlora_ops.tasks.registry.register import PromotionError, registry_lock

    if isinstance(pre := preflight(a), int):
        return pre
    ws, params, uri = pre
    mlflow.set_tracking_uri(uri)
    r = params.registry
    from qlora_ops.tasks.gates.policy import PromotionPolicy  # not flows.retrain: that imports torch, seconds for nothing here
    if a.cmd == "status":
        print(registry_ops.format_status(registry_ops.status(r.model_name, (r.champion_alias, r.challenger_alias,
                                                                            SERVING_ALIAS), r.experiment,
                                                             policy=PromotionPolicy.from_registry(r))))
        print_quarantined(params)
        return 0
    # The same serialization as automatic promotion (flows.registry_slot): the model's global slot, which a
    # shared tracking server requires (refused without it), and the workspace's file lock.
    try:
        by = registry_ops.whoami(uri)  # recorded on the version: the user the tracking server authenticated
        with registry_writer(uri, r.model_name, params.orchestration.timeouts.registry, state_dir(ws, params)), \
                registry_lock(state_dir(ws, params) / "registry.lock"):
            if a.cmd == "promote":
                res = registry_ops.promote(r.model_name, a.version, r.champion_alias, PromotionPolicy.from_registry(r),
                                           state_dir(ws, params) / "promote", force=a.force, reason=a.reason, by=by)
            else:
                res = registry_ops.rollback(r.model_name, r.champion_alias, reason=a.reason, by=by)
    except PromotionError as e:
        print(f"qlora-ops: refused: {e}", file=sys.stderr)
        return EXIT["rejected"]
    except RegistryLockUnavailable as e:
        return fail("service", e)
    if a.cmd == "promote":
        print(f"{'promoted' if res['promoted'] else 'not promoted'}: v{res['version']} ({res['reason']})"
              + (f"; recorded as done by {by.user} ({by.auth})" if res["promoted"] else ""))
        return 0 if res["promoted"] else EXIT["rejected"]
    print(f"rolled back: '{r.champion_alias}' -> v{res['champion']}; v{res['demoted']} tagged rejected ({res['reason']}); "
          f"recorded as done by {by.user} ({by.auth})")
    return 0
