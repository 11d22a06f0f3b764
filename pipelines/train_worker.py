"""The Ray Train worker of the train stage, written as a torchtune recipe: set up, train, clean up.

:func:`train_fn_per_worker` is what ``TorchTrainer`` runs on every rank. It builds a :class:`LoRIRecipe`:

    setup     restore from the last checkpoint (:class:`TrainCheckpoint`), load the base, get the run's rows
    train     for each group of adapters the run trains (today one cluster per group, one group after
              another; a group is a :class:`tclora.train.LoRIAdapters`, so several clusters can share one
              forward/backward pass): the LoRI phase sequence (:func:`tclora.train.run_lori_phases`), each
              phase one DeepSpeed engine and one step loop (:func:`tclora.train.train_loop`); then save
    cleanup   drop the temporary adapter directory (every adapter is in the last checkpoint)

It is plain DeepSpeed training plus a few Ray touchpoints, each marked "Ray:". With one worker, the
clusters of at most ``train.max_rows_in_memory`` rows come as one object (no Ray Data split) and are
replayed from memory, reshuffled per epoch by a seed of the cluster; a larger cluster, or any cluster of a
run over several workers, streams from its own Ray Dataset shard (``cluster-<id>``). The path depends on the
cluster alone: an adapter sees the same batches whether its cluster trains alone, packed or fused.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint

from tclora import artifacts, data, lori, multi_lori
from tclora.config import Config
from tclora.train import SoloLoRI, adapter_meta, causal_lm_loss, lori_phases, run_lori_phases, train_loop

log = logging.getLogger(__name__)

READ_BATCH = 256  # rows per Ray Data batch; tokenised and regrouped into train batches in the worker


def lori_seed(cfg: Config, cluster_id: int) -> int:
    """Seed of a cluster's frozen random A: one per cluster, or the run seed for all with ``lori.shared_a``."""
    return cfg.run.seed if cfg.lori.shared_a else cfg.run.seed + cluster_id


# ---- the checkpoint: one object owns the layout --------------------------------------------------
@dataclass
class TrainState:
    """Where a run is: adapters done (``position``), phase and step of the current one, its losses so
    far per phase, the resumes it went through and its seconds of training."""

    position: int = 0
    phase: int = 0
    step: int = 0
    losses: dict[str, list[float]] = field(default_factory=dict)
    resumes: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def next_adapter(self, done: int = 1) -> None:
        """``done`` adapters finished (a fused group's size): the next ones start afresh."""
        self.position, self.phase, self.step, self.losses, self.seconds = self.position + done, 0, 0, {}, 0.0


