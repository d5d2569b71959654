"""``hataori pretrain``: train a model from a preset on one process or N processes of one machine.

    hataori pretrain CONFIG.yaml [CONFIG.yaml ...] [key=value ...] [--data DATASET[:WEIGHT] ...]
        [--run-dir DIR] [--nproc N]

    hataori pretrain configs/train/toy.yaml --data data/shards/debian-ja --run-dir runs/toy --nproc 2

Presets (``configs/train/``) and overrides build a :class:`~hataori.train.config.TrainConfig`;
``--data`` (repeatable; replaces ``data.datasets``) and ``--run-dir`` are overrides of
``data.datasets`` and ``run_dir`` that need no YAML quoting.

Processes. Without ``--nproc`` (or with 1) the command trains in its own process. With
``--nproc N`` it checks the config, the datasets and the batch arithmetic for N processes, then
replaces itself with torch's elastic launcher::

    python -m torch.distributed.run --standalone --nproc-per-node N -m hataori.cli pretrain ARGS...

which starts N copies of the command on this machine with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set (and ``OMP_NUM_THREADS=1`` unless set).
A process that finds those variables (or Slurm's) joins the group as its rank instead of
launching: so ``torchrun ... -m hataori.cli pretrain ...`` and ``srun`` work too. Each process
uses the GPU of its local rank with NCCL, or the CPU with gloo. If a process dies, the launcher
stops the others and exits with an error; the next launch resumes from the latest complete
checkpoint, losing only the steps after it.

A run (``run_dir``) holds ``config.yaml``, ``environment.json``, ``provenance.json`` and
``deepspeed.json`` (written before step 0), ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/``.
Launched again with the same folder, it resumes from its latest complete checkpoint, loader position
included.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from hataori.checkpoint.checkpointer import Checkpointer, broadcast, seed_all
from hataori.checkpoint.layout import CHECKPOINTS, METRICS_FILE, complete_steps, tag
from hataori.checkpoint.lock import LAUNCHER_PID_VAR, claim, die_with_launcher
from hataori.checkpoint.manifest import LORA_BASE, CheckpointDamaged, check_identity, read_manifest, remove_incomplete
from hataori.checkpoint.record import record_provenance, record_run
from hataori.config import command_items
from hataori.data.chat import dataset_template
from hataori.data.loader import datasets_kind
from hataori.data.shards import Dataset
from hataori.errors import ConfigError, HataoriError, InputError
from hataori.fsutil import atomic_write_text, disk_full_error
from hataori.interop.load import SHAPE_FIELDS, load_initial_weights, open_source
from hataori.model.lora import apply_lora
from hataori.model.memory import states_shortfall
from hataori.model.model import Transformer
from hataori.sourcespec import parse_source
from hataori.tokenizer.chat import TEMPLATE_FILE
from hataori.tokenizer.model import Tokenizer
from hataori.train.callbacks import Announce, Logging, Validation
from hataori.train.config import TrainConfig, load_train_config
from hataori.train.metrics import MetricsLogger, peak_flops
from hataori.train.preference import PreferenceObjective, compute_reference, ensure_reference, reference_key
from hataori.train.signals import stop_on_signals
from hataori.train.trainer import Trainer
from hataori.train.validate import EvalTasks, Validator
from hataori.train.zero import init_distributed, rank_device, ranks_from_env, shutdown_distributed

LAUNCHER_VARS = ("WORLD_SIZE", "SLURM_NTASKS")
"""Set by a launcher: the process is one rank of a group and must not launch others."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="+", metavar="CONFIG|key=value",
                        help="YAML presets (applied in order), then overrides such as trainer.max_steps=100")
    parser.add_argument("--data", action="append", default=[], metavar="DATASET[:WEIGHT]",
                        help="a dataset folder from `hataori data prepare` (repeatable); replaces data.datasets")
    parser.add_argument("--run-dir", help="the run folder (run_dir); an existing run resumes")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes on this machine (one per GPU, or CPU processes); >1 relaunches "
                             "through torch.distributed.run")


