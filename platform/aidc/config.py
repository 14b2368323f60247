"""Pydantic models for every job config, YAML loading and `--set a.b=value` overrides.

A bad config fails at load time with the file, the field path, the bad value and what
is allowed, so nothing starts on the cluster with a config that cannot work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidationInfo, field_validator, model_validator

from aidc.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SplitConfig(Strict):
    strategy: Literal["hash", "predefined", "time", "group"] = Field(
        "hash",
        description="hash: by a hash of each row's key; predefined: the dataset's own test set (MNIST, FSDD's "
        "official split), the rest hashed into train/val; time: per user, the latest ratings go to val/test "
        "(recommenders); group: every row of the test_groups (values of group_column, e.g. a held-out speaker) is "
        "the test set, the rest hashed into train/val. Speech also names official (= predefined) and speaker (= "
        "group over the speaker column).",
    )
    group_column: str | None = Field(None, description="strategy: group: the column whose values are groups, e.g. "
                                     "speaker.")
    test_groups: list[str] = Field([], description="strategy: group: the groups held out as the test set.")
    train: float = Field(0.8, gt=0, le=1, description="Fraction of rows in the training split.")
    val: float = Field(0.1, gt=0, lt=1, description="Fraction of rows in the validation split.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of rows in the held-out test split (0 with predefined).")
    seed: int = Field(0, description="Salt of the row-key hash that assigns splits; same seed, same split.")

    @model_validator(mode="before")
    @classmethod
    def _named_splits(cls, data):
        """Speech's named splits: `official` = predefined (FSDD's recordings 0-4 are the test set), `speaker` =
        group over the speaker column (test_groups: the held-out speakers); train/val default to 0.9/0.1."""
        if isinstance(data, dict) and data.get("strategy") in ("official", "speaker"):
            data = {"train": 0.9, "val": 0.1, "test": 0, **data}
            if data["strategy"] == "speaker":
                data = {"group_column": "speaker", **data, "strategy": "group"}
            else:
                data["strategy"] = "predefined"
        return data

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + val + test must add up to 1.0, got {total:g}; e.g. train: 0.8, val: 0.1, test: 0.1"
            )
        if self.strategy in ("predefined", "group") and self.test != 0:
            raise ValueError(f"with strategy: {self.strategy} the test set is given (not a fraction): set test: 0")
        if self.strategy not in ("predefined", "group") and self.test == 0:
            raise ValueError("test must be > 0 (a held-out split), unless strategy: predefined or group")
        if self.strategy == "group" and (not self.group_column or not self.test_groups):
            raise ValueError("strategy: group needs group_column and test_groups, e.g. group_column: speaker, "
                             "test_groups: [theo]")
        return self


class CleanConfig(Strict):
    dedup: bool = Field(True, description="Reject exact duplicate rows (the first occurrence is kept).")
    nulls: Literal["drop", "fill"] = Field("drop", description="Rows with missing/NaN values: reject or fill.")
    fill_value: float = Field(0.0, description="Value that replaces missing numbers when nulls: fill.")


class TextConfig(Strict):
    tokenizer: Literal["bpe", "char"] = Field("bpe", description="Byte-level BPE (HF tokenizers) or characters.")
    vocab_size: int = Field(2000, ge=64, le=262144, description="BPE vocabulary size (special tokens included).")
    max_length: int = Field(64, ge=4, description="Classifier inputs are truncated/padded to this many tokens.")
    block_size: int = Field(128, ge=8, description="Language-model training blocks, in tokens.")
    lowercase: bool = Field(False, description="Lower-case text before tokenizing.")


class AugmentConfig(Strict):
    enabled: bool = Field(False, description="Random augmentation of training images, on the stream.")
    max_shift: int = Field(2, ge=0, description="Largest random shift in pixels (x and y).")
    max_rotate: float = Field(10.0, ge=0, le=180, description="Largest random rotation in degrees.")
    flip: bool = Field(False, description="Random horizontal flips (off for digits: a flipped 2 is not a 2).")


class AudioConfig(Strict):
    """Audio workloads: the recordings' format and the log-mel features computed from them."""

    sample_rate: int = Field(8000, ge=1000, description="Sample rate every recording must have (Hz); others are "
                             "rejected with the reason.")
    n_mels: int = Field(40, ge=8, description="Mel bands of the log-mel features.")
    window_ms: float = Field(32.0, gt=0, description="FFT window length, milliseconds.")
    hop_ms: float = Field(10.0, gt=0, description="Hop between feature frames, milliseconds.")
    max_seconds: float | None = Field(
        None, gt=0, description="Longest audio the model sees (longer is cut); default: the training split's 99th "
        "percentile length.")
    augment: bool = Field(False, description="Augment training audio on the stream: time shift and noise (no gain: "
                          "the features are relative to each recording's loudest bin).")
    max_time_shift_ms: int = Field(100, ge=0, description="Largest random time shift, milliseconds.")
    noise_snr_db: float | None = Field(20.0, description="Added white noise at a random signal-to-noise ratio from "
                                       "this to 20 dB more (dB below the recording's level); null: no noise.")


