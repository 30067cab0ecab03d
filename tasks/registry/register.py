"""Log the merged model as an MLflow pyfunc, register it, and move the champion alias if it wins.

Promotion is a read-compare-write on the registry (who holds the alias, what did it score, set
the alias). MLflow alias writes are last-writer-wins and version numbers are max+1, so two local
runs finishing together could both "win". `register_and_promote` therefore runs the whole
sequence under an exclusive fcntl lock on a file next to the store, and re-reads the alias after
writing it. (The lock serializes processes on one machine / shared filesystem only.)

Whether a candidate beats the champion is the caller's `decide` (flows: the paired promotion policy
of tasks.gates.policy on both models' per-row results on the same test rows); this module owns the order of
registry writes and who may write.

What a version serves is pinned by the registrar (this module, run by the CPU worker), never by the
training job: it copies the trained logged model into the registry experiment (copy_to_registry), checking
every byte on the way, and tags the version with `weights_digest` and `mlmodel_digest` of what it uploaded.

No tracking URI is set here: entry points call mlflow.set_tracking_uri.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version as pkg_version
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from qlora_ops.tasks.registry import journal
from qlora_ops.tasks.registry.legacy import LEGACY_LOADER_MODULE, LOADER_MODULE  # noqa: F401  (re-exported)
from qlora_ops.tasks.registry.loader import SERVING_FILE, manifest_digest
from qlora_ops.tasks.core.util import MANIFEST, atomic_write_json, check_manifest, read_json, sha256_file
from qlora_ops.tasks.registry.loader import WeightsRefused, check_weights

# The pyfunc loader is a module of the installed package, never artifact code. Versions registered before the
# stage packages name it by its old name (tasks/registry/legacy.py): both are ours.
OUR_LOADERS = (LOADER_MODULE, LEGACY_LOADER_MODULE)
PIP_PACKAGES = ("qlora-ops", "mlflow", "torch", "transformers", "safetensors")


class PromotionError(RuntimeError):
    """The registry did not end in the state we wrote (alias points elsewhere), or a step failed."""


def _pip_requirements() -> list[str]:
    # qlora-ops itself first: a managed env (`mlflow models serve` without --env-manager local) must
    # install the loader module; with --env-manager local the installed package is used.
    reqs = []
    for p in PIP_PACKAGES:
        try:
            v = pkg_version(p).split("+")[0]  # drop local labels such as torch's "+cpu"
            reqs.append(f"{p}=={v}")
        except PackageNotFoundError:
            reqs.append(p)
    return reqs


def stage_model_dir(merged_dir: Path, serving: dict, dst: Path) -> str:
    """`dst`: the merged model's files (symlinks, no copy) + serving.json + a manifest covering both;
    returns the manifest's sha256 (the version's `weights_digest`). The merged dir is verified against
    its own manifest first, whose hashes are reused (a multi-GB model is not hashed twice)."""

    merged_dir = check_manifest(Path(merged_dir))  # a truncated merged dir is never registered
    if not (merged_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{merged_dir}: no {MANIFEST}; only a merged dir written by the merge stage "
                                "(tasks.model.merge, with its manifest) can be registered")
    if not (merged_dir / "config.json").is_file() or not any(merged_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{merged_dir}: not a safetensors model dir (config.json + *.safetensors expected)")
    missing = {"system_prompt", "max_new_tokens"} - set(serving)
    if missing:
        raise ValueError(f"serving config lacks {sorted(missing)}")
    cfg = {"system_prompt": str(serving["system_prompt"]), "max_new_tokens": int(serving["max_new_tokens"]),
           "batch_size": int(serving.get("batch_size") or 16)}
    files = dict(read_json(merged_dir / MANIFEST)["files"])
    if SERVING_FILE in files:
        raise ValueError(f"{merged_dir} already holds a {SERVING_FILE}; it is written at registration")
    dst.mkdir(parents=True)
    for rel in files:  # only what the manifest lists travels
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).symlink_to((merged_dir / rel).resolve())
    (dst / SERVING_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    files[SERVING_FILE] = {"sha256": sha256_file(dst / SERVING_FILE), "size": (dst / SERVING_FILE).stat().st_size}
    atomic_write_json(dst / MANIFEST, {"files": dict(sorted(files.items()))})
    return manifest_digest(dst)


def log_merged_model(merged_dir: Path, serving: dict, artifact_path: str = "model", *,
                     run_id: str | None = None) -> str:
    """Log `merged_dir` as a pyfunc whose loader is the installed module tasks.registry.loader; return its URI.

    The artifact holds data only: the model files, serving.json and the manifest (no code, no pickle).
    The manifest's sha256 goes on the logged model as tag `weights_digest`; register_and_promote copies
    it onto the version. Logs into the active MLflow run, or into `run_id` if given (no active run
    needed then). Returns the logged model's URI (``models:/<model_id>``).
    """
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="qlora-ops-serving-") as td:
        data = Path(td) / "model"  # -> data/model inside the logged model
        digest = stage_model_dir(Path(merged_dir), serving, data)
        # model_config: declared here so that a load may override it (MLflow drops undeclared keys). The digest
        # is left empty: one that travels with the bytes proves nothing (the loader asks the registry), and
        # an empty one makes a digest given at load time unambiguous.
        kwargs = dict(loader_module=LOADER_MODULE, data_path=str(data), pip_requirements=_pip_requirements(),
                      signature=_signature(), model_config={"weights_digest": "", "dtype": ""})
        client = MlflowClient()
        if run_id is None:
            if mlflow.active_run() is None:
                raise RuntimeError("log_merged_model needs an active MLflow run (mlflow.start_run) or run_id=")
            info = mlflow.pyfunc.log_model(name=artifact_path, **kwargs)
        else:
            exp_id = client.get_run(run_id).info.experiment_id
            lm = client.create_logged_model(experiment_id=exp_id, name=artifact_path, source_run_id=run_id)
            info = Model.log(artifact_path=None, name=artifact_path, flavor=mlflow.pyfunc, run_id=run_id,
                             model_id=lm.model_id, **kwargs)
    client.set_logged_model_tags(info.model_id, {WEIGHTS_DIGEST: digest})
    return info.model_uri


WEIGHTS_DIGEST = "weights_digest"
MLMODEL_DIGEST = "mlmodel_digest"  # sha256 of the MLmodel file as the registrar uploaded it
REGISTRY_SUFFIX = "-registry"


def registry_experiment(experiment: str) -> str:
    """The experiment the registrar copies every registered model into (infra/mlflow-setup.py creates it
    and gives only the registrar EDIT on it): what a version serves is written by no training job."""
    return f"{experiment}{REGISTRY_SUFFIX}"


def _signature():
    # No input schema (a str, a list of str or a DataFrame with "prompt" [+ "system"] are all taken);
    # the params schema lets `describe` through (MLflow drops params a signature does not declare).
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ModelSignature(inputs=None, outputs=None, params=ParamSchema([ParamSpec("describe", "boolean", False)]))


def _logged_model_id(model_uri: str) -> str:
    model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/") else ""
    return "" if not model_id or "/" in model_id or "@" in model_id else model_id


def logged_model_tags(model_uri: str) -> dict[str, str]:
    """The tags a version registered from `model_uri` carries from its logged model: `weights_digest`
    (empty for a URI that is not ``models:/<model_id>`` of a model logged by log_merged_model)."""
    if not (model_id := _logged_model_id(model_uri)):
        return {}
    try:
        tags = MlflowClient().get_logged_model(model_id).tags or {}
    except MlflowException:
        return {}
    return {WEIGHTS_DIGEST: tags[WEIGHTS_DIGEST]} if WEIGHTS_DIGEST in tags else {}


def mlmodel_problems(meta: dict) -> list[str]:
    """What in an MLmodel (parsed) could run anything but our installed loader: [] when nothing."""
    flavors = (meta or {}).get("flavors") or {}
    pf = flavors.get("python_function") or {}
    bad = []
    if set(flavors) != {"python_function"}:
        bad.append(f"flavors {sorted(flavors)}")
    if pf.get("loader_module") not in OUR_LOADERS:
        bad.append(f"loader_module {pf.get('loader_module')!r}")
    if pf.get("code") or pf.get("python_model") or pf.get("cloudpickle_version"):
        bad.append("code or a pickled model in the artifact")
    return bad


def _pinned(model_id: str, mlmodel: Path, data_dir: Path, claimed: str | None, full: bool) -> dict[str, str]:
    """The registry tags that pin what a version serves, computed by the registrar from the bytes it read:
    `weights_digest` (sha256 of the manifest: with `full`, every file checked against it first) and
    `mlmodel_digest` (sha256 of MLmodel). PromotionError when the bytes are not a model log_merged_model wrote, or
    not the ones the trainer's `weights_digest` tag (`claimed`) names."""
    if bad := mlmodel_problems(yaml.safe_load(mlmodel.read_text())):
        raise PromotionError(f"logged model {model_id}: MLmodel has {', '.join(bad)}; not registered")
    try:
        digest = check_weights(data_dir, claimed) if full else manifest_digest(data_dir)
    except (WeightsRefused, FileNotFoundError) as e:
        raise PromotionError(f"logged model {model_id}: {e}; not registered") from None
    if claimed and digest != claimed:
        raise PromotionError(f"logged model {model_id}: its manifest's sha256 {digest[:16]}... is not its "
                             f"{WEIGHTS_DIGEST} tag {claimed[:16]}...; the artifact changed after it was logged")
    return {WEIGHTS_DIGEST: digest, MLMODEL_DIGEST: sha256_file(mlmodel)}


