"""Every cache key and fingerprint of qlora-ops, in one place, under one rule.

THE RULE: a key covers exactly the inputs that decide the bytes it names. Change one of those inputs
and the key changes (the bytes are made again); change anything else (where things are stored, how the
run is orchestrated, the report, the console, the CLI) and the key stays (the bytes are reused, or the
run is Skipped). A key never stands for "the same training inputs" when it names an evaluation: an
evaluation is keyed on the content of WHAT it evaluates.

| key                      | names                               | covers                                                     |
|--------------------------|-------------------------------------|------------------------------------------------------------|
| base_identity(dir)       | a model dir the user gave           | sha256 of every file (weights, every tokenizer file), cached |
| content_hash(dir)        | a dir we wrote (adapter, merged     | from its manifest, the sha256 of every file that is loaded |
|                          | model, 4-bit copy, converted base)  | (an adapter's config by meaning: PEFT orders a set at random) |
| quantized_base_key       | the 4-bit copy QLoRA trains on      | base identity, quantization params, hardware,              |
|                          |                                     | compute dtype, model libraries                             |
| train_key                | one trained adapter (run dir)       | train + val rows, base identity, kind-independent training |
|                          |                                     | params, "train" code, model libraries, hardware, force,    |
|                          |                                     | the resolved world size (+ ddp/fsdp) when above 1          |
| score_key                | how one suite is scored             | the suite's rows, "eval" code (decoding, prompting,        |
|                          |                                     | metrics), eval + quantization params (+ the suite's),      |
|                          |                                     | model + metric libraries, hardware, compute dtype,         |
|                          |                                     | model.max_seq_len (prompts are cut to it)                  |
| eval_key                 | one evaluation's predictions        | score key + content of what is evaluated (+ force)         |
| fingerprint              | the run's decision (skip when       | data version, params that decide model and verdict, the    |
|                          | an earlier run has it)              | decision code, base fingerprint, suites' rows, all libraries, |
|                          |                                     | the lock file (lock_hash, when there is one)               |

A model dir without a manifest (the user's base) is hashed file by file, every file; the hashes are kept
in the state dir by (path, size, mtime), so a run re-hashes only a file that changed. A hub base is its
commit. One deliberate exception, cheaper than the bytes it stands for: the run fingerprint identifies
the embedded GGUF by name and size, known before converting it (the parent flow may run on a machine that never loads the model).

The code a key covers is named by group (CODE_GROUPS). Files that decide nothing about the model or its
verdict are listed in NOT_DECIDING; a file in neither list counts as deciding (the safe side: a new
file retrains until it is classified), and tests/code/test_keys.py fails until it is classified.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_ops.tasks.core import lockfile
from qlora_ops.tasks.core.config import _LAUNCH, _NOT_WEIGHTS
from qlora_ops.tasks.core.hardware import compute_dtype, device, hardware, resolve_processes
from qlora_ops.tasks.core.hashing import digest
from qlora_ops.tasks.core.paths import ws_path
from qlora_ops.tasks.core.util import MANIFEST, read_json, sha256_dir, sha256_file
from qlora_ops.tasks.model.embedded import smollm2_gguf_path

if TYPE_CHECKING:
    from qlora_ops.tasks.core.config import Params

ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding tasks/ and flows/


# ---------------------------------------------------------------- code
# The code that decides the model and its verdict, by what it decides. An entry ending in "/" is a whole
# package (every .py below it): a file added to or moved inside a package stays in its group, and the
# hash is of the files' contents, not their names, so moving code inside a package retrains nothing.
CODE_GROUPS: dict[str, tuple[str, ...]] = {
    # what becomes the rows: readers, validation, split, format, sample builders, snapshots, the suites' rows
    "data": ("tasks/data/", "tasks/evaluate/suites.py"),
    "prompting": ("tasks/model/prompting.py",),
    # the training loop and the model loads it makes
    "train": ("tasks/train/", "tasks/model/modeling.py"),
    # the converted base and its 4-bit copy (their own keys cover their content; here for the fingerprint)
    "base": ("tasks/model/base.py", "tasks/model/embedded.py"),
    # the stage that routes them: which base each adapter trains on, what is merged into what
    "stage": ("flows/model_stage.py", "flows/prefect_tasks.py"),
    "eval": ("tasks/evaluate/", "tasks/model/modeling.py"),
    "metrics": ("tasks/metrics/",),
    "merge": ("tasks/model/merge.py",),
    # the verdict: gates, statistics, promotion policy, and how the run applies them
    "gates": ("tasks/gates/",),
}
DECISION = tuple(CODE_GROUPS)
# What a score depends on, of the code: decoding, prompts, metric maths.
EVAL_CODE = ("eval", "prompting", "metrics")
TRAIN_CODE = ("train", "prompting")
# Decide nothing about the model or its verdict: editing them must not retrain or re-register. A file in
# a code group above is deciding even inside a package listed here (flows/model_stage.py).
NOT_DECIDING: tuple[str, ...] = (
    "tasks/__init__.py",
    # core: config's defaults reach every key through the params digest; the device and compute dtype
    # through their values (hardware(), _dtype); the rest is where and how (paths, atomic files, hashing,
    # the lock, whose content reaches the fingerprint through lock_hash), or what is shown
    "tasks/core/",
    "tasks/model/keys.py", "tasks/model/__init__.py",  # the keys themselves: a changed recipe changes the keys it makes
    "tasks/report/",  # what is shown
    "tasks/registry/",  # records of the decision; the pyfunc loader runs after it
    "tasks/serving/",  # after the decision: export and serving
    "tasks/intake/",  # write or check a params file; the params are covered
    "flows/",  # orchestration: states, retries, timeouts, locks, triggers, deployments, the CLI, the summary
)


def _expand(entries: tuple[str, ...], root: Path) -> list[Path]:
    out = set()
    for e in entries:
        found = (root / e).rglob("*.py") if e.endswith("/") else [root / e]
        out |= {p for p in found if p.is_file() and "__pycache__" not in p.parts}
    return sorted(out)


def source_files(*groups: str, root: Path = ROOT) -> list[Path]:
    """The files of these code groups (all decision groups if none), plus every unclassified file
    (deciding until classified) when all groups are asked for."""
    files = set(_expand(tuple(g for name in (groups or DECISION) for g in CODE_GROUPS[name]), root))
    if not groups:
        files |= {root / f for f in unclassified(root)}
    return sorted(files)


def unclassified(root: Path = ROOT) -> list[str]:
    """Python sources under tasks/ and flows/ in no code group and not in NOT_DECIDING."""
    known = set(_expand(tuple(g for gs in CODE_GROUPS.values() for g in gs), root)) | set(_expand(NOT_DECIDING, root))
    return sorted(p.relative_to(root).as_posix() for d in ("tasks", "flows") for p in (root / d).rglob("*.py")
                  if p not in known and "__pycache__" not in p.parts)


def _hash_files(files: list[Path], root: Path) -> str:
    """The files' contents as a set: where a file lies inside its group does not count."""
    h = hashlib.sha256()
    for d in sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in files):
        h.update(d.encode())
    return h.hexdigest()[:16]


