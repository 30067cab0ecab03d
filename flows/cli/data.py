"""`qlora-ops init | check | drop`: the data side, plain functions in tasks.intake and flows.drop; a bad
file or params exits 2 naming the key or file:line, and nothing is trained."""
from __future__ import annotations

import sys
from pathlib import Path

from qlora_ops.flows.cli.exit_codes import fail
from qlora_ops.flows.drop import DropNotAnnounced, drop
from qlora_ops.flows.events import EventsUnavailable
from qlora_ops.tasks.core.config import ParamsError, load_params
from qlora_ops.tasks.core.paths import ws_path
from qlora_ops.tasks.data.prepare import DataError


def data_command(a) -> int:
    """`init` and `check`: plain functions in tasks/, exit 2 with the named error on bad params or data."""
    try:
        if a.cmd == "init":
            # pandas and scipy (and torch, to measure the base model): init only
            from qlora_ops.tasks.evaluate.base_probe import score_base
            from qlora_ops.tasks.intake.init_params import write_params
            res = write_params(Path(a.datafile), Path(a.workspace), out=a.out, model=a.model, force=a.force,
                               command=" ".join(["qlora-ops", *sys.argv[1:]]) if sys.argv[1:2] == ["init"] else None,
                               base_scorer=None if a.no_base_eval else score_base)
            print(f"wrote {res['path']}: {res['format']}, {res['stats']['rows_after_dedupe']} distinct rows"
                  + (f", labels {', '.join(res['labels'])}" if res["labels"] else ", free-text answers"))
            print(f"  {res['note']}")
            if b := res["base"]:
                print(f"  base model on {b['n']} validation rows: {res['metric']} {b['mean']:.3f} ({b['seconds']} s); "
                      f"gates.min_gain_over_base {res['min_gain_over_base']:g}")
            print(f"next: qlora-ops check --params {res['path']}   then   qlora-ops run --params {res['path']}")
        else:
            from qlora_ops.tasks.evaluate import suites
            from qlora_ops.tasks.intake.check import check, format_check  # imports torch: check only
            ws = Path(a.workspace).resolve()
            suites.check(load_params(ws_path(ws, a.params)), ws, ws_path(ws, a.params))  # as `run` does, first
            print(format_check(check(Path(a.params), Path(a.workspace))))
    except (ParamsError, DataError) as e:
        return fail("bad_input", e)
    return 0


def data_group_command(a) -> int:
    """`data new-lineage | diff | checkout`."""
    if a.data_cmd == "new-lineage":
        return lineage_command(a)
    from qlora_ops.flows.cli import data_versions  # MLflow and scipy: for these two commands only

    return data_versions.diff_command(a) if a.data_cmd == "diff" else data_versions.checkout_command(a)


def lineage_command(a) -> int:
    """`data new-lineage`: the next test-set lineage (tasks/data/lineage.py); the next run re-splits under
    the params' settings and records them."""
    from qlora_ops.tasks.data.lineage import lineage_path, new_lineage

    ws = Path(a.workspace).resolve()
    try:
        params = load_params(ws_path(ws, a.params))
    except ParamsError as e:
        return fail("bad_input", e)
    path = lineage_path(ws, params)
    lin = new_lineage(path, a.reason)
    prev = lin["previous"][-1]
    print(f"test-set lineage {lin['lineage']} started in {path} (lineage {prev['lineage']} ended with "
          f"{prev['test_rows']} pinned test rows; {len(lin['trained'])} rows ever trained on stay out of test).\n"
          f"The next `qlora-ops run --params {a.params}` splits under the params' settings; comparisons with the "
          "champion restart on the new test set.")
    return 0


def drop_command(a) -> int:
    """`drop FILE`: exit 2 (file:line) on a bad file or params, 4 when the bucket or the Prefect API did not
    answer (the message says whether the file is in place)."""
    ws = Path(a.workspace).resolve()
    try:
        params = load_params(ws_path(ws, a.params))
        res = drop(Path(a.file), params, ws)
    except (ParamsError, DataError) as e:
        return fail("bad_input", e)
    except DropNotAnnounced as e:
        return fail("service", e, label="dropped, not announced")
    except (ConnectionError, EventsUnavailable) as e:
        return fail("service", e)
    o = params.orchestration
    print(f"dropped {Path(a.file).name}: {res['rows']} valid rows ({res['format']}) -> {res['url']}")
    when = f"qlora-retrain/{o.deployment} starts {o.debounce_s:g} s after the last drop (orchestration.debounce_s)"
    if res["event"] is not None:
        print(f"event {res['event']['event']} sent to the Prefect API: {when}")
    elif "://" in res["url"]:
        print(f"the bucket's notification reaches Prefect through the relay: {when}")
    else:
        print(f"no event sent (PREFECT_API_URL is not set): `qlora-ops run --params {a.params}` retrains now, "
              "or the next scheduled run does")
    return 0