def digest_tags(model_uri: str) -> dict[str, str]:
    """`weights_digest` and `mlmodel_digest` of the logged model `model_uri`, read by the registrar itself
    (MLmodel and the manifest only: loading checks every file against that manifest). A logged model
    with no MLmodel (a registry record without bytes) gets the trainer's tag, if any, and no mlmodel_digest."""
    if not (model_id := _logged_model_id(model_uri)):
        return {}
    try:
        lm = MlflowClient().get_logged_model(model_id)
    except MlflowException:
        return {}
    claimed = (lm.tags or {}).get(WEIGHTS_DIGEST)
    root = lm.artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="qlora-ops-pin-") as td:
        try:
            mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=td))
        except (MlflowException, OSError):
            return {WEIGHTS_DIGEST: claimed} if claimed else {}
        rel = ((yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}).get("python_function", {}).get("data")
        data = Path(td) / "data"
        data.mkdir()
        if rel:
            mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{rel}/{MANIFEST}", dst_path=str(data))
        return _pinned(model_id, mlmodel, data, claimed, full=False)


def create_experiment(name: str, artifact_location: str | None) -> str:
    """Create the experiment, or take the one a concurrent writer (another workspace's run, started the
    same moment) created between our lookup and our create: MLflow answers RESOURCE_ALREADY_EXISTS then."""
    try:
        return MlflowClient().create_experiment(name, artifact_location=artifact_location)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := mlflow.get_experiment_by_name(name)) is None:
            raise
        return exp.experiment_id