class TrainCheckpoint:
    """Save and restore one rank's part of the run's Ray Train checkpoints. Every checkpoint holds::

        state.json              TrainState (rank 0)
        lori_mask.safetensors   the current adapter's LoRI masks, from the end of LoRI-D on (rank 0)
        ds/engine/              DeepSpeed's engine checkpoint: B, AdamW moments, per-rank ZeRO partitions
                                (every rank writes its share; Ray merges the ranks' directories); frozen
                                base weights excluded. Resuming is bit-exact for ZeRO 0-2.
        adapters/cluster-<id>/  every adapter the run finished so far (PEFT files, mask, lori.json; rank 0),
                                so the last checkpoint holds all of them and the driver reads them there
    """

    STATE = "state.json"
    DS_DIR, DS_TAG = "ds", "engine"
    ADAPTERS = "adapters"

    def __init__(self, rank: int):
        self.rank = rank
        self.finished = Path(tempfile.mkdtemp(prefix="tclora-adapters-"))  # this run's adapters so far
        self._restored: Path | None = None  # holds the engine state until the first engine loads it

    @classmethod
    def adapter(cls, checkpoint_dir: str | Path, cluster_id: int) -> Path:
        """A finished adapter inside a checkpoint directory (for the driver)."""
        return Path(checkpoint_dir) / cls.ADAPTERS / f"cluster-{cluster_id}"

    def restore(self) -> tuple[TrainState, Any]:
        """The state and masks of the run's last checkpoint (Ray: set after a worker failure or a driver
        restart), finished adapters back in :attr:`finished`; a fresh state when there is none."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return TrainState(), None
        self._restored = Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="tclora-restore-")))
        state = TrainState(**json.loads((self._restored / self.STATE).read_text()))
        masks = lori.load_masks(self._restored) if (self._restored / lori.MASK_FILE).is_file() else None
        if (self._restored / self.ADAPTERS).is_dir():
            artifacts.link_tree(self._restored / self.ADAPTERS, self.finished)
        state.resumes.append({"position": state.position, "phase": state.phase, "step": state.step})
        return state, masks

    def load_engine(self, engine, state: TrainState) -> None:
        """Load the restored DeepSpeed state into the first engine after a restore (once; a resume at a
        phase's first step has none to load).

        Raises:
            RuntimeError: the checkpoint lacks the engine state the resume needs.
        """
        if self._restored is None:
            return
        if state.step > 0:
            loaded = engine.load_checkpoint(str(self._restored / self.DS_DIR), tag=self.DS_TAG,
                                            load_module_strict=False)[0]
            if loaded is None:
                raise RuntimeError(f"no DeepSpeed state in checkpoint {self._restored}")
        shutil.rmtree(self._restored, ignore_errors=True)
        self._restored = None

    def save(self, metrics: dict, state: TrainState, engine=None, masks=None) -> None:
        """Ray: report ``metrics`` with a checkpoint of this rank's share (layout in the class docstring)."""
        with tempfile.TemporaryDirectory() as tmp:
            if engine is not None:
                engine.save_checkpoint(os.path.join(tmp, self.DS_DIR), tag=self.DS_TAG, exclude_frozen_parameters=True)
            if self.rank == 0:
                artifacts.atomic_write_json(Path(tmp) / self.STATE, asdict(state))
                if masks is not None:
                    lori.save_masks(masks, tmp)
                if any(self.finished.iterdir()):
                    artifacts.link_tree(self.finished, Path(tmp) / self.ADAPTERS)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    def hand_back(self) -> None:
        """A run that had finished before a driver restart: report its last checkpoint again as is."""
        checkpoint = Checkpoint.from_directory(str(self._restored)) if self.rank == 0 else None
        ray.train.report({"finished": True}, checkpoint=checkpoint)

    def cleanup(self) -> None:
        for tmp in (self._restored, self.finished):
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


# ---- data: tokenised examples of this rank's shard, in fixed-size batches -------------------------
def _replay(cache: list, seed: int, first_epoch: int = 0):
    """Endless epochs over examples held in memory, reshuffled per epoch."""
    for epoch in itertools.count(first_epoch):
        order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        yield from (cache[i] for i in order)


def _examples(shard, tokenizer, cfg: Config, seed: int, stats: dict):
    """Endless tokenised examples from this worker's shard, epoch after epoch: a run split across
    workers, or too big to read up front (else :func:`_by_cluster` and :func:`_replay`).

    The first epoch streams through Ray Data. A shard of at most ``train.max_rows_in_memory`` rows is then replayed
    from memory, reshuffled per epoch: a Ray Data epoch costs a fixed 0.2-30 s on 2 cores (split
    coordination, task processes; more under load), more than a small cluster's training steps.
    Larger shards stream again every epoch.
    """
    cache: list | None = []
    for epoch in itertools.count():
        if epoch and cache is not None:
            yield from _replay(cache, seed, first_epoch=epoch)  # endless
        rows = 0
        # Ray: each iter_batches call is one epoch over this worker's share of the cluster.
        for chunk in shard.iter_batches(batch_size=READ_BATCH, batch_format="numpy",
                                        local_shuffle_buffer_size=4 * READ_BATCH, local_shuffle_seed=seed + epoch):
            for source, target in zip(chunk["source"], chunk["target"]):
                example = data.tokenize_example(tokenizer, str(source), str(target), cfg.model.max_length)
                rows += 1
                if cache is not None:
                    cache.append(example)
                    too_big = len(cache) > cfg.train.max_rows_in_memory
                    cache = None if too_big else cache  # too big to hold: stream each epoch
                yield example
        if rows == 0:
            raise RuntimeError("this worker's data shard is empty (more workers than rows?)")
        stats["shard_rows"] = rows


def _by_cluster(chunks, tokenizer, cfg: Config) -> dict[int, list]:
    """Tokenised examples per ``cluster_id`` from ``chunks`` (column dicts of the run's table of clusters of at
    most ``train.max_rows_in_memory`` rows each, ``train._trainer``)."""
    buckets: dict[int, list] = {}
    for chunk in chunks:
        for cluster_id, source, target in zip(chunk["cluster_id"], chunk["source"], chunk["target"]):
            example = data.tokenize_example(tokenizer, str(source), str(target), cfg.model.max_length)
            buckets.setdefault(int(cluster_id), []).append(example)
    return buckets


def _batches(examples, batch_size: int, pad_id: int):
    """Fixed-size batches across epoch boundaries: a shard smaller than a batch still trains."""
    while True:
        yield data.collate([next(examples) for _ in range(batch_size)], pad_id)


def _clip_norms(cfg: Config) -> tuple[float, float]:
    """``train.max_grad_norm`` as (DeepSpeed's ``gradient_clipping``, ``train_loop``'s ``max_grad_norm``).

    Under ZeRO-1/2 DeepSpeed clips (its global norm is the one adapter's: a fused group needs ZeRO-0);
    under ZeRO-0 ``train_loop`` clips each adapter on its own, so DeepSpeed's own (default 1.0, on the
    *group's* norm, which would couple fused adapters) is switched off.
    """
    norm = cfg.train.max_grad_norm
    return (norm, 0.0) if cfg.train.zero_stage else (0.0, norm)


def _make_engine(deepspeed, model, cfg: Config, lr: float, use_gpu: bool):
    """A fresh DeepSpeed engine + AdamW over the trainable B's (one per LoRI phase)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=cfg.train.weight_decay)
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": _clip_norms(cfg)[0],
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: ZeRO-1/2 partition its state fine
        "bf16": {"enabled": use_gpu and cfg.model.dtype == "bfloat16"},
        "steps_per_print": 1 << 30,  # DeepSpeed's step logging would drown Tune's progress table
    }
    # Ray Train already initialised torch.distributed (gloo on CPU, NCCL on GPU); DeepSpeed wraps it.
    return deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)[0]


# ---- the recipe ------------------------------------------------------------------------------------
class LoRIRecipe:
    """One rank of one Train run over ``cluster_ids`` (see the module docstring)."""

    def __init__(self, cfg: Config, cluster_ids: list[int], table=None):
        self.cfg, self.cluster_ids = cfg, cluster_ids
        self.table = table  # ObjectRef of the rows of the clusters held in memory (train._trainer), or None
        self.use_gpu = cfg.train.gpus_per_worker > 0
        context = ray.train.get_context()  # Ray: this rank's place in the run
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.phases = lori_phases(cfg.train, cfg.lori)
        self.checkpoint = TrainCheckpoint(self.rank)
        self.state, self.masks = TrainState(), None
        self._since = time.time()  # start of the training time not yet added to state.seconds

    def setup(self) -> bool:
        """Restore, load the base and the rows (one object, or a Ray Data shard); False when the run had already
        finished (nothing to train)."""
        self.state, self.masks = self.checkpoint.restore()
        if self.state.resumes:
            log.info("clusters %s rank %d: resuming at %s", self.cluster_ids, self.rank, self.state.resumes[-1])
        if self.state.position >= len(self.cluster_ids):
            self.checkpoint.hand_back()
            return False
        os.environ["DS_ACCELERATOR"] = "cuda" if self.use_gpu else "cpu"  # read when deepspeed is imported
        import deepspeed

        from tclora.models import load_base_for, set_gradient_checkpointing

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.deepspeed = deepspeed
        self.base, self.tokenizer = load_base_for(self.cfg.model)
        if self.cfg.train.gradient_checkpointing:  # stays on when adapters are attached and removed
            set_gradient_checkpointing(self.base, True)
        if self.use_gpu:
            torch.cuda.set_device(ray.train.torch.get_device())
        # Clusters one worker holds whole: the same replay alone, packed or fused (others stream: _examples).
        self.in_memory: dict[int, list] = {}
        if self.table is not None:  # Ray: those clusters' rows, one object from the trial (train._trainer)
            chunks = (b.to_pydict() for b in ray.get(self.table).to_batches(max_chunksize=READ_BATCH))
            self.in_memory = _by_cluster(chunks, self.tokenizer, self.cfg)
        return True

    def train(self) -> None:
        """The run's adapters from the restored position: all in one fused group (``train.fused``: one
        forward/backward pass per step for all, :mod:`tclora.multi_lori`), or one after another."""
        todo = self.cluster_ids[self.state.position:]
        fused = self.cfg.train.fused and self.cfg.lori.mode != "lora"  # plain LoRA trains A: one at a time
        for group in [todo] if fused else [[c] for c in todo]:
            self.train_adapters(group)

    def train_adapters(self, group: list[int]) -> None:
        """Attach the group's adapters, run the LoRI phases over them, save them (rank 0), report."""
        seeds = [lori_seed(self.cfg, c) for c in group]
        torch.manual_seed(seeds[0] + self.rank)
        if len(group) == 1:
            model = lori.attach_lori(self.base, self.cfg.lori, seeds[0], self.cfg.model.name_or_path)
            self.adapters, self.loss_fn = SoloLoRI(model), causal_lm_loss
        else:  # each row through its own cluster's factors; each adapter's loss is the mean over its rows
            self.adapters = multi_lori.LoRIGroup(self.base, self.cfg.lori, seeds)
            model = self.adapters.model
            self.loss_fn = multi_lori.routed_loss(self.adapters, self.cfg.train.disentangle,
                                                   self.cfg.train.merge_aware, self.cfg.train.merge_aware_dropout,
                                                   self.cfg.train.merge_aware_updates)
        if self.use_gpu:
            model.to(ray.train.torch.get_device())
        self.stats: dict[int, dict] = {c: {} for c in group}
        pad = self.tokenizer.pad_token_id
        # Each adapter draws the batches it would draw alone; a fused step concatenates them.
        streams = [_batches(self._examples(c, s), self.cfg.train.batch_size, pad) for c, s in zip(group, seeds)]
        self.stream = streams[0] if len(group) == 1 else (multi_lori.concat_batches(b, pad) for b in zip(*streams))
        self.group = group
        self.masks = run_lori_phases(self.adapters, self.phases, self.cfg.lori, self.run_phase,
                                     start=self.state.phase, masks=self.masks, on_phase_end=self.phase_end)
        self._lap()
        if self.rank == 0:  # B is replicated on every rank under ZeRO 0-2: rank 0 saves it whole
            for t, (cluster_id, seed) in enumerate(zip(group, seeds)):
                out = self.checkpoint.finished / f"cluster-{cluster_id}"
                if len(group) == 1:
                    lori.save_lori_adapter(model, out, self.masks,
                                           self._meta(t, seed, self.masks, lori.lora_a_shapes(model)))
                else:  # the same PEFT layout, through the same save path
                    masks = multi_lori.adapter_masks(self.masks, t) if self.masks is not None else None
                    meta = self._meta(t, seed, masks, self.adapters.a_shapes())
                    self.adapters.save_adapter(t, out, masks, meta, self.cfg.model.name_or_path)
        self.state.next_adapter(len(group))
        self.masks = None
        self.report(self.phases[-1].steps, done=True)
        # The base without LoRI layers (B never touched its weights).
        self.base = model.unload() if len(group) == 1 else self.adapters.detach()

    def _examples(self, cluster_id: int, seed: int):
        example_seed = seed * 1000 + 100 * len(self.state.resumes) + self.rank
        if cluster_id not in self.in_memory:
            shard = ray.train.get_dataset_shard(f"cluster-{cluster_id}")  # Ray: this rank's share of the cluster
            return _examples(shard, self.tokenizer, self.cfg, example_seed, self.stats[cluster_id])
        self.stats[cluster_id]["shard_rows"] = len(self.in_memory[cluster_id])
        return _replay(self.in_memory[cluster_id], example_seed)

    def run_phase(self, index: int, phase, masked) -> None:
        """One phase: a fresh engine (resumed once after a restore), the step loop from ``state.step``."""
        self.engine = _make_engine(self.deepspeed, self.adapters.model, self.cfg, phase.lr, self.use_gpu)
        self.checkpoint.load_engine(self.engine, self.state)
        self.phase_index = index
        self.history = self.state.losses[phase.name] = self.state.losses.get(phase.name, [])[: self.state.step]
        train_loop(self.engine, self.stream, phase.steps, masked=masked, start_step=self.state.step,
                   on_step=self.on_step, desc=f"clusters {self.group} LoRI {phase.name}", loss_fn=self.loss_fn,
                   max_grad_norm=_clip_norms(self.cfg)[1],
                   n_adapters=len(self.group))
        self.engine.destroy()  # drops ZeRO's grad hooks: the next phase's engine installs its own
        self.engine = None

    def on_step(self, step: int, loss: float) -> None:
        """Record the loss; every ``train.checkpoint_every`` steps (not at a phase's end), checkpoint."""
        self.history.append(loss)
        phase = self.phases[self.phase_index]
        if (step + 1) % self.cfg.train.checkpoint_every == 0 and step + 1 < phase.steps:
            self.state.phase, self.state.step = self.phase_index, step + 1
            self.report(step + 1, self.engine)

    def phase_end(self, index: int, masks) -> None:
        """Between phases: a checkpoint that resumes at the next phase's start (with its masks)."""
        if index + 1 == len(self.phases):
            return
        self.masks = masks
        self.state.phase, self.state.step = index + 1, 0
        if self.phases[index].steps >= self.cfg.train.checkpoint_every:  # a shorter phase is cheaper to redo
            self.report(self.phases[index].steps)

    def report(self, step: int, engine=None, done: bool = False) -> None:
        self._lap()
        window = [x if isinstance(x, list) else [x] for x in self.history[-10:]]  # steps x adapters (fused: T)
        per_adapter = [sum(col) / len(col) for col in zip(*window)] if window else []
        metrics = {"cluster_id": self.group[-1], "phase": self.phases[self.phase_index].name, "step": step,
                   "finished": done and self.state.position == len(self.cluster_ids),
                   "clusters_done": self.state.position, "resumes": len(self.state.resumes),
                   "loss": sum(per_adapter) / len(per_adapter) if per_adapter else float("nan"),
                   # each adapter's own (MLflow, Tune): mean of its last 10 steps in this phase
                   **{f"loss/cluster-{c}": v for c, v in zip(self.group, per_adapter)}}
        self.checkpoint.save(metrics, self.state, engine, self.masks)

    def _lap(self) -> None:
        now = time.time()
        self.state.seconds += now - self._since
        self._since = now

    def _meta(self, t: int, seed: int, masks, a_shapes) -> dict:
        """``lori.json`` of the group's adapter ``t`` (a fused group records one loss per adapter per step)."""
        s, cluster_id = self.state, self.group[t]
        fused = len(self.group) > 1
        losses = {name: [step[t] for step in values] for name, values in s.losses.items()} if fused else s.losses
        steps = {p.name: p.steps for p in self.phases}
        meta = adapter_meta(self.cfg.lori, seed, losses, s.seconds, masks=masks, a_shapes=a_shapes,
                            cluster_id=cluster_id, shared_a=self.cfg.lori.shared_a, world_size=self.world,
                            zero_stage=self.cfg.train.zero_stage, steps=steps, resumes=s.resumes,
                            shard_rows=self.stats[cluster_id].get("shard_rows"), fused=len(self.group),
                            **self.cfg.train.fused_losses(len(self.group)))
        meta["losses"] = losses  # not a keyword: adapter_meta's third argument already has that name
        return meta

    def cleanup(self) -> None:
        self.checkpoint.cleanup()


def train_fn_per_worker(config: dict) -> None:
    """Ray Train's worker function: ``config`` is ``{"cfg": Config as JSON, "cluster_ids": [int, ...]}``, plus
    ``"table"`` (an ObjectRef of the run's rows) when one worker holds them (``pipelines.train._trainer``)."""
    recipe = LoRIRecipe(Config.model_validate(config["cfg"]), [int(c) for c in config["cluster_ids"]],
                        table=config.get("table"))
    try:
        if recipe.setup():
            recipe.train()
    finally:
        recipe.cleanup()