def main(args: argparse.Namespace) -> int:
    files, overrides = command_items(args.config, {
        "--data": ("data.datasets", [parse_source(item) for item in args.data] if args.data else None),
        "--run-dir": ("run_dir", args.run_dir)})
    cfg = load_train_config(files, overrides)
    if args.nproc < 1:
        raise ConfigError("--nproc", f"must be at least 1, got {args.nproc}")
    if any(name in os.environ for name in LAUNCHER_VARS) or args.nproc == 1:
        return pretrain(cfg)
    cfg.zero.check_device(rank_device())  # before the run folder is taken and any rank starts
    check_memory(cfg, world_size=args.nproc, local_ranks=args.nproc)
    lock = take_run_folder(cfg)  # held on by the launcher this process becomes, and inherited by its ranks
    try:
        check(cfg, world_size=args.nproc)
    except BaseException:
        lock.release()
        raise
    relaunch(args.nproc, files + overrides)
    return 0  # not reached: relaunch replaces this process


def check(cfg: TrainConfig, *, world_size: int) -> None:
    """Fail early, in one process, on what would otherwise fail in every rank: the batch arithmetic
    for ``world_size`` processes, the datasets, the tokenizer, the initial weights' source, and a
    latest checkpoint made by a run of another shape or tokenizer."""
    import torch

    cfg.zero.grad_accum_steps(seq_len=cfg.data.seq_len, world_size=world_size)
    gpus = torch.cuda.device_count()
    if gpus and world_size > gpus:
        raise ConfigError("--nproc", f"{world_size} processes, but this machine has {gpus} GPU(s) and each process "
                          f"takes one; use --nproc {gpus} or fewer")
    tokenizer = open_tokenizer(cfg)
    init = open_source(cfg.init, cfg.model, tokenizer)
    check_lora(cfg, init)
    folder = Path(cfg.run_dir) / CHECKPOINTS
    if cfg.checkpoint.resume and (steps := complete_steps(folder)):
        latest = folder / tag(steps[-1])
        try:
            manifest = read_manifest(latest)
        except CheckpointDamaged:
            return  # the ranks verify it, set it aside and fall back
        check_identity(latest, manifest, run_identity(cfg, tokenizer, base=lora_base(cfg, init)))


def check_lora(cfg: TrainConfig, init) -> None:
    """A LoRA run adapts a model it is given, and its adapters must find the layers they name."""
    if cfg.lora is None:
        return
    if init is None:
        raise ConfigError("lora", "adapts a trained model, but no init source is set; pass init.from_hf=DIR "
                          "(a transformers model folder) or init.from_run=RUN (a hataori run)")
    import torch

    with torch.device("meta"):  # the patterns are checked against the module names, no memory allocated
        try:
            apply_lora(Transformer(cfg.model), cfg.lora)
        except ConfigError as err:
            raise ConfigError(f"lora.{err.key}", err.message) from None


def check_memory(cfg: TrainConfig, *, world_size: int | None = None, local_ranks: int | None = None) -> None:
    """Refuse a run whose model states (weights, gradients, optimizer states: :mod:`hataori.plan.planner`) cannot
    fit in this process's device, or in the host's available memory, before the run folder is touched or
    anything allocated. ``world_size`` and ``local_ranks`` (the processes on this host): from the launcher's
    environment unless given."""
    import torch

    _, env_world, local_rank = ranks_from_env()
    world_size = world_size or env_world
    local_ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE")
                                     or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    device = rank_device(local_rank)
    device_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    why = states_shortfall(cfg, world_size=world_size, local_ranks=local_ranks, device_type=device.type,
                           device_bytes=device_bytes, host_bytes=available_host_memory())
    if why is not None:
        key = "lora.rank" if cfg.lora is not None else "zero.stage"
        raise ConfigError(key, f"{why}; {'lower lora.rank, ' if cfg.lora is not None else ''}raise zero.stage, "
                          "offload (zero.offload_optimizer=cpu) or use more processes: `hataori plan` with this "
                          "config shows what fits")


def available_host_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def lora_base(cfg: TrainConfig, init) -> str | None:
    """The fingerprint of a LoRA run's frozen base (:meth:`hataori.interop.load.InitWeights.fingerprint`)."""
    return init.fingerprint() if cfg.lora is not None else None