def copy_to_registry(model_uri: str, experiment: str) -> tuple[str, dict[str, str]]:
    """The registrar's own copy of the trained logged model `model_uri` in the registry experiment (see
    registry_experiment: the training jobs' login cannot write there), made from bytes checked on the
    way: MLmodel names our loader and no code, every file matches the manifest, the manifest matches the
    trainer's weights_digest tag. Returns (the copy's URI, its pinning tags: weights_digest and
    mlmodel_digest of the very bytes uploaded, plus trained_model_id)."""
    from mlflow.entities import LoggedModelStatus

    if not (model_id := _logged_model_id(model_uri)):
        raise PromotionError(f"{model_uri}: only a logged model (models:/<model_id>) is copied into the registry")
    client = MlflowClient()
    trained = client.get_logged_model(model_id)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:  # the team stack's setup job made it (only the registrar may write it); local: made here
        loc = client.get_experiment(trained.experiment_id).artifact_location or ""
        local_store = loc.startswith(("file:", "/"))  # beside the trained one's; a server picks its own
        exp_id = create_experiment(experiment, f"{loc.rstrip('/')}/registry" if local_store else None)
    else:
        exp_id = exp.experiment_id
    with tempfile.TemporaryDirectory(prefix="qlora-ops-registry-") as td:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=trained.artifact_location, dst_path=td))
        meta = yaml.safe_load((local / "MLmodel").read_text()) or {}
        rel = ((meta.get("flavors") or {}).get("python_function") or {}).get("data") or "data/model"
        copy = client.create_logged_model(experiment_id=exp_id, name=trained.name, source_run_id=trained.source_run_id,
                                          tags={"trained_model_id": model_id})
        meta["model_id"] = copy.model_id  # the copy's MLmodel names the copy: the loader finds its versions by it
        (local / "MLmodel").write_text(yaml.safe_dump(meta, sort_keys=False))
        pins = _pinned(model_id, local / "MLmodel", local / rel, (trained.tags or {}).get(WEIGHTS_DIGEST), full=True)
        client.log_model_artifacts(copy.model_id, str(local))
    client.set_logged_model_tags(copy.model_id, pins)
    client.finalize_logged_model(copy.model_id, LoggedModelStatus.READY)
    return f"models:/{copy.model_id}", {**pins, "trained_model_id": model_id}


