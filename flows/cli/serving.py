"""`qlora-ops serve | verify-serving | export-gguf`: a registered version served over HTTP (MLflow's scoring
server, llama.cpp's OpenAI-compatible one, or following the champion by webhook), checked against its
evaluated answers, or exported as GGUF. The work is in tasks.serving; this module starts and watches the
server processes."""
from __future__ import annotations

import os
import queue
import sys
import time
from pathlib import Path

from qlora_ops.flows.cli.exit_codes import EXIT, fail
from qlora_ops.flows.cli.preflight import preflight
from qlora_ops.flows.cli.report import refresh_report
from qlora_ops.flows.registry_slot import RegistryLockUnavailable, check_writer, registry_writer
from qlora_ops.tasks.core.paths import state_dir
from qlora_ops.tasks.core.secrets import redact_url
from qlora_ops.tasks.core.util import popen_child
from qlora_ops.tasks.serving import client, parity, webhook
from qlora_ops.tasks.serving import server as so
from qlora_ops.tasks.serving.front import Front, free_port


def serving_command(a) -> int:
    """`serve`, `verify-serving`, `export-gguf`: exit 0 done (check passed), 1 check failed, 2 a version that
    cannot be served or checked (named), 4 the tracking server or the endpoint did not answer."""
    # MLflow, and numpy through the GGUF writer: only the serving commands pay for them.
    import mlflow

    from qlora_ops.tasks.registry.register import PromotionError
    from qlora_ops.tasks.serving import gguf as gguf_export

    if isinstance(pre := preflight(a), int):
        return pre
    ws, params, uri = pre
    mlflow.set_tracking_uri(uri)
    r, work = params.registry, state_dir(ws, params) / "serving"
    try:
        if a.cmd == "verify-serving" or getattr(a, "follow", False):
            # Both move `serving`: refused before minutes of checks when the store is shared and no slot can be had.
            check_writer(uri, r.model_name, state_dir(ws, params))
        v = so.resolve_version(r.model_name, a.version, getattr(a, "alias", None) or r.champion_alias)
        if a.cmd == "verify-serving":
            res = parity.check(a.url, r.model_name, v, params.gates.max_serving_disagreement,
                               params.gates.confidence, work / f"verify-v{v}")
            # `serving` moves under the registry lock, to the champion of that moment or the --version named
            with _serving_writer(uri, r.model_name, params, ws):
                res = parity.record(res, champion_alias=r.champion_alias, named=a.version is not None,
                                    lock_path=state_dir(ws, params) / "registry.lock")
            print(parity.explain(res))
            print(f"'{res['alias']}' -> v{v}" if res["alias_moved"] else
                  f"'{res['alias']}' not moved ({res.get('not_moved', '')})")
            refresh_report(ws, params, res["run_id"], r.model_name, v)
            return 0 if res["passed"] else EXIT["rejected"]
        if a.cmd == "export-gguf":
            res = gguf_export.export_version(r.model_name, v, work / f"gguf-v{v}", out=Path(a.out) if a.out else None,
                                             run_parity=not a.no_parity, confidence=params.gates.confidence,
                                             allow_unverified_legacy=getattr(a, "allow_unverified_legacy", False))
            print(gguf_export.explain(res))
            refresh_report(ws, params, res["run_id"], r.model_name, v)
            return 0
        if getattr(a, "follow", False):
            return serve_follow(a, params, work, writer=lambda: _serving_writer(uri, r.model_name, params, ws),
                                lock_path=state_dir(ws, params) / "registry.lock")
        if getattr(a, "openai", False):
            return serve_openai(so.fetch_gguf(r.model_name, v, a.gguf, work / f"gguf-v{v}"), a, r.model_name, v)
        local, digest = so.fetch_model(r.model_name, v, work / f"v{v}")
    except (client.EndpointUnavailable, RegistryLockUnavailable) as e:
        return fail("service", e)
    except (so.ServingError, gguf_export.GGUFExportError, PromotionError) as e:  # PromotionError: refused bytes (download_hf_model)
        return fail("bad_input", e)
    proc = start_server(local, digest, a, r.model_name, v)
    if isinstance(proc, int):
        return proc
    try:
        return proc.wait()
    finally:
        so.stop(proc)