def code_hash(*groups: str, root: Path = ROOT) -> str:
    """Hash of the source files of these code groups (every decision group if none)."""
    return _hash_files(source_files(*groups, root=root), root)


def code_version(root: Path = ROOT) -> dict:
    """What code ran, for the record: git commit and dirty flag of the checkout (when there is one),
    `source_sha` of every stage source (traceability), `decision_sha` of the code the fingerprint covers."""
    every = sorted(list((root / "tasks").rglob("*.py")) + list((root / "flows").rglob("*.py")))
    info = {"source_sha": _hash_files([p for p in every if "__pycache__" not in p.parts], root),
            "decision_sha": code_hash(root=root), "git_commit": None, "git_dirty": None}
    if not (root / "pyproject.toml").is_file():  # an installed wheel: site-packages may sit inside someone's git repo
        return info
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                            check=True).stdout.strip()
        info["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--", "tasks", "flows"], cwd=root,
                                                capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


# ---------------------------------------------------------------- libraries, hardware, lock file
LIBS: dict[str, tuple[str, ...]] = {
    # what computes the weights and the generated tokens
    "model": ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers"),
    # what turns answers into scores
    "metrics": ("evaluate", "datasets", "rouge-score", "sacrebleu", "nltk", "lm-eval"),
    # what turns scores into verdicts (bootstrap draws, exact tests)
    "stats": ("numpy", "scipy", "statsmodels"),
}