class ChatDataConfig(Strict):
    """Fine-tuning data (task causal_lm): chat, instruction or plain-text rows, tokenized with the base model's own
    tokenizer and chat template."""

    max_length: int = Field(256, ge=8, description="Most tokens of one example (prompt + answer); longer rows are "
                            "rejected with a reason (never cut), and it may not exceed the base model's context.")
    mask_prompt: bool = Field(True, description="Loss on the assistant / completion tokens only (system and user "
                              "turns are context, not targets); false trains on every token.")
    packing: bool = Field(False, description="Pack several training examples into each max_length row (fewer "
                          "padding tokens); each example attends only to itself (a block-diagonal mask, positions "
                          "restarting per example), so packing changes throughput, not what is learned.")
    examples: int = Field(2000, ge=10, description="source: synthetic-instructions: rows generated.")
    eval_examples: int = Field(64, ge=0, description="Held-out test rows answered greedily after training (and by "
                               "the base model before it), scored by exact match on the reference answer; 0 = off.")
    max_new_tokens: int = Field(24, ge=1, description="Most tokens an evaluation answer may take.")
    samples: int = Field(4, ge=0, description="Sample generations (prompt, reference, base and tuned answer) logged "
                         "to the MLflow run.")


# Personal data types data.privacy.scrub can replace (aidc.data.privacy maps each to a Presidio recognizer)
PII_TYPES = ("email", "phone", "credit_card", "iban", "ip_address", "url", "us_ssn", "crypto", "uk_nhs")


class PrivacyConfig(Strict):
    scrub: list[Literal[PII_TYPES]] = Field(
        [], description="Personal data to replace by typed placeholders (<EMAIL>, <PHONE>, ...) in text datasets "
        "before anything is written (Presidio's recognizers; cards and IBANs checksum-validated). The manifest "
        "counts what was found per type, never the values.")
    min_score: float = Field(0.0, ge=0, le=1, description="Presidio's confidence a hit needs to be replaced (phone "
                             "numbers without context score 0.4, checksum-validated cards and IBANs 1.0).")

    @field_validator("scrub", mode="before")
    @classmethod
    def _no_model_types(cls, value):
        if not isinstance(value, list):
            return value  # pydantic names the type error
        needs_model = [v for v in value if v in ("person", "location", "organization", "date_time", "nrp")]
        if needs_model:
            raise ValueError(f"{needs_model} need a named-entity model, which aidc does not download at run time; "
                             f"scrub the pattern-based types: {list(PII_TYPES)}")
        return value


KEY_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # a key id names its key file: no path, no leading dot


class EncryptionConfig(Strict):
    key: str = Field(..., min_length=1, pattern=KEY_ID, description="Id of the master key: with kms "
                     "local, env AIDC_KEY_<ID> or the key file <AIDC_KEYS_DIR or ~/.aidc/keys>/<id>.key (mode 0600; "
                     "aidc data keygen <id> makes one).")
    kms: str = Field("local", min_length=1, description="KMS client that wraps the data keys: local, or one a "
                     "deployment registers (aidc.data.encryption.register_kms).")


# The named datasets data.source can name besides `files`: aidc.data registers each loader's name when it is
# imported. A dataset some task lists in its data_sources (fine-tuning data, recordings) is that task's only.
DATASETS: set[str] = set()


def register_dataset(name: str) -> None:
    DATASETS.add(name)


