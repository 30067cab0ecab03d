"""tasks/model/keys.py: every key covers exactly the inputs that decide the bytes it names.

The fingerprint moves with the code that decides the model and its verdict and stays when only the
report, the console or the CLI change; score keys and train keys move with library versions and the
hardware; an evaluation's key follows the content of what it evaluates."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora_ops.tasks.model import keys
from qlora_ops.tasks.core.config import Params
from tests.conftest import ROOT


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of this checkout's tasks/ and flows/: a root whose files the test may edit."""
    for d in ("tasks", "flows"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _edit(root: Path, rel: str) -> None:
    with open(root / rel, "a") as f:
        f.write("\n# an edit\n")


def _fp(root: Path, p: Params | None = None) -> str:
    return keys.fingerprint("data-v1", p or Params(), "base-1", root=root)


@pytest.mark.parametrize("rel", ["tasks/report/scores.py", "tasks/core/console.py", "flows/retrain.py",
                                 "tasks/registry/register.py", "tasks/registry/tracking.py"])
def test_editing_what_is_shown_or_recorded_keeps_the_fingerprint(tree, rel):
    before, sha = _fp(tree), keys.code_version(tree)["source_sha"]
    _edit(tree, rel)
    assert _fp(tree) == before
    assert keys.code_version(tree)["source_sha"] != sha  # still recorded on the run: what code ran


@pytest.mark.parametrize("rel", ["tasks/train/loop.py", "tasks/evaluate/predict.py", "tasks/model/prompting.py", "tasks/model/merge.py",
                                 "tasks/gates/gate.py", "tasks/data/prepare.py", "tasks/model/modeling.py",
                                 *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("tasks/metrics/*/*.py"))[:1],
                                 "tasks/metrics/__init__.py", "flows/model_stage.py",
                                 "tasks/gates/verdict.py"])
def test_editing_decision_code_changes_the_fingerprint(tree, rel):
    before = _fp(tree)
    _edit(tree, rel)
    assert _fp(tree) != before


def test_a_new_unclassified_source_counts_as_deciding(tree):
    before = _fp(tree)
    (tree / "tasks" / "brand_new.py").write_text("X = 1\n")
    assert keys.unclassified(tree) == ["tasks/brand_new.py"]
    assert _fp(tree) != before


def test_code_groups_follow_packages_a_file_moved_inside_one_keeps_the_fingerprint(tree):
    before = _fp(tree)
    (tree / "tasks" / "train" / "brand_new.py").write_text("X = 1\n")  # a new file of a deciding package
    assert keys.unclassified(tree) == [] and _fp(tree) != before
    added = _fp(tree)
    (tree / "tasks" / "train" / "brand_new.py").rename(tree / "tasks" / "train" / "renamed.py")
    assert _fp(tree) == added
    (tree / "tasks" / "report" / "brand_new.py").write_text("X = 1\n")  # a new file of a package that decides nothing
    assert keys.unclassified(tree) == [] and _fp(tree) == added


def test_every_source_file_is_classified():
    # A new file under tasks/ or flows/ goes into keys.CODE_GROUPS (it decides the model or its verdict)
    # or keys.NOT_DECIDING; until then it counts as deciding (retrains on every edit).
    assert keys.unclassified() == [], "classify these in tasks/model/keys.py (CODE_GROUPS or NOT_DECIDING)"
    assert all(list(ROOT.glob(g)) for gs in keys.CODE_GROUPS.values() for g in gs
               if g != "tasks/evaluate/lm_eval_suite.py"), "a code group names a file that is not there"


def test_score_and_train_keys_and_fingerprint_follow_library_versions(monkeypatch):
    import importlib.metadata

    p = Params()
    before = (keys.score_key(p, "rows"), keys.train_key(p, "data", "base"), keys.fingerprint("d", p, "b"))
    real = importlib.metadata.version
    for lib in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "evaluate"):
        monkeypatch.setattr(importlib.metadata, "version", lambda n, lib=lib: "99.0" if n == lib else real(n))
        after = (keys.score_key(p, "rows"), keys.train_key(p, "data", "base"), keys.fingerprint("d", p, "b"))
        assert after[0] != before[0] and after[2] != before[2], lib
        assert (after[1] != before[1]) == (lib != "evaluate"), lib  # a metric library does not change the weights