def lib_versions(*groups: str) -> dict[str, str | None]:
    """Installed versions of the libraries of these groups (all if none); None = not installed."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for g in groups or tuple(LIBS):
        for name in LIBS[g]:
            try:
                out[name] = version(name)
            except PackageNotFoundError:
                out[name] = None
    return out


def lock_hash(root: Path = ROOT) -> str | None:
    """sha256 (16 hex) of the dependency lock (every file of locks/: one lock per platform, made by
    `bash .ci/lock.sh`), or None when there is none (an installed wheel). Part of the run fingerprint:
    a new lock retrains. The same hash tags every MLflow run (tasks.core.lockfile.run_tags)."""
    return lockfile.lock_hash(root)


# ---------------------------------------------------------------- model and data identities
HASH_CACHE = "file-hashes.json"  # in the state dir's cache/: sha256 of a user's model files by (path, size, mtime)


def _file_sha256(p: Path, cache: dict) -> str:
    """sha256 of a file, reused while its (path, size, mtime) is unchanged: hashing ~0.5 GB of weights
    costs seconds, and a base is keyed on every run. A file rewritten in place gets a new mtime."""
    st = p.stat()
    stamp, key = f"{st.st_size}:{st.st_mtime_ns}", str(p.resolve())
    hit = cache.get(key)
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    cache[key] = {"stamp": stamp, "sha256": sha256_file(p)}
    return cache[key]["sha256"]


def base_identity(path: Path, cache_dir: Path | None = None) -> str:
    """Identity of a model dir without a manifest (a base the user gave): the sha256 of every file in it
    (weights, config, every tokenizer file: tokenizer.model, merges.txt, vocab.*, templates), by relative
    path, so new weights of the same shapes or an edited tokenizer get a new identity, and the same files
    give the same identity on every machine. Hidden files and dirs (.git, .cache) are not the model.
    `cache_dir`: where the hashes are kept between runs (the state dir's cache/)."""
    from qlora_ops.tasks.core.util import atomic_write_json

    path = Path(path)
    store = Path(cache_dir) / HASH_CACHE if cache_dir is not None else None
    cache = read_json(store) if store is not None and store.is_file() else {}
    before = dict(cache)
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    parts = {p.relative_to(path).as_posix(): _file_sha256(p, cache) for p in files}
    if store is not None and cache != before:
        store.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(store, cache)
    return digest(parts)[:16]


def hub_commit(repo_id: str) -> str:
    """The commit a hub base resolves to: the local Hugging Face cache's ref (what a load would use
    offline), else the hub's answer. A base that cannot be pinned to a commit is refused: its id alone
    would key new weights pushed under the same name as the old ones."""
    name, _, rev = repo_id.partition("@")
    rev = rev or "main"
    if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev):
        return rev
    try:
        from huggingface_hub import constants

        ref = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "refs" / rev
        if ref.is_file():
            return ref.read_text().strip()
        from huggingface_hub import HfApi

        return HfApi().model_info(name, revision=rev, timeout=30).sha
    except Exception as e:
        raise RuntimeError(f"model.source={repo_id!r}: cannot resolve the hub revision {rev!r} to a commit "
                           f"({type(e).__name__}: {e}); download it once (it is then in the local cache) or "
                           "name a commit as model.source: <id>@<40-hex commit>") from None


def base_fingerprint(params: "Params", workspace: Path) -> str:
    """The base model's identity for the run fingerprint, known before (and without) converting it: the
    content of a local dir (hashes cached in the state dir), a hub base's commit."""
    from qlora_ops.tasks.core.paths import state_dir

    src = params.model.source
    if src == "smollm2-gguf":
        g = smollm2_gguf_path()
        return f"smollm2-gguf:{g.name}:{g.stat().st_size}"
    local = ws_path(workspace, src)
    if local.is_dir():
        return f"dir:{base_identity(local, state_dir(workspace, params) / 'cache')}"
    return f"hub:{src.partition('@')[0]}@{hub_commit(src)}"