class DataConfig(Strict):
    source: str = Field(
        "digits", description="A named dataset (digits, mnist, sms-spam, tinyshakespeare, movielens; "
        "synthetic-instructions: a letter-reversal instruction task made locally, for fine-tuning), or 'files' for "
        "your own Parquet/CSV/JSONL at data.path."
    )
    mirror: str | None = Field(
        None, description="Directory or URL mirroring named datasets; default $AIDC_DATA_MIRROR, else upstream."
    )
    path: str | None = Field(None, description="source: files: a file, directory or glob (local, s3://, gs://).")
    format: Literal["csv", "parquet", "jsonl", "wav"] | None = Field(
        None, description="source: files: the file format (wav: a folder of recordings named "
        "{label}_{speaker}_{index}.wav, task speech_classification).")
    features: list[str] = Field([], description="source: files: numeric feature columns.")
    categorical: list[str] = Field([], description="source: files: categorical feature columns (index-mapped).")
    label: str | None = Field(None, description="source: files: the integer class label column.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Deterministic train/val/test split.")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Row cleaning rules.")
    text: TextConfig = Field(default_factory=TextConfig, description="Tokenization (text workloads).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Image augmentation (training only).")
    audio: AudioConfig = Field(default_factory=AudioConfig, description="Audio format and features (speech).")
    chat: ChatDataConfig = Field(default_factory=ChatDataConfig, description="Fine-tuning data (task causal_lm).")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="Personal data in text datasets.")
    encryption: EncryptionConfig | None = Field(
        None, description="Encrypt the dataset's Parquet files at rest (Parquet modular encryption, envelope keys): "
        "e.g. {key: team-a}; the manifest records the key id, never the key.")
    version: str | None = Field(
        None, description="Dataset version to train on (a folder under datasets/<name>/); default: the latest."
    )
    cache: Literal["auto"] | bool = Field(
        "auto",
        description="Hold the transformed splits in the object store for all epochs instead of re-reading "
        "them each epoch; auto = when they are small (< cache_max_mb on disk).",
    )
    cache_max_mb: int = Field(256, ge=0, description="Largest dataset (MB of Parquet) that cache=auto holds.")

    @field_validator("source")
    @classmethod
    def _known_source(cls, name: str) -> str:
        if name != "files" and name not in DATASETS:
            known = ", ".join(sorted(DATASETS)) or "none registered: import aidc.data first"
            raise ValueError(f"unknown dataset; use a named dataset ({known}) or files (your own data at data.path)")
        return name

    @model_validator(mode="after")
    def _files_need_a_path(self) -> "DataConfig":
        if self.source == "files":
            missing = [k for k in ("path", "format") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"source: files needs path and format (missing: {missing}); e.g. path: data/*.csv, "
                                 "format: csv")
        return self


class ModelSchema(Strict):
    """The base of a workload's `model` section. Each task module declares its own schemas (aidc.tasks), with
    `arch: Literal["<name>"]`; `model.arch` picks one of the task's, its first when left out."""

    arch: str = Field(..., description="Model architecture, one the job's task takes.")


def arch_of(schema: type[ModelSchema]) -> str:
    """The `arch` name a model schema declares (its `arch: Literal[...]`)."""
    names = get_args(schema.model_fields["arch"].annotation)
    if len(names) != 1:
        raise TypeError(f"{schema.__name__}.arch must be a Literal of one name, e.g. arch: Literal['cnn']")
    return names[0]


# The workloads a job config can name: aidc.tasks registers each of its Task objects here when it is imported
# (config stays below the tasks). What config reads from a task: name, model_schemas (first = default),
# data_sources (None: every source no other task lists), private_training, check_config(cfg).
WORKLOADS: dict[str, Any] = {}


def register_workload(task: Any) -> None:
    """Make task `task.name` valid in job configs, with its model schemas and rules (called by aidc.tasks)."""
    if not task.model_schemas:
        raise TypeError(f"task {task.name!r} declares no model_schemas")
    for schema in task.model_schemas:
        arch_of(schema)
    WORKLOADS[task.name] = task


def workload(name: str) -> Any:
    if not WORKLOADS:
        raise ValueError("no workload is registered: import aidc.tasks (it registers them) before loading a job config")
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; use one of {sorted(WORKLOADS)}") from None


def model_schema(arch: str) -> type[ModelSchema]:
    """The registered schema of model architecture `arch` (e.g. to check a converted model's section)."""
    for task in WORKLOADS.values():
        for schema in task.model_schemas:
            if arch_of(schema) == arch:
                return schema
    if not WORKLOADS:
        raise ValueError("no model schema is registered: import aidc.tasks (it registers them) first")
    raise ValueError(f"unknown model.arch {arch!r}")