def relaunch(nproc: int, config_args: list[str]) -> None:
    """Replace this process with torch's elastic launcher running ``nproc`` copies of the command."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "hataori.cli", "pretrain", *config_args]

    print(f"launching {nproc} processes: {' '.join(command[1:])}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[LAUNCHER_PID_VAR] = str(os.getpid())  # the ranks die with this process (checkpoint/lock.py)
    os.execv(sys.executable, command)


def open_tokenizer(cfg: TrainConfig):
    """The run's tokenizer (the config's, or the first dataset's), checked against every dataset and
    against model.vocab_size."""
    datasets = [Dataset(spec.path, "train") for spec in cfg.data.datasets]
    kind = datasets_kind(datasets)
    reads = {"pretrain": "text", "sft": "conversations", "dpo": "preference"}[cfg.objective]
    if kind != reads:
        got = {"conversations": "conversations (prepared with a chat template)", "text": "text",
               "preference": "preference pairs"}[kind]
        how = {"conversations": "train on them with `hataori sft` (objective=sft)",
               "text": "the chat objectives read datasets from `hataori data prepare --chat-template`",
               "preference": "train on them with `hataori dpo` (objective=dpo)"}[kind]
        raise ConfigError("data.datasets", f"{datasets[0].path} holds {got}, which objective={cfg.objective} does "
                          f"not read; {how}")
    path = cfg.tokenizer or datasets[0].manifest["tokenizer"]["path"]
    if not cfg.tokenizer and not Path(path).exists():
        raise InputError(path, f"the tokenizer recorded in {datasets[0].path}/dataset.json is missing; "
                         "pass tokenizer=PATH (the tokenizer the dataset was prepared with)")
    tokenizer = Tokenizer(path)
    for data in datasets:
        if data.tokenizer_fingerprint != tokenizer.fingerprint:
            raise ConfigError("tokenizer", f"{path} has fingerprint {tokenizer.fingerprint}, but {data.path} was "
                              f"encoded with {data.tokenizer_fingerprint}; use the tokenizer the dataset was "
                              "prepared with")
    if cfg.model.vocab_size != tokenizer.vocab_size:
        raise ConfigError("model.vocab_size", f"is {cfg.model.vocab_size}, but the tokenizer {path} has "
                          f"{tokenizer.vocab_size} pieces; set model.vocab_size={tokenizer.vocab_size}")
    return tokenizer


def take_run_folder(cfg: TrainConfig):
    """Lock the run folder (:mod:`hataori.checkpoint.lock`), then, before anything else is written, remove
    what interrupted saves left: on a full disk they may hold the space the run needs."""
    lock = claim(cfg.run_dir)
    try:
        remove_incomplete(Path(cfg.run_dir) / CHECKPOINTS)
        lock.record()
        if not lock.recorded:
            raise HataoriError(f"{lock.path}: the disk is full, even after removing interrupted checkpoint saves; "
                               "free space and launch again")
    except BaseException:
        lock.release()
        raise
    return lock


def pretrain(cfg: TrainConfig) -> int:
    """Take the run folder (rank 0) and train; the same on every rank. A precision this process's device
    cannot run, and model states it cannot hold, are refused first, before the run folder is touched."""
    cfg.zero.check_device(rank_device(ranks_from_env()[2]))
    check_memory(cfg)
    die_with_launcher()
    if ranks_from_env()[0] != 0:
        return train(cfg)
    lock = take_run_folder(cfg)
    try:
        return train(cfg)
    finally:
        lock.release()


def train(cfg: TrainConfig) -> int:
    """Build every part from ``cfg`` and train; the same on every rank."""
    import torch

    # DeepSpeed's ZeRO-3 calls torch.distributed's *_tensor collectives, which torch 2.13 deprecates
    # in a warning per call: hundreds of lines per run that say nothing about it.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    tokenizer = open_tokenizer(cfg)
    init = open_source(cfg.init, cfg.model, tokenizer)
    check_lora(cfg, init)
    env = init_distributed()
    base = broadcast(lora_base(cfg, init) if env.is_main else None)  # rank 0 reads the base's every byte
    cfg.zero.grad_accum_steps(seq_len=cfg.data.seq_len, world_size=env.world_size)
    run_dir = Path(cfg.run_dir)
    if env.is_main:
        with disk_full_error(run_dir, option="run_dir"):
            record_run(run_dir, cfg, world_size=env.world_size)
            if cfg.objective in ("sft", "dpo"):
                record_template(run_dir, cfg)
            record_provenance(run_dir, tokenizer=tokenizer, datasets=cfg.data.datasets,
                              init=None if init is None else init.describe())
    seed_all(cfg.seed)

    model = cfg.zero.build_model(cfg.model, env.device, seq_len=cfg.data.seq_len, grad_clip=cfg.optim.grad_clip)
    resuming = cfg.checkpoint.resume and bool(complete_steps(run_dir / CHECKPOINTS))
    # A resumed run loads its own checkpoint instead, but for the frozen base of a LoRA run, which its
    # checkpoints do not hold.
    if init is not None and (not resuming or cfg.lora is not None):
        load_initial_weights(model, init)
        if env.is_main:
            print(f"initial weights from {init.source.key}={init.source.path}"
                  + (f", {init.growth.added} new embedding rows" if init.growth else ""), flush=True)
    if cfg.lora is not None:
        adapted = apply_lora(model, cfg.lora)
        if env.is_main:
            print(lora_summary(model, cfg, adapted, base), flush=True)
    optimizer = cfg.optim.build(model)
    scheduler = cfg.schedule.build(optimizer, total_steps=cfg.trainer.max_steps)
    engine = cfg.zero.build(model, optimizer, scheduler, seq_len=cfg.data.seq_len, grad_clip=cfg.optim.grad_clip,
                            run_dir=run_dir)
    loader = cfg.data.build(engine.train_micro_batch_size_per_gpu(), env.rank, env.world_size, tokenizer.fingerprint,
                            accum_steps=engine.gradient_accumulation_steps())
    validator = Validator.build(cfg.validation, [spec.path for spec in cfg.data.datasets], tokenizer,
                                seq_len=cfg.data.seq_len, run_dir=run_dir, rank=env.rank, world_size=env.world_size)
    eval_tasks = EvalTasks.build(cfg.validation.tasks, tokenizer, max_len=cfg.model.max_seq_len, run_dir=run_dir,
                                 rank=env.rank, world_size=env.world_size)
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else None
    peak = peak_flops(device_name, cfg.zero.precision)
    logger = MetricsLogger(cfg.logging, run_dir, is_main=env.is_main, max_steps=cfg.trainer.max_steps,
                           flops_per_token=cfg.model.flops_per_token(cfg.data.seq_len),
                           peak_flops_total=None if peak is None else peak * env.world_size)
    checkpointer = Checkpointer(cfg.checkpoint, run_dir / CHECKPOINTS, engine,
                                identity=run_identity(cfg, tokenizer, base=base), frozen=cfg.lora is not None)

    announce = (f"{cfg.model.num_params():,} parameters, {env.world_size} process(es) on {env.device.type}, "
                f"{cfg.zero.precision}, ZeRO stage {cfg.zero.stage}, {cfg.zero.global_batch_tokens:,} tokens per step "
                f"({engine.gradient_accumulation_steps()} accumulation steps)")
    callbacks = [Logging(logger), Announce(announce, run_dir, cfg.model.kernels_on(env.device, cfg.zero.dtype),
                                           is_main=env.is_main),
                 Validation(cfg.validation, validator, eval_tasks, logger, device=env.device,
                            max_steps=cfg.trainer.max_steps)]
    objective = preference_objective(cfg, engine, env, resuming=resuming) if cfg.objective == "dpo" else None
    trainer = Trainer(cfg.trainer, engine=engine, loader=loader, checkpointer=checkpointer, callbacks=callbacks,
                      objective=objective)
    # Installed before resuming, which may take long: SIGUSR1 (time limit near) or SIGTERM then stops after
    # the first step, with a checkpoint
    stop_on_signals(trainer)
    trainer.fit()
    if env.is_main:
        summarize(run_dir)
    shutdown_distributed()
    return 0


def preference_objective(cfg: TrainConfig, engine, env, *, resuming: bool) -> PreferenceObjective:
    """The preference objective of ``cfg``, with the reference log-probabilities of its training pairs (kept in
    the run folder, computed by ``engine`` before its first step; :mod:`hataori.train.preference`)."""
    reference = None
    if cfg.preference.needs_reference:
        datasets = [Dataset(spec.path, "train") for spec in cfg.data.datasets]
        key = reference_key(datasets, precision=cfg.zero.precision, init=cfg.init)

        def compute():
            began = time.perf_counter()
            found = compute_reference(engine, datasets, seq_len=cfg.data.seq_len, batch_size=cfg.zero.micro_batch_size,
                                      device=env.device, rank=env.rank, world_size=env.world_size)
            if env.is_main:
                print(f"reference log-probabilities of {sum(len(d) // 2 for d in datasets):,} pairs in "
                      f"{time.perf_counter() - began:.1f} s", flush=True)
            return found

        reference = ensure_reference(Path(cfg.run_dir), key, resuming=resuming, compute=compute,
                                     is_main=env.is_main, device=env.device)
    return PreferenceObjective(cfg.preference, reference)


def record_template(run_dir: Path, cfg: TrainConfig) -> None:
    """Keep the chat template the conversations were prepared with in the run folder (``chat_template.jinja``),
    for export and generation; a resumed run must train with the same one."""
    template = dataset_template([Dataset(spec.path, "train") for spec in cfg.data.datasets])
    path = run_dir / TEMPLATE_FILE
    if path.is_file() and path.read_text(encoding="utf-8") != template.source:
        raise ConfigError("data.datasets", f"{path} holds another chat template than the one {template.origin} was "
                          "prepared with; a run trains with one template: use a new run_dir or the same datasets")
    atomic_write_text(path, template.source)


def run_identity(cfg: TrainConfig, tokenizer, *, base: str | None = None) -> dict:
    """What a checkpoint must share with the run that resumes it: the model's shape, the tokenizer, how
    ZeRO laid out the optimizer state and, for a LoRA run, the adapters' shape and the fingerprint of
    the frozen ``base`` its checkpoints leave out."""
    identity = {**{f"model.{key}": getattr(cfg.model, key) for key in ("vocab_size", *SHAPE_FIELDS)},
                "tokenizer": tokenizer.fingerprint, "zero.stage": cfg.zero.stage,
                "zero.precision": cfg.zero.precision, "lora": lora_identity(cfg.lora)}
    if cfg.lora is not None:
        identity[LORA_BASE] = base
    return identity


def lora_identity(lora) -> dict | None:
    """The LoRA settings that fix what a checkpoint holds and what it computes (not dropout), JSON-ready."""
    if lora is None:
        return None
    return {"rank": lora.rank, "alpha": lora.alpha, "rslora": lora.rslora, "targets": list(lora.targets),
            "train_also": list(lora.train_also)}


def lora_summary(model, cfg: TrainConfig, adapted: list[str], base: str) -> str:
    """One line: what LoRA adapts and trains, against the whole model."""
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in unique if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in unique)
    also = f", and {', '.join(cfg.lora.train_also)} whole" if cfg.lora.train_also else ""
    return (f"LoRA rank {cfg.lora.rank} on {len(adapted)} linear layers{also}: {trainable:,} trainable of "
            f"{total:,} parameters ({trainable / total:.2%}); base {base}")




def summarize(run_dir: Path) -> None:
    """Print the first and last validation of the run and its mean throughput."""
    import json

    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines() if line]
    vals = [r for r in records if r["kind"] == "val"]
    steps = [r for r in records if r["kind"] == "train"]
    if vals:
        first, last = vals[0], vals[-1]
        print(f"validation bits per character: {first['bpc']:.4f} at step {first['step']} -> "
              f"{last['bpc']:.4f} at step {last['step']} (loss {first['loss']:.4f} -> {last['loss']:.4f})")
    if steps:
        seconds = sum(r["seconds"] for r in steps)
        tokens = sum(r["tokens"] for r in steps)
        print(f"trained {steps[-1]['step']} steps, {steps[-1]['tokens_seen']:,} tokens; "
              f"{tokens / seconds:,.0f} tokens/s over the steps' wall time")