def content_hash(path: Path) -> str:
    """The content of a dir we wrote (adapter, merged model, 4-bit copy, converted base), from its
    manifest (sha256 + size of every file): the same bytes give the same hash wherever they lie.
    A dir without a manifest (a model dir the user gave) falls back to base_identity (every file's content).
    The manifest is read, not re-verified: every load of such a dir verifies it (util.check_manifest)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return "dir:" + base_identity(path)
    parts = {}
    for rel, f in read_json(path / MANIFEST)["files"].items():
        name = Path(rel).name
        if name == "README.md":  # PEFT's model card: never loaded, decides nothing
            continue
        if name == "adapter_config.json":
            # PEFT writes target_modules, a set, in the process's hash-seed order: the same adapter gets other
            # bytes in every training process. Keyed on what it means, so a deterministic retrain matches.
            cfg = read_json(path / rel)
            if isinstance(cfg.get("target_modules"), list):
                cfg["target_modules"] = sorted(cfg["target_modules"])
            parts[rel] = digest(cfg)
        else:
            parts[rel] = f["sha256"]
    return digest(parts)


def data_version(outs: dict[str, str | None]) -> str:
    """The data version: DVC's md5 of every output of the prepare stage (12 hex digits; the recipe of
    every version recorded so far, kept so old and new versions compare)."""
    return hashlib.sha256(repr(sorted(outs.items())).encode()).hexdigest()[:12]


def data_hash(prepared: Path) -> str:
    """The training rows: train + val splits."""
    return digest(sha256_file(Path(prepared) / "train.jsonl"), sha256_file(Path(prepared) / "val.jsonl"))


def rows_hash(path: Path) -> str:
    """The rows of one suite (the test split's file, an extra suite's file, or an lm-eval task's folder:
    its YAML and data files): what score keys name."""
    return (sha256_dir(path) if Path(path).is_dir() else sha256_file(path))[:16]


# ---------------------------------------------------------------- cache keys
def _dtype(params: "Params") -> str:
    return str(compute_dtype(params.quantization, device()))


def quantized_base_key(params: "Params", base_dir: Path, cache_dir: Path | None = None) -> str:
    """The 4-bit copy of `base_dir`: the base's content (a retrained same-size checkpoint gets a new copy),
    the quantization params, the hardware and compute dtype, and the libraries that write the format."""
    return digest(base_identity(base_dir, cache_dir), params.quantization.model_dump(mode="json"), hardware(), _dtype(params),
                  lib_versions("model"))


# Training settings that cannot change the weights: how often the loop evaluates val loss (no RNG, no
# weight update), saves and prunes checkpoints. They stay out of the train key and the fingerprint.
NOT_WEIGHTS = _NOT_WEIGHTS  # one list, in tasks.core.config (the fingerprint's params digest drops them too)
# training.processes / training.distributed as written ("auto" or 1 on one GPU): not the key's business;
# train_key names the resolved world size instead (below), the one thing that decides the bytes.
LAUNCH = _LAUNCH


def weight_params(params: "Params") -> dict:
    """The params that decide a trained adapter's weights (NOT_WEIGHTS and LAUNCH left out)."""
    d = params.model_dump(mode="json", include={"seed", "model", "quantization", "lora", "training"})
    d["training"] = {k: v for k, v in d["training"].items() if k not in NOT_WEIGHTS + LAUNCH}
    return d


def launch_part(params: "Params") -> tuple[dict, ...]:
    """The world size of the training and how it shares the model, when more than one process trains: other
    float summation orders, and per-rank dropout masks, so other bytes. () for one process, whatever
    training.processes says, so every 1-process key is the key it always was."""
    world = resolve_processes(params)
    return ({"processes": world, "distributed": params.training.distributed},) if world > 1 else ()


def train_key(params: "Params", data: str, base_id: str, nonce: str = "") -> str:
    """One trained adapter: its rows, its base, the params and code of training (not NOT_WEIGHTS), the
    libraries and hardware that compute it, the world size when above 1, and the force nonce (a forced run
    trains into a new dir)."""
    return digest(data, base_id, code_hash(*TRAIN_CODE), weight_params(params), lib_versions("model"), hardware(), nonce,
                  *launch_part(params))


def score_key(params: "Params", rows: str, suite: Any = None) -> str:
    """How a model is scored on one suite's rows (`suite`: its SuiteParams, None = the domain test split):
    two models' results are compared row by row only when their score keys match. Covers the rows,
    decoding + prompting + metric code, eval and quantization params (and the suite's own), the model and
    metric libraries, the hardware and the compute dtype."""
    ev = params.eval.model_dump(mode="json", exclude={"suites"})  # another suite does not change how this one scores
    if suite is not None:  # its own metric and rows (cut at prepare); the domain split's choices are not its
        ev = {k: v for k, v in ev.items() if k not in ("metric", "report_metrics", "max_examples")}
        own = {"metric", "lm_eval"} | ({"system_prompt", "max_examples", "filter"} if suite.lm_eval else set())  # else in its rows
        ev["suite"] = suite.model_dump(mode="json", include=own)
    # model.max_seq_len: prompts are cut from the left to fit it (nll's teacher forcing, as in training).
    return digest(rows, code_hash(*EVAL_CODE), ev, params.quantization.model_dump(mode="json"),
                  lib_versions("model", "metrics"), hardware(), _dtype(params), {"max_seq_len": params.model.max_seq_len})


def eval_key(score: str, *contents: str, nonce: str = "") -> str:
    """One evaluation's predictions: the score key and the content of what is evaluated (the base, the
    adapter on its base, the merged weights), so a rebuilt or non-deterministic adapter is scored
    again; the force nonce makes a forced run re-evaluate into new dirs."""
    return digest(score, *contents, nonce)


def fingerprint(data_version: str, params: "Params", base_fp: str, suites: dict[str, str] | None = None,
                root: Path = ROOT) -> str:
    """Everything that decides the model and its verdict: a run with the same one has nothing new to do.
    `suites`: {name: rows hash} of the extra suites (their params are in params.model_digest)."""
    parts: list[Any] = [data_version, params.model_digest(), code_hash(root=root), base_fp, lib_versions()]
    if suites:
        parts.append(dict(sorted(suites.items())))
    if (lock := lock_hash(root)) is not None:
        parts.append(lock)
    return digest(*parts)