class TrainConfig(Strict):
    epochs: int = Field(15, ge=1, description="Passes over the training split.")
    batch_size: int = Field(32, ge=1, description="Samples per micro-step on each worker.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step (gradient accumulation).")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear LR warmup.")
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="Cosine decay floor, as a fraction of lr.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; null = off.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on GPUs that support it, fp32 on CPU; fp16 uses a grad "
        "scaler (GPU; on CPU it falls back to bf16)."
    )
    method: Literal["full", "lora"] = Field(
        "full", description="Fine-tuning (task causal_lm): full = every weight trains; lora = only LoRA adapters "
        "(PEFT; model.lora), the base stays frozen."
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: replicate the model; fsdp: shard parameters/gradients/optimizer (FSDP2)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many epochs without a better validation metric; null = off."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest decrease that counts as better.")
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="Cap optimizer steps per epoch (smoke tests, debugging); null = the whole split."
    )
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Also checkpoint every N optimizer steps (mid-epoch); epoch ends always are."
    )
    seed: int = Field(0, description="Seed of model init, dropout and data order; same seed, same run.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on storage (the best by val loss).")
    plan: Literal["enforce", "warn", "off"] = Field(
        "enforce", description="Capacity plan before workers start (aidc plan): enforce = refuse (exit 2) a job "
        "predicted not to fit the device's memory, naming the fix; warn = print it and run; off = skip."
    )
    plan_headroom: float = Field(0.1, ge=0, lt=1, description="Share of device memory the plan keeps free.")
    privacy: DPConfig | None = Field(
        None, description="Differentially private training (DP-SGD, Opacus): e.g. {epsilon: 8, delta: 1e-5, "
        "max_grad_norm: 1.0}; per-sample clipping and noise, Poisson-sampled batches, the ε spent reported per "
        "epoch and recorded with the model version. Classifiers (image, text, tabular) on DDP.")


class DPConfig(Strict):
    epsilon: float = Field(..., gt=0, description="Target ε of the whole run (DP-SGD): the noise is set so the "
                           "accountant's ε after the last epoch is this.")
    delta: float = Field(1e-5, gt=0, lt=1, description="Target δ; must be below 1/training rows.")
    max_grad_norm: float = Field(1.0, gt=0, description="Each sample's gradient is clipped to this L2 norm.")


class ResourcesConfig(Strict):
    num_workers: int | tuple[int, int] = Field(
        2, description="Ray Train workers (0 runs the loop in the driver), or [min, max] for elastic training "
        "that starts with the workers that fit and continues on fewer when a node is lost."
    )
    cpus_per_worker: float = Field(
        0.5, gt=0, description="CPUs per worker; fractions leave room for Ray Data reads on small nodes."
    )
    use_gpu: Literal["auto"] | bool = Field(
        "auto", description="Put one GPU on each worker: auto = when the cluster has GPUs."
    )
    custom: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources each worker (a num_workers: 0 Tune trial: the trial) "
        "needs, e.g. {pool_a100: 1} to keep workers on nodes started with --resources '{\"pool_a100\": 8}'."
    )
    data_task_cpus: float | None = Field(
        None, gt=0, le=1, description="CPUs each Ray Data read/transform task of training asks for (default: Ray "
        "Data's 1). A sweep sets it where its trials leave the data less than a whole CPU, which would otherwise "
        "keep the first read waiting for ever."
    )
    start_timeout_s: float | None = Field(
        None, gt=0, description="Seconds a worker group (or one-process Tune trial) may wait for its resources "
        "before that attempt fails naming what it asked for and what the cluster has free. Default: 180 (30 for an "
        "elastic run, whose next attempt is sized from what is free then), or 900 where the cluster's autoscaler "
        "can still add nodes."
    )
    elastic_resize_interval_s: float = Field(
        60.0, gt=0, description="Elastic runs ([min, max] workers): seconds between checks whether more workers fit, "
        "i.e. how soon a run grows back after a node returns (each resize restarts from the latest checkpoint)."
    )


    @field_validator("num_workers")
    @classmethod
    def _workers_valid(cls, n):
        if isinstance(n, tuple) and not (1 <= n[0] <= n[1]):
            raise ValueError(f"[min, max] needs 1 <= min <= max, e.g. [1, 4]; got {list(n)}")
        if isinstance(n, int) and n < 0:
            raise ValueError("must be >= 0 (0 runs the loop in the driver)")
        return n