def _serving_writer(uri: str, model_name: str, params, ws):
    """The registered model's one slot (flows.registry_slot) around the `serving` move: on a shared store the
    slot on the team's Prefect API (refused without it, like promote and rollback: a late webhook or a second
    follower must not move `serving` past a rollback); on the workspace's private store the file lock."""
    return registry_writer(uri, model_name, params.orchestration.timeouts.registry, state_dir(ws, params))


def _show_new(receiver, shown: tuple[int, int]) -> tuple[int, int]:
    """Print the receiver's checks and errors not printed yet; returns how many of each are printed."""
    for res in receiver.handled[shown[0]:]:
        print(parity.explain(res) + f"\n'{res['alias']}' {'-> v' + str(res['version']) if res['alias_moved'] else 'not moved'}",
              flush=True)
    for err in receiver.errors[shown[1]:]:
        print(f"qlora-ops: webhook: {err}", file=sys.stderr, flush=True)
    return len(receiver.handled), len(receiver.errors)


def start_server(local: Path, digest: str, a, name: str, v: int):
    """The scoring server of a checked local copy, ready; or the exit code after one line naming why not."""
    proc = popen_child(so.server_command(local, a.host, a.port), env=so.server_env(digest, a.dtype),
                       start_new_session=True)
    url = f"http://{a.host}:{a.port}"
    try:
        so.wait_ready(url, proc, timeout=600)
    except so.ServingError as e:
        so.stop(proc)
        return fail("bad_input", e)
    print(f"serving {name} v{v} at {url}/invocations (weights {digest[:16]}..., {a.dtype or 'evaluated dtype'})\n"
          f"check it: qlora-ops verify-serving {url} --version {v}", flush=True)
    return proc


def serve_openai(gguf: Path, a, name: str, v: int) -> int:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as e:
        return fail("bad_input", RuntimeError(f"--openai needs llama-cpp-python's server: pip install 'qlora-ops[gguf]' ({e})"))
    proc = popen_child(so.openai_server_command(gguf, a.host, a.port), start_new_session=True)
    url = f"http://{a.host}:{a.port}"
    try:
        deadline = time.time() + 600
        while client.is_openai(url, timeout=2) is None:
            if proc.poll() is not None or time.time() > deadline:
                return fail("bad_input", RuntimeError(f"llama_cpp.server for {gguf.name} did not come up at {url}"))
            time.sleep(0.5)
        print(f"serving {name} v{v} ({gguf.name}) at {url}/v1/chat/completions\n"
              f"check it: qlora-ops verify-serving {url} --version {v}", flush=True)
        return proc.wait()
    finally:
        so.stop(proc)