@contextmanager
def registry_lock(lock_path: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Exclusive advisory lock (fcntl.flock) on `lock_path`; released on exit or process death."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"registry lock {lock_path} still held after {timeout_s}s") from None
                    time.sleep(0.2)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _alias_holder(client: MlflowClient, name: str, alias: str) -> int | None:
    """Version currently holding `alias`, or None. (A missing alias is not an error here.)"""
    aliases = client.get_registered_model(name).aliases or {}
    v = aliases.get(alias)
    return int(v) if v is not None else None


def download_hf_model(model_name: str, version: int, dst: Path, allow_unverified: bool = False) -> Path:
    """Download the HF model dir of a registered version into dst, checked: every file against the
    artifact's manifest, and the manifest against the version's `weights_digest` tag. Reads the pyfunc's
    data dir (this format) or the "model" artifact of the earlier models-from-code format (its code is
    never run here: only the weights are read)."""

    client = MlflowClient()
    root = client.get_model_version_download_uri(model_name, str(version)).rstrip("/")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=str(dst / "meta")))
    vtags = client.get_model_version(model_name, str(version)).tags or {}
    if (pinned := vtags.get(MLMODEL_DIGEST)) and sha256_file(mlmodel) != pinned:
        raise PromotionError(f"{model_name} v{version}: MLmodel is not the registered {MLMODEL_DIGEST}; the artifact "
                             "was changed after registration, refusing to read it")
    meta = yaml.safe_load(mlmodel.read_text())
    pyfunc = ((meta or {}).get("flavors") or {}).get("python_function") or {}
    rel = pyfunc.get("data") if pyfunc.get("loader_module") in OUR_LOADERS else \
        ((pyfunc.get("artifacts") or {}).get("model") or {}).get("path")
    if not rel:
        raise PromotionError(f"{model_name} v{version} ({root}) has no model data in its MLmodel; "
                             "was it logged with tasks.registry.register.log_merged_model?")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{rel}", dst_path=str(dst / "model")))
    if not (local / "config.json").is_file():
        raise PromotionError(f"{model_name} v{version}: downloaded model dir {local} has no config.json")
    expected = vtags.get(WEIGHTS_DIGEST)
    if not expected and not (local / MANIFEST).is_file() and not allow_unverified:
        # Nothing at all to check the bytes against: refused (a caller that knowingly takes a legacy version
        # says so: export-gguf --allow-unverified-legacy).
        raise PromotionError(f"{model_name} v{version} has neither a {WEIGHTS_DIGEST} tag nor a {MANIFEST}: its "
                             "bytes cannot be checked; register it again")
    if expected or (local / MANIFEST).is_file():
        try:
            check_weights(local, expected)
        except WeightsRefused as e:
            raise PromotionError(f"{model_name} v{version}: {e}") from None
    return local


# Version lifecycle, in the `status` tag: "incomplete" from the moment the version exists until every
# tag of the decision is written, then "ready". A version whose run died halfway stays "incomplete" and
# is never promoted (status, promote and the skip check all read it). "rejected" = rolled back by hand.
INCOMPLETE, READY, REJECTED = "incomplete", "ready", "rejected"
# An "incomplete" version seen by a writer holding the lock has no live writer (every writer holds it
# from version create to the alias move): its run was killed. It is tagged "abandoned" and stays so.
ABANDONED = "abandoned"
# "deferred": complete, but no decision was possible (decide raised Deferred); the champion stays, the
# version does not count as a decision on its inputs (the next run decides), and may be promoted by hand.
DEFERRED = "deferred"