TRIAL_DRIVER_CPU = 0.2  # the trial process of a multi-worker Tune trial only waits on its Train run
ELASTIC_MAX_FAILURES = 10  # default run.max_failures of an elastic run: one per node loss it rides out


class RunConfig(Strict):
    name: str | None = Field(
        None, description="Run name; reuse a name to resume that run from its latest checkpoint. Default: generated."
    )
    storage: str | None = Field(None, description="Storage root; default $AIDC_STORAGE or ~/.aidc.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default sqlite under the storage root.")
    experiment: str = Field("aidc", min_length=1, description="MLflow experiment the run is logged to.")
    max_failures: int | None = Field(
        None, ge=-1, description="Worker-group restarts from the latest checkpoint after a crash (-1: no limit). "
        f"Default: 1, or {ELASTIC_MAX_FAILURES} for elastic runs (resources.num_workers: [min, max]), where every "
        "node loss that shrinks the run counts as one failure (growing back does not)."
    )


class RegistryConfig(Strict):
    model_name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Registered model name.")
    alias: str = Field(
        "champion", min_length=1, pattern=r"^[A-Za-z0-9_-]+$", description="Alias moved to the new version."
    )

    @model_validator(mode="after")
    def _alias_not_reserved(self) -> "RegistryConfig":
        if self.alias.lower() == "latest" or self.alias.lower().startswith("v") and self.alias[1:].isdigit():
            raise ValueError(f"alias {self.alias!r} is reserved by MLflow; use e.g. 'champion' or 'staging'")
        return self


class ParamSpec(Strict):
    """One dimension of a search space: a distribution over one config field."""

    type: Literal["uniform", "loguniform", "quniform", "randint", "choice", "grid"] = Field(
        ..., description="uniform/loguniform/quniform: floats in [low, high]; randint: integers in [low, high) "
        "(high exclusive, as in Ray Tune); choice: sample one of values; grid: try every one of values."
    )
    low: float | None = Field(None, description="Lower bound (uniform, loguniform, quniform, randint).")
    high: float | None = Field(None, description="Upper bound (uniform, loguniform, quniform; randint: exclusive).")
    q: float | None = Field(None, gt=0, description="quniform: round samples to a multiple of q.")
    values: list[Any] | None = Field(None, min_length=1, description="choice/grid: the values to pick from.")

    @model_validator(mode="after")
    def _bounds_or_values(self) -> "ParamSpec":
        if self.type in ("choice", "grid"):
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError(f"{self.type} takes values: [...] (no low/high), e.g. {{type: {self.type}, "
                                 "values: [0.001, 0.003]}")
            return self
        if self.low is None or self.high is None or self.values is not None:
            raise ValueError(f"{self.type} takes low and high (no values), e.g. {{type: {self.type}, low: 1, high: 4}}")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low:g}; e.g. low: 1.0e-4")
        if self.type == "quniform" and self.q is None:
            raise ValueError("quniform needs q (the rounding step), e.g. q: 0.05")
        if self.type == "randint" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("randint needs integer low/high")
        return self