def test_score_key_follows_the_gpu_model(monkeypatch):
    p = Params()
    monkeypatch.setattr(keys, "hardware", lambda: {"device": "cuda", "gpu": "NVIDIA A100-SXM4-80GB", "capability": "8.0"})
    a100 = keys.score_key(p, "rows"), keys.train_key(p, "data", "base")
    monkeypatch.setattr(keys, "hardware", lambda: {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0"})
    h100 = keys.score_key(p, "rows"), keys.train_key(p, "data", "base")
    assert a100[0] != h100[0] and a100[1] != h100[1]


def test_score_key_covers_how_a_suite_is_scored_and_nothing_else():
    from qlora_ops.tasks.core.config import SuiteParams

    p = Params()
    k = keys.score_key(p, "rows")
    assert keys.score_key(Params(eval={"batch_size": 3}), "rows") != k  # padding changes the numbers
    assert keys.score_key(p, "other rows") != k
    # nll cuts prompts at model.max_seq_len: a saved NLL at another length was reused (issue 26)
    assert keys.score_key(Params(model={"max_seq_len": p.model.max_seq_len // 2}), "rows") != k
    assert keys.score_key(Params(registry={"model_name": "x"}, gates={"min_gain_over_base": 0.0}), "rows") == k
    s = SuiteParams(name="general", path="x.jsonl", role="non_inferior", threshold=0.05)
    with_suite = Params(eval={"suites": [s.model_dump()]})
    assert keys.score_key(with_suite, "rows") == k  # another suite does not change how the test split scores
    ks = keys.score_key(with_suite, "rows", s)
    assert ks != k and keys.score_key(with_suite, "rows", s.model_copy(update={"threshold": 0.2})) == ks


def _adapter(d: Path, weights: bytes) -> Path:
    from qlora_ops.tasks.core.util import write_manifest

    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(weights)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8}))
    write_manifest(d)
    return d


def test_an_evaluation_is_keyed_on_the_content_it_evaluates(tmp_path):
    a = keys.content_hash(_adapter(tmp_path / "a", b"\x00" * 64))
    same_bytes_elsewhere = keys.content_hash(_adapter(tmp_path / "elsewhere" / "a", b"\x00" * 64))
    rebuilt = keys.content_hash(_adapter(tmp_path / "b", b"\x00" * 63 + b"\x01"))  # a non-deterministic retrain
    assert a == same_bytes_elsewhere and a != rebuilt
    score = keys.score_key(Params(), "rows")
    assert keys.eval_key(score, "base", a) == keys.eval_key(score, "base", same_bytes_elsewhere)
    assert keys.eval_key(score, "base", a) != keys.eval_key(score, "base", rebuilt)
    assert keys.eval_key(score, "base", a) != keys.eval_key(score, "base", a, nonce="forced-run")


def test_content_hash_is_what_is_loaded_not_how_peft_happened_to_write_it(tmp_path):
    from qlora_ops.tasks.core.util import write_manifest

    a = _adapter(tmp_path / "a", b"\x00" * 64)
    b = _adapter(tmp_path / "b", b"\x00" * 64)
    (a / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj", "v_proj"]}))
    (b / "adapter_config.json").write_text(json.dumps({"target_modules": ["v_proj", "q_proj"], "r": 8}))
    (b / "README.md").write_text("a model card PEFT writes\n")
    write_manifest(a), write_manifest(b)
    assert keys.content_hash(a) == keys.content_hash(b)  # the same adapter from two training processes
    (b / "adapter_config.json").write_text(json.dumps({"target_modules": ["v_proj", "q_proj"], "r": 16}))
    write_manifest(b)
    assert keys.content_hash(a) != keys.content_hash(b)


def test_lock_file_hook(tree):
    assert keys.lock_hash(tree) is None  # an installed wheel: no locks/
    before = _fp(tree)
    shutil.copytree(ROOT / "locks", tree / "locks")
    assert keys.lock_hash(tree) == keys.lock_hash(ROOT) and _fp(tree) != before
    with_lock = _fp(tree)
    lock = tree / "locks" / "linux-x86_64-cpu.txt"  # a regenerated lock (an upgrade): the run retrains
    lock.write_text(lock.read_text().replace("\npeft==", "\npeft==0.0.0.dev0+x\n#", 1))
    assert _fp(tree) != with_lock


def test_params_digests():
    p = Params()
    assert p.digest("training") == Params(registry={"model_name": "x"}).digest("training")
    assert p.model_digest() == Params(registry={"model_name": "x", "tracking_uri": "http://h"},
                                      orchestration={"gpu_pool": "gpu"}).model_digest()
    # the promotion policy is part of the verdict
    assert p.model_digest() != Params(registry={"min_improvement": 0.05}).model_digest()
    assert p.model_digest() != Params(seed=1).model_digest()


def test_data_version_recipe_is_unchanged():
    # versions recorded before keys.py existed must compare with new ones
    import hashlib

    outs = {"data/prepared/default": "abc.dir"}
    assert keys.data_version(outs) == hashlib.sha256(repr(sorted(outs.items())).encode()).hexdigest()[:12]


def test_a_champion_that_moved_is_never_scored_under_another_score_key(monkeypatch, tmp_path):
    """The champion moved while a (GPU) model stage ran: this (CPU) parent must not score it and compare it
    with the candidate's GPU scores. Its own saved predictions under the same score key may be used (both were
    scored alike); otherwise the decision is deferred (tasks.registry.register.Deferred), never re-scored here."""
    from qlora_ops.flows import retrain
    from qlora_ops.tasks.evaluate import predict as evaluate
    from qlora_ops.tasks.registry import manual as registry_ops
    from qlora_ops.tasks.registry.register import Deferred

    rows = {"ids": ["a", "b", "c"], "correct": [True, True, False], "answers": ["x", "y", "z"]}
    ms = {"rows": {"merged": rows}, "champion": {"version": 1, "how": "saved", **rows}, "score_key": "gpu-stage-key"}
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: pytest.fail("the parent scored the champion"))
    monkeypatch.setattr(registry_ops, "version_rows", lambda *a, **k: ("cpu-key", rows))
    monkeypatch.setattr(registry_ops, "budget", lambda *a, **k: {"can_decide": True})  # no registry here
    with pytest.raises(Deferred, match="score key"):
        retrain.decide_promotion(Params(), tmp_path, "run", ms, champion_v=2)

    saved = {**rows, "correct": [False] * 3}
    monkeypatch.setattr(registry_ops, "version_rows", lambda *a, **k: ("gpu-stage-key", saved))
    ok, why, tags = retrain.decide_promotion(Params(), tmp_path, "run", ms, champion_v=2)
    assert "champion v2: its own saved predictions" in why, why
    assert [k for k in tags if k.startswith("decision:")]  # the decision's ledger entry


def _user_base(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"hidden_size": 8}')
    (d / "model.safetensors").write_bytes(b"\x01" * 4096)
    (d / "tokenizer.model").write_bytes(b"spm-v1")
    (d / "merges.txt").write_text("a b\n")
    return d


def test_a_user_base_is_keyed_by_the_content_of_every_file(tmp_path):
    """issue 25: new same-size weights, an edited tokenizer.model or merges.txt left every key unchanged."""
    p, ws = Params(model={"source": "base"}), tmp_path / "ws"
    base = _user_base(ws / "base")
    first = keys.base_fingerprint(p, ws)
    for rel, data in (("model.safetensors", b"\x02" * 4096), ("tokenizer.model", b"spm-v2"), ("merges.txt", b"a c\n")):
        (base / rel).write_bytes(data)  # same size: names and sizes alone would not see it
        now = keys.base_fingerprint(p, ws)
        assert now != first, rel
        first = now
    shutil.copytree(base, tmp_path / "elsewhere" / "base")  # the same files on another machine: the same key
    assert keys.base_fingerprint(p, tmp_path / "elsewhere") == first


def test_base_hashes_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    base, cache = _user_base(tmp_path / "base"), tmp_path / "state" / "cache"
    first = keys.base_identity(base, cache)
    hashed = []
    monkeypatch.setattr(keys, "sha256_file", lambda p: hashed.append(p) or "x")
    assert keys.base_identity(base, cache) == first and hashed == []  # nothing re-hashed
    (base / "merges.txt").write_text("z z\n")
    keys.base_identity(base, cache)
    assert hashed == [base / "merges.txt"]  # only the file that changed


def test_a_hub_base_is_keyed_by_its_commit(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    ref = tmp_path / "models--org--m" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    p = Params(model={"source": "org/m"})
    assert keys.base_fingerprint(p, tmp_path / "ws") == "hub:org/m@" + "a" * 40
    ref.write_text("b" * 40)  # new weights pushed under the same name
    assert keys.base_fingerprint(p, tmp_path / "ws") == "hub:org/m@" + "b" * 40


def test_settings_that_cannot_change_weights_stay_out_of_train_key_and_fingerprint(tree):
    """issue 25: save_every, keep_last and eval_every changed the train key and retrained both models."""
    p = Params()
    for k in ("save_every", "keep_last", "eval_every"):
        q = Params(training={k: getattr(p.training, k) + 3})
        assert keys.train_key(q, "d", "b") == keys.train_key(p, "d", "b"), k
        assert _fp(tree, q) == _fp(tree, p), k
    q = Params(training={"lr": p.training.lr * 2})  # one that does change them still does
    assert keys.train_key(q, "d", "b") != keys.train_key(p, "d", "b") and _fp(tree, q) != _fp(tree, p)


def test_training_processes_enter_the_train_key_only_above_one(tree, monkeypatch):
    """training.processes / training.distributed: one process (auto on CPU or one GPU, or 1) keeps the key
    every 1-process run always had (the formula before the setting existed, over a dump without it); the
    resolved world size above 1, and how it shares the model, give other keys. The fingerprint never moves."""
    import torch

    from qlora_ops.tasks.core.hashing import digest

    def before(p: Params) -> str:
        d = p.model_dump(mode="json", include={"seed", "model", "quantization", "lora", "training"})
        d["training"] = {k: v for k, v in d["training"].items()
                         if k not in ("eval_every", "save_every", "keep_last", "processes", "distributed")}
        return digest("d", "b", keys.code_hash(*keys.TRAIN_CODE), d, keys.lib_versions("model"), keys.hardware(), "")

    monkeypatch.setattr(keys, "hardware", lambda: {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    auto, one = Params(), Params(training={"processes": 1})
    assert keys.train_key(auto, "d", "b") == keys.train_key(one, "d", "b") == before(auto)
    fsdp_auto = Params(training={"distributed": "fsdp"}, quantization={"quant_storage": "bfloat16"})
    assert keys.train_key(fsdp_auto, "d", "b") == before(fsdp_auto)  # one GPU: one process, fsdp or not
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a worker with two GPUs
    two = Params(training={"processes": 2})
    assert keys.train_key(two, "d", "b") != before(auto)
    assert keys.train_key(auto, "d", "b") == keys.train_key(two, "d", "b")  # auto there is 2
    assert keys.train_key(one, "d", "b") == before(one)  # 1 asked for: still the 1-process key
    fsdp2 = Params(training={"processes": 2, "distributed": "fsdp"}, quantization={"quant_storage": "bfloat16"})
    fsdp2_ddp = Params(training={"processes": 2}, quantization={"quant_storage": "bfloat16"})
    assert keys.train_key(fsdp2, "d", "b") != keys.train_key(fsdp2_ddp, "d", "b")
    assert _fp(tree, two) == _fp(tree, one) == _fp(tree, auto)  # how many GPUs trained it re-decides nothing