Decision = Callable[[int], tuple[bool, str]]


class Deferred(Exception):
    """Raised by a `decide` that cannot compare the candidate with this champion; its text is the reason
    recorded on the version."""


def _rolled_back_twin(client: MlflowClient, model_name: str, fingerprint: str | None) -> str | None:
    if not fingerprint:
        return None
    found = client.search_model_versions(f"name = '{model_name}' and tags.fingerprint = '{fingerprint}' "
                                         f"and tags.status = '{REJECTED}'")
    return found[0].version if found else None


def register_and_promote(*, model_uri: str, model_name: str, alias: str, challenger_alias: str | None,
                         tags: dict[str, str], decide: Decision, lock_path: Path,
                         describe: Callable[[int, bool, str], str | None] | None = None,
                         registry_experiment: str | None = None) -> dict:
    """Register `model_uri` as a new version; move `alias` to it only if `decide(champion_version)` says so.

    The whole read-compare-write runs under an exclusive lock on `lock_path` (the caller also holds the
    registered model's Prefect global concurrency slot). Write order, so that a kill anywhere leaves
    the registry truthful or repairable: a plan a killed writer left is finished first (tasks.registry.journal);
    the version is born `status=incomplete`; the decision's tags follow; then the commit, planned in one
    write and then applied: `status=ready` (`deferred` when `decide` raised Deferred: registered, not
    decided), `challenger_alias`, `replaced_by` on the old champion, the champion alias move last. Idempotent per
    MLflow run: a retry finds the version this run already registered (tag mlflow_run_id). A version
    whose fingerprint was rolled back before is never auto-promoted again. `describe(version, promoted,
    reason)` gives the version's description (its model card), written before `status=ready`.

    What the version serves is pinned by the registrar here, never by the training job: `weights_digest`
    and `mlmodel_digest` tags computed from the bytes read (digest_tags). With `registry_experiment`
    (the flow), the version is registered from the registrar's checked copy there (copy_to_registry), so
    the training jobs' login cannot rewrite its bytes either.
    """
    client = MlflowClient()
    vtags = {str(k): str(v) for k, v in (tags or {}).items()}
    # A run's artifact URI (runs:/..., as older code logged models) is registered as it is: only a logged model
    # is copied (copy_to_registry); its digests are still the registrar's own (digest_tags).
    if registry_experiment and _logged_model_id(model_uri) and \
            _version_of_run(client, model_name, vtags.get("mlflow_run_id")) is None:
        # Outside the lock (a multi-GB copy); a retry that finds its version registered copies nothing.
        model_uri, pins = copy_to_registry(model_uri, registry_experiment)
    else:
        pins = digest_tags(model_uri)
    with registry_lock(lock_path):
        vtags = {**vtags, **pins}  # the registrar's digests win over anything else
        if (done := journal.reconcile(client, model_name)) is not None:  # a killed writer's commit, first
            print(f"registry {model_name}: {done}", flush=True)
        mv = _version_of_run(client, model_name, vtags.get("mlflow_run_id"))
        _abandon_incomplete(client, model_name, keep=mv.version if mv is not None else None,
                            by=vtags.get("mlflow_run_id", ""))
        if mv is None:
            # Creates the registered model if missing, then a new version (max+1, server-side).
            mv = mlflow.register_model(model_uri, model_name, tags={**vtags, "status": INCOMPLETE})
        new_v = int(mv.version)
        status, decided_tags = READY, {}
        try:
            prev_v = _alias_holder(client, model_name, alias)
            if prev_v == new_v:  # an earlier attempt of this run already moved the alias, then faulted
                promote, reason, prev_v = True, f"already '{alias}' (set by an earlier attempt of this run)", None
            elif (twin := _rolled_back_twin(client, model_name, vtags.get("fingerprint"))) is not None:
                promote, reason = False, (f"not promoted: v{twin}, trained from the same inputs (fingerprint "
                                          f"{vtags['fingerprint']}), was rolled back; never auto-promoted again")
            elif prev_v is None:
                promote, reason = True, f"first champion: no version held alias '{alias}'"
            else:
                try:
                    # (promote, reason) or (promote, reason, tags): the decision's own tags (its ledger entry)
                    promote, reason, *extra = decide(prev_v)
                    decided_tags = extra[0] if extra else {}
                except Deferred as d:
                    promote, reason, status = False, str(d), DEFERRED
            if describe is not None and (card := describe(new_v, promote, reason)):
                client.update_model_version(model_name, str(new_v), description=card)
            decision = {"promoted": str(promote).lower(), "promotion_reason": reason[:5000], **decided_tags}
            if promote and prev_v is not None:
                decision["previous_champion"] = str(prev_v)  # what `qlora-ops rollback` returns to
            for k, v in decision.items():  # still `incomplete`: nothing trusts these until `status` below
                client.set_model_version_tag(model_name, str(new_v), k, v)
            # The commit, planned in one write first (tasks.registry.journal): a kill from here on is finished
            # by the next writer; before it, the version stays incomplete and is abandoned.
            writes = [["tag", str(new_v), "status", status]]
            if challenger_alias:
                writes.append(["alias", challenger_alias, str(new_v)])
            if promote:
                if prev_v is not None:
                    writes.append(["tag", str(prev_v), "replaced_by", str(new_v)])
                writes.append(["alias", alias, str(new_v)])  # the last write
            journal.run(client, model_name, journal.plan(
                "register", writes=writes, expect={alias: None if prev_v is None else str(prev_v)}))
            if promote:
                now = int(client.get_model_version_by_alias(model_name, alias).version)
                if now != new_v:
                    raise PromotionError(f"alias '{alias}' of {model_name} points at v{now} right after setting it "
                                         f"to v{new_v}: another writer bypassed the lock {lock_path}")
        except BaseException as e:
            try:
                client.set_model_version_tag(model_name, str(new_v), "promotion_error", f"{type(e).__name__}: {e}"[:5000])
            except Exception:
                pass  # keep the original error
            raise
        champ_after = _alias_holder(client, model_name, alias)
    return {"model_name": model_name, "version": new_v, "promoted": promote, "alias": alias, "status": status,
            "deferred": status == DEFERRED, "champion_version": champ_after, "previous_champion_version": prev_v,
            "reason": reason}