class TuneConfig(Strict):
    """A Ray Tune sweep over this job's own training (python -m jobs.tune)."""

    space: dict[str, ParamSpec] = Field(
        ..., min_length=1, description="Search space: dotted config path (train.lr, model.layers, ...) -> "
        "distribution."
    )
    search: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: sample the space (grid entries are crossed with the samples); grid: "
        "every combination of grid entries; optuna: Optuna's TPE."
    )
    scheduler: Literal["fifo", "asha", "median", "pbt"] = Field(
        "asha", description="fifo: run every trial to the end; asha/median: stop weak trials early (on the "
        "reported epoch; grid points are then tried in a seeded random order); pbt: population based training "
        "(weak trials copy strong ones and perturb)."
    )
    metric: str | None = Field(None, description="Metric to optimise; default: the task's primary validation metric.")
    mode: Literal["min", "max"] | None = Field(None, description="min or max; default: min for losses, else max.")
    num_samples: int | None = Field(
        None, ge=1, description="Trials to sample; with grid entries, repeats of the whole grid. Default: 8, or 1 "
        "(one pass over the grid) with search: grid."
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials at once; default: as many as the cluster's CPUs/GPUs fit."
    )
    cpus_per_trial: float | None = Field(
        None, gt=0, description="CPUs of a num_workers: 0 trial (the loop runs in it); default resources.cpus_per_worker."
    )
    max_failures: int = Field(1, ge=0, description="Retries of a failing trial, each from its latest checkpoint.")
    grace_period: int = Field(1, ge=1, description="asha/median: epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keep 1/reduction_factor of trials at each rung.")
    perturbation_interval: int = Field(1, ge=1, description="pbt: epochs between exploit/explore decisions.")
    seed: int | None = Field(0, description="Seed of the searcher (random/optuna); null = a different sweep each time.")
    register_alias: str = Field(
        "tuned", min_length=1, pattern=r"^[A-Za-z0-9_-]+$", description="Alias the best trial's model gets."
    )

    def trial_cpus(self, res: ResourcesConfig) -> float:
        """CPUs one trial holds: a multi-worker trial's process (TRIAL_DRIVER_CPU) and its Train workers; a
        num_workers: 0 trial runs the loop in its process: cpus_per_trial (default resources.cpus_per_worker)."""
        workers = res.num_workers if isinstance(res.num_workers, int) else res.num_workers[1]
        if workers:
            return TRIAL_DRIVER_CPU + workers * res.cpus_per_worker
        return self.cpus_per_trial or res.cpus_per_worker

    @model_validator(mode="after")
    def _search_fits_space(self) -> "TuneConfig":
        grid = [p for p, s in self.space.items() if s.type == "grid"]
        if self.search == "grid" and len(grid) != len(self.space):
            other = [p for p in self.space if p not in grid]
            raise ValueError(f"search: grid tries every combination, so every space entry must be type: grid; "
                             f"{other} are not (use search: random to sample them at each grid point)")
        if self.search == "optuna" and grid:
            raise ValueError(f"search: optuna cannot take grid entries ({grid}); use type: choice instead")
        if self.scheduler == "pbt" and self.search != "random":
            raise ValueError(f"scheduler: pbt needs search: random (it samples and perturbs the population itself), "
                             f"got search: {self.search}")
        if self.scheduler == "pbt" and grid:
            raise ValueError(f"scheduler: pbt perturbs sampled values; {grid} are grid entries: use choice or a range")
        if self.num_samples is None:
            self.num_samples = 1 if self.search == "grid" else 8
        return self


class BatchInferConfig(Strict):
    """Offline scoring with a registered model on a Ray Data actor pool (python -m jobs.batch_infer)."""

    model: str | None = Field(
        None, description="Registered model: name@alias or name/version; default registry.model_name@registry.alias."
    )
    split: Literal["train", "val", "test"] = Field("test", description="Dataset split to score when path is unset.")
    path: str | None = Field(None, description="Your own file(s) to score instead: a file, directory or glob "
                             "(local, s3://, gs://).")
    format: Literal["csv", "parquet", "jsonl", "wav"] | None = Field(
        None, description="Format of the files at path; wav: a folder of recordings (speech models), every file a "
        "row keyed by its path (a file that is not a usable wav is a rejected row with its reason).")
    key: str = Field("id", min_length=1, description="Column that identifies each row; copied next to its prediction.")
    output: str | None = Field(None, description="Output folder; default <storage>/predictions/<name>/<run id>.")
    batch_size: int = Field(256, ge=1, description="Rows per model call in each actor.")
    actors: int = Field(2, ge=1, description="Actors in the pool, each holding one copy of the model.")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs per actor; fractions leave room for the reads.")
    io_cpus: float = Field(0.25, gt=0, le=1, description="CPUs each read and write task asks for (Ray Data's default "
                           "is 1: with Serve holding most of a node's CPUs, the reads would never be scheduled).")
    use_gpu: Literal["auto"] | bool = Field("auto", description="Actors on GPUs (see gpus_per_actor): auto = when the "
                                            "cluster has GPUs.")
    gpus_per_actor: float | None = Field(None, ge=1e-4, le=1, description="GPU share of each actor when GPUs are used; "
                                         "default 1, or GPUs shared evenly where the cluster has fewer than `actors` "
                                         "(2 actors on 1 GPU: 0.5 each), so every actor of the pool can be placed.")
    max_tokens: int = Field(32, ge=1, description="Language models: tokens to generate per prompt (as the API's).")
    temperature: float = Field(1.0, ge=0, le=2, description="Language models: sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Language models: nucleus sampling mass.")
    seed: int | None = Field(0, description="Language models: sampling seed of every prompt (same row, same text).")
    stop: list[str] = Field([], max_length=4, description="Language models: strings that end a completion.")

    @model_validator(mode="after")
    def _path_needs_format(self) -> "BatchInferConfig":
        if self.path and not self.format:
            raise ValueError("path needs format: csv, parquet, jsonl or wav, e.g. path: rows.csv, format: csv")
        return self