def serve_follow(a, params, work: Path, writer=None, lock_path: Path | None = None) -> int:
    """`serve --follow`: serve the version holding 'serving' and switch to each version a champion webhook
    moves it to (tasks.serving.webhook), without a failed request (tasks.serving.front). With no 'serving'
    yet, the champion is checked first."""
    from mlflow.tracking import MlflowClient

    r, g = params.registry, params.gates
    secret = os.environ.get(webhook.SECRET_ENV, "")
    if not secret:
        return fail("bad_input", ValueError(f"--follow needs the webhook secret in ${webhook.SECRET_ENV}"))
    moved: queue.Queue = queue.Queue()
    check = webhook.champion_checker(r.model_name, r.champion_alias, threshold=g.max_serving_disagreement,
                                     confidence=g.confidence, work=work / "follow",
                                     on_serving=lambda v, local, digest: moved.put((v, local, digest)),
                                     **({"writer": writer} if writer else {}), lock_path=lock_path)
    try:
        v = int(MlflowClient().get_model_version_by_alias(r.model_name, so.SERVING_ALIAS).version)
        moved.put((v, *so.fetch_model(r.model_name, v, work / f"v{v}")))
    except so.ServingError:
        raise
    except Exception:  # no 'serving' yet: the champion earns it by a passed check
        res = check(r.model_name, r.champion_alias, so.resolve_version(r.model_name, alias=r.champion_alias))
        print(parity.explain(res), flush=True)
        if not res["alias_moved"]:
            return EXIT["rejected"]
    # The delivery ids taken survive a restart (a retried delivery is not checked twice).
    receiver = webhook.Receiver(secret, check, port=a.hook_port, host=a.host,
                                seen_file=work / "follow" / "webhook-seen.json")
    # The public port is the front's (tasks.serving.front): each version's scoring server runs on a loopback
    # port of its own, and a move switches to the new one only once it answers /ping, so no request fails.
    with receiver, Front(a.host, a.port) as front:
        hook_url = a.hook_url or receiver.url
        if getattr(a, "create_webhook", False):  # MLflow's webhook API is admin-only (3.17 basic-auth)
            hook = webhook.ensure_webhook(MlflowClient(), hook_url, secret, r.model_name)
            print(f"following {r.model_name}@{r.champion_alias}: MLflow webhook {hook.webhook_id} -> "
                  f"{redact_url(hook_url)}", flush=True)
        else:
            print(f"following {r.model_name}@{r.champion_alias}: receiving MLflow's webhook at {redact_url(hook_url)} "
                  f"(an MLflow admin creates it once: qlora-ops serving-webhook --url {redact_url(hook_url)} "
                  f"--params {a.params})", flush=True)
        proc, shown = None, (0, 0)
        try:
            while True:
                try:
                    v, local, digest = moved.get(timeout=1)
                except queue.Empty:
                    if proc is not None and proc.poll() is not None:
                        return proc.returncode or EXIT["internal"]
                    if not receiver.http_alive():  # the receiver failed: restart it, the scoring server runs on
                        print("qlora-ops: webhook receiver stopped; restarting it", file=sys.stderr, flush=True)
                        receiver.start_http()
                    shown = _show_new(receiver, shown)
                    continue
                shown = _show_new(receiver, shown)
                backend = ("127.0.0.1", free_port())
                new = popen_child(so.server_command(local, *backend), env=so.server_env(digest, a.dtype),
                                  start_new_session=True)
                try:
                    so.wait_ready(f"http://{backend[0]}:{backend[1]}", new, timeout=600)
                except so.ServingError as e:
                    so.stop(new)
                    if proc is None:
                        return fail("bad_input", e)
                    print(f"qlora-ops: v{v} could not be served ({e}); still serving the previous version",
                          file=sys.stderr, flush=True)
                    continue
                old = front.switch(backend)
                url = f"http://{a.host}:{a.port}"
                print(f"serving {r.model_name} v{v} at {url}/invocations (weights {digest[:16]}..., "
                      f"{a.dtype or 'evaluated dtype'})\ncheck it: qlora-ops verify-serving {url} --version {v}",
                      flush=True)
                if proc is not None:
                    front.drain(old, timeout=60)  # requests already sent to the old version finish there
                    so.stop(proc)
                proc = new
        finally:
            if proc is not None:
                so.stop(proc)


def webhook_command(a) -> int:
    """`serving-webhook --url URL`: MLflow's registry webhook for `serve --follow`, created or updated in place.
    MLflow 3.17's basic-auth makes webhook create/list admin-only, so this is the one step an admin runs
    (with MLFLOW_TRACKING_USERNAME/PASSWORD of the admin); the follower then holds only the webhook secret
    and a read login, and its scoring servers hold no MLflow credential (tasks.serving.server.server_env)."""
    import mlflow  # the CLI's commands import their heavy libraries when they run
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if isinstance(pre := preflight(a), int):
        return pre
    _, params, uri = pre
    mlflow.set_tracking_uri(uri)
    secret = os.environ.get(webhook.SECRET_ENV, "")
    if not secret:
        return fail("bad_input", ValueError(f"serving-webhook needs the webhook secret in ${webhook.SECRET_ENV} "
                                            "(the same one the follower gets)"))
    try:
        hook = webhook.ensure_webhook(MlflowClient(), a.url, secret, params.registry.model_name)
    except MlflowException as e:
        if e.error_code == "PERMISSION_DENIED" or e.get_http_status_code() == 403:  # by code, not message text
            return fail("service", RuntimeError(f"MLflow refused the webhook ({redact_url(str(e))[:300]}): creating "
                                                "webhooks needs the MLflow admin login (MLFLOW_TRACKING_USERNAME/PASSWORD)"))
        raise
    print(f"MLflow webhook {hook.webhook_id} ({hook.name}) -> {redact_url(a.url)} on model_version_alias.created of "
          f"{params.registry.model_name}; `qlora-ops serve --follow` there needs only ${webhook.SECRET_ENV}")
    return 0