def repair(model_name: str, lock_path: Path) -> str | None:
    """Finish (or drop) the commit a killed writer left, under the lock (the caller holds the registered
    model's slot): what a run does before its skip check, so a promotion killed before its alias moved is
    finished, not lost to "registered from the same inputs". Returns what was done, or None."""
    with registry_lock(lock_path):
        return journal.reconcile(MlflowClient(), model_name)


def _abandon_incomplete(client: MlflowClient, model_name: str, keep: str | None, by: str) -> list[int]:
    """Tag every `status=incomplete` version (but this run's own, `keep`) `abandoned`; the caller holds
    the registry lock, so their writers are dead. `status` shows them; nothing promotes them."""
    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.status = '{INCOMPLETE}'")
    except MlflowException:
        return []  # no such registered model yet
    out = []
    for mv in found:
        if mv.version != keep:
            client.set_model_version_tag(model_name, mv.version, "promoted", "false")  # its decision never committed
            client.set_model_version_tag(model_name, mv.version, "promotion_reason",
                                         f"abandoned: its run was killed before registration finished (seen by run {by})")
            client.set_model_version_tag(model_name, mv.version, "status", ABANDONED)
            out.append(int(mv.version))
    return out


def _version_of_run(client: MlflowClient, model_name: str, run_id: str | None):
    if not run_id:
        return None
    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.mlflow_run_id = '{run_id}'")
    except MlflowException:
        return None
    return max(found, key=lambda mv: int(mv.version)) if found else None


def champion_info(model_name: str, alias: str) -> dict | None:
    """{"version": int, "tags": {...}} of the version holding `alias`, or None (no model / no alias)."""
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    client = MlflowClient()
    try:
        v = _alias_holder(client, model_name, alias)
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None  # no such registered model
        raise
    if v is None:
        return None
    mv = client.get_model_version(model_name, str(v))
    return {"version": v, "tags": dict(mv.tags or {})}