class CompressConfig(Strict):
    """Make a smaller or faster version of a registered model (python -m jobs.compress)."""

    method: Literal["int8", "prune", "distill"] = Field(
        ..., description="int8: dynamic int8 quantization of linear layers (no training); prune: magnitude "
        "pruning to `sparsity` + a short fine-tune (train section); distill: train this config's model (the "
        "student) on the source model's soft targets."
    )
    source: str | None = Field(
        None, description="Model to compress (the teacher for distill); default registry.model_name@registry.alias."
    )
    alias: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$",
                              description="Alias of the new version; default int8 / pruned / distilled.")
    sparsity: float = Field(0.5, gt=0, lt=1, description="prune: fraction of linear/conv weights set to zero.")
    temperature: float = Field(2.0, gt=0, description="distill: softmax temperature of the soft targets.")
    alpha: float = Field(0.5, ge=0, le=1, description="distill: weight of the soft-target loss (1 - alpha: labels).")


class RobustnessConfig(Strict):
    """Accuracy under adversarial perturbations of the test inputs, computed with the Adversarial Robustness
    Toolbox when the model is registered (classifiers of continuous inputs: images)."""

    attacks: list[Literal["fgsm", "pgd"]] = Field(["fgsm", "pgd"], min_length=1, description="fgsm: one signed "
                                                  "gradient step; pgd: projected gradient descent (stronger).")
    eps: list[float] = Field([0.05, 0.1, 0.2, 0.3], min_length=1, description="Largest change per input value "
                             "(L-inf), as a fraction of the raw value range (pixels: 0.1 = a tenth of 0..255).")
    samples: int = Field(500, ge=10, description="Test rows attacked (the first of the test split).")
    pgd_steps: int = Field(20, ge=1, le=1000, description="pgd: gradient steps (each 2.5 eps / steps, Madry's).")

    @field_validator("eps")
    @classmethod
    def _eps_in_range(cls, value):
        bad = [e for e in value if not 0 < e <= 1]
        if bad:
            raise ValueError(f"eps are fractions of the value range, in (0, 1]; got {bad}")
        return value


class EvalConfig(Strict):
    robustness: RobustnessConfig | None = Field(
        None, description="Adversarial robustness section of the evaluation: e.g. {attacks: [fgsm, pgd], "
        "eps: [0.1, 0.2]}; recorded with the model version and shown by `aidc model compare`.")


class JobConfig(Strict):
    """One config tree drives every stage of a workload: preprocess, train, serve."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Workload name; names datasets.")
    task: str = Field(..., description="Workload type: a task aidc.tasks registers (image_classification, "
                      "text_classification, language_model, recommendation, tabular_classification, causal_lm: "
                      "fine-tune a pretrained causal LM).")
    data: DataConfig = Field(default_factory=DataConfig, description="Where the data comes from and how it splits.")
    model: SerializeAsAny[ModelSchema] | None = Field(
        None, description="Model architecture and size: the schema of model.arch, one of the task's (default: its "
        "first).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation settings.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Workers and devices.")
    run: RunConfig = Field(default_factory=RunConfig, description="Run name, storage and tracking.")
    registry: RegistryConfig = Field(..., description="Where the trained model is registered.")
    tune: TuneConfig | None = Field(None, description="Hyperparameter sweep settings (python -m jobs.tune).")
    batch_infer: BatchInferConfig = Field(default_factory=BatchInferConfig,
                                          description="Offline scoring settings (python -m jobs.batch_infer).")
    compress: CompressConfig | None = Field(None, description="Compression settings (python -m jobs.compress).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="More evaluation when the model is registered.")

    @model_validator(mode="after")
    def _failure_budget(self) -> "JobConfig":
        if self.run.max_failures is None:
            self.run.max_failures = ELASTIC_MAX_FAILURES if isinstance(self.resources.num_workers, tuple) else 1
        return self

    @field_validator("task", mode="before")
    @classmethod
    def _registered_task(cls, name: Any) -> str:
        workload(name if isinstance(name, str) else repr(name))  # the error lists the registered tasks
        return name

    @field_validator("model", mode="before")
    @classmethod
    def _task_model(cls, raw: Any, info: ValidationInfo) -> Any:
        """The model section, validated by the schema its task declares for model.arch."""
        task = WORKLOADS.get(info.data.get("task"))
        if task is None:
            return None  # the task's own error says what is wrong
        if isinstance(raw, BaseModel):
            raw = raw.model_dump()
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ValueError("the model section is a mapping, e.g. model: {arch: cnn}")
        schemas = {arch_of(s): s for s in task.model_schemas}
        arch = raw.get("arch", next(iter(schemas)))
        if arch not in schemas:
            raise ValueError(f"model.arch {str(arch)!r} does not fit task {task.name!r}; use one of {list(schemas)}")
        return schemas[arch].model_validate({**raw, "arch": arch})

    @model_validator(mode="after")
    def _source_fits_task(self) -> "JobConfig":
        d, task = self.data, WORKLOADS[self.task]
        sources = task.data_sources
        if sources and d.source not in sources:
            raise ValueError(f"data.source {d.source!r} does not fit task {self.task!r}; use one of {list(sources)}")
        takers = [t.name for t in WORKLOADS.values() if t.data_sources and d.source in t.data_sources]
        if not sources and takers and d.source != "files":  # a dataset a task lists is that task's data
            raise ValueError(f"data.source {d.source} is data for task: {' or '.join(takers)}; use it with that task")
        self._private_training_fits()
        if self.train.method == "lora" and "lora" not in type(self.model).model_fields:
            takers = [f"task: {t.name}, model.arch: {arch_of(s)}" for t in WORKLOADS.values()
                      for s in t.model_schemas if "lora" in s.model_fields]
            raise ValueError(f"train.method: lora fine-tunes a pretrained causal LM ({'; '.join(takers)})")
        task.check_config(self)
        return self

    def _private_training_fits(self) -> None:
        """What DP-SGD cannot do here, refused before anything runs, each with its fix."""
        tc = self.train
        if tc.privacy is None:
            return
        if not WORKLOADS[self.task].private_training:
            takers = ", ".join(t.name for t in WORKLOADS.values() if t.private_training)
            refuse_private(f"trains the tasks that support it ({takers}), not task {self.task!r}")
        if tc.parallelism != "ddp":
            refuse_private("runs on DDP: set train.parallelism: ddp")
        if tc.grad_accum_steps != 1:
            refuse_private("takes one Poisson-sampled batch per step: set train.grad_accum_steps: 1 (raise "
                           "batch_size)")
        if tc.precision in ("bf16", "fp16"):
            refuse_private("trains in fp32 (per-sample gradients and noise in reduced precision are not "
                           "accounted): set train.precision: fp32 or auto")
        if isinstance(self.resources.num_workers, tuple):
            refuse_private("needs a fixed worker count (the sample rate depends on it): set "
                           "resources.num_workers to one number")
        if self.data.augment.enabled:
            refuse_private("samples from the split held in memory, augmented once: set data.augment.enabled: false")


def refuse_private(what: str) -> None:
    """A job that train.privacy cannot train: the error names what and the fix (also for tasks' own rules)."""
    raise ValueError(f"train.privacy (DP-SGD) {what}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so numbers and lists keep their type)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override {text!r}: write it as --set section.field=value, e.g. --set train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} problem{'s' if err.error_count() > 1 else ''})"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # a rule across sections: its message names the fields (the input is the whole file)
            lines.append(f"  {msg}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown field; remove it or check its spelling")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required field is missing")
        else:
            lines.append(f"  {loc}: got {e.get('input')!r}: {msg}")
    lines.append("Fix the file, or override a field with --set section.field=value.")
    return "\n".join(lines)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing file, e.g. --config jobs/configs/digits.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def validate(raw: dict, model: type[BaseModel] = JobConfig, source: str = "config") -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None, model: type[BaseModel] = JobConfig) -> Any:
    """Load a YAML job config, apply `--set` overrides and validate it."""
    raw = apply_overrides(load_yaml(path), overrides or [])
    source = str(path) + (f" (with --set {' --set '.join(overrides)})" if overrides else "")
    return validate(raw, model, source)


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
