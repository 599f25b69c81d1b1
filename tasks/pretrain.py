"""Pre-training: open_clip models trained from scratch under any objective, with Ray Train.

`train(params, objective, control)` runs on the driver: checks the run before any work, starts
(or joins, with RAY_ADDRESS) Ray, runs `train_loop_per_worker` on `pretrain.num_workers` workers with
TorchTrainer, and exports the final model. A rerun with the same params resumes the same Ray run
from its latest checkpoint (same step, optimiser, scheduler and data position).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.data.loader import SUPPORTED_VIEWS, BatchStream, SampleCache, resolve_split
from core.data.shards import ShardError, atomic_write_json, check_shards, digest, file_sha256, shard_sizes
from core.errors import InputError, permanent
from core.frontier import CONTROL_PREFIX
from core.model import (
    NUMERICS, DualEncoder, RunStopped, build_model, for_device, forward_backward, is_vit, make_optimizer,
    model_config, non_finite, optimizer_step, schedule, to_device,
)
from core.metrics import embed_pairs
from defences import PRETRAINING
from defences.registry import get_pretraining_defence
from objectives import WEIGHTS
from objectives.registry import get_objective
from tasks.config import Params, PretrainConfig, parse_params, require_section


class PretrainError(InputError):
    """A run that cannot start: names the parameter or file. Raised before training."""


def pretrain_config(params: Params) -> PretrainConfig:
    return require_section(params, "pretrain", PretrainError)


def run_label(objective: str, control: bool, defence: str = "none") -> str:
    """The model's folder name: <objective>, <objective>+<pre-training defence>, control-<objective>."""
    return CONTROL_PREFIX + objective if control else objective if defence == "none" else f"{objective}+{defence}"


def defence_of(params: Params, defence: str):
    """The pre-training defence `defence` with its options from params (defences.base.PretrainingDefence).
    PretrainError naming `pretrain.defences` for an unknown name, `pretrain.defence_options.<name>` for a bad
    option, and `pretrain.epochs` when the defence would never act in that many epochs."""
    try:
        built = get_pretraining_defence(defence, **params.pretrain.defence_options.get(defence, {}))
    except KeyError as err:
        raise PretrainError(f"pretrain.defences: {err.args[0]}") from None
    except (TypeError, ValueError) as err:
        raise PretrainError(f"pretrain.defence_options.{defence}: {err}") from None
    idle = built.idle(params.pretrain.epochs)
    if idle:
        raise PretrainError(f"pretrain.epochs={params.pretrain.epochs}: {idle}")
    return built


def fingerprint(params: Params, objective: str, control: bool, data: str, model_cfg: dict, split: str,
                defence: str = "none") -> str:
    """The run's identity: what it computes from which data (the seed, `PretrainConfig.identity` with the
    split `auto` resolved to, the optimiser's implementation, the model's open_clip config, the objective and the weights it trains
    with, the pre-training defence and its options (when one is on), the data digest), so a rerun resumes only
    the same run. `compile` counts only when on (off is the plain computation that runs made before the switch existed)."""
    cfg = params.pretrain
    ident = cfg.identity() | {"split": split}
    if not cfg.compile:
        del ident["compile"]
    defended = {} if defence == "none" else {
        "defence": {defence: PRETRAINING[defence] | cfg.defence_options.get(defence, {})}}
    return digest({"seed": params.training_seed, "pretrain": ident, "numerics": NUMERICS, "model_config": model_cfg,
                   "objective": objective, "weights": WEIGHTS[objective] | cfg.weights.get(objective, {}),
                   "control": control, "data": data} | defended, 12)


def plan_run(params: Params, objective: str, control: bool = False, defence: str = "none") -> dict:
    """Everything a run needs, checked before Ray starts: model, objective views, pre-training defence, data,
    batch size."""
    cfg = pretrain_config(params)
    mcfg = model_config(cfg.model, "pretrain.model")
    obj = get_objective(objective, **cfg.weights.get(objective, {}))
    views = obj.views | defence_of(params, defence).views
    if control and defence != "none":
        raise PretrainError(f"pretrain: the controls are trained without a pre-training defence, not {defence!r}")
    unsupported = sorted(views - SUPPORTED_VIEWS)
    if unsupported:
        raise PretrainError(f"objective {objective!r} needs views {unsupported} that the loader cannot build "
                            f"(it builds {sorted(SUPPORTED_VIEWS)})")
    data_dir = cfg.control_data_dir if control else cfg.data_dir
    data = check_shards(data_dir, f"pretrain.{'control_' if control else ''}data_dir")
    n = sum(shard_sizes(data_dir).values())
    if cfg.batch_size > n:
        raise PretrainError(f"pretrain.batch_size={cfg.batch_size} is larger than the dataset ({n} samples in {data_dir})")
    n_shards = len(shard_sizes(data_dir))
    split = resolve_split(cfg.split, cfg.num_workers, n_shards)
    if split == "shards" and n_shards < cfg.num_workers:
        raise PretrainError(f"pretrain.split shards: {data_dir} has {n_shards} shards for pretrain.num_workers="
                            f"{cfg.num_workers}; each worker needs a shard: set pretrain.split samples (or auto), or "
                            f"curate with a smaller curate.shard_maxcount")
    label = run_label(objective, control, defence)
    run_id = f"{label}-{fingerprint(params, objective, control, data, mcfg, split, defence)}"
    storage = cfg.storage_dir if "://" in cfg.storage_dir else str(Path(cfg.storage_dir).resolve())
    return {"objective": objective, "control": control, "defence": defence, "label": label, "run_id": run_id,
            "data_dir": str(data_dir.resolve()),  # Ray workers run in their own working directory
            "n_samples": n, "steps_per_epoch": n // cfg.batch_size, "model_config": mcfg,
            "storage": storage, "out_dir": str(cfg.out_dir / label), "views": sorted(views)}


def _save_checkpoint(directory: Path, model, optimizer, scheduler, defence, position: dict, run: dict) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "defence": defence.state_dict(), **position}, directory / "state.pt")
    atomic_write_json(directory / "meta.json", {"model_config": run["model_config"], "objective": run["objective"],
                                                "run_id": run["run_id"], "sha256": file_sha256(directory / "state.pt"),
                                                **position})


class DamagedCheckpoint(Exception):
    """A checkpoint folder that cannot be read back as written (a copy cut short, a damaged file)."""


def _load_checkpoint(directory: Path, model, optimizer, scheduler, defence, run: dict) -> dict:
    """Restore model, optimiser, schedule and the defence's state from a checkpoint folder; returns its data position.
    Raises DamagedCheckpoint if its files are missing, unreadable or not those meta.json hashed."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        saved = meta["model_config"]
    except (OSError, ValueError, KeyError) as err:
        raise DamagedCheckpoint(f"{directory}: {type(err).__name__}: {err}") from None
    if saved != run["model_config"]:
        raise PretrainError(f"checkpoint {directory} was saved from another model config: {saved} != {run['model_config']}")
    try:
        if file_sha256(directory / "state.pt") != meta.get("sha256"):
            raise DamagedCheckpoint(f"{directory / 'state.pt'} does not match the sha256 in its meta.json")
        (directory / "train_log.jsonl").stat()
    except OSError as err:
        raise DamagedCheckpoint(f"{directory}: {type(err).__name__}: {err}") from None
    state = torch.load(directory / "state.pt", weights_only=True, map_location="cpu")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    defence.load_state_dict(state.get("defence", {}))
    return {k: state[k] for k in ("step", "epoch", "batch")}


def _stored_checkpoints(fs, folder: str, but: str = "") -> list:
    """The checkpoints in a run's storage folder, newest first (Ray names them by time), on any storage."""
    import pyarrow.fs
    import ray.train

    infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    names = sorted((i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.path != but), reverse=True)
    return [ray.train.Checkpoint(path=p, filesystem=fs) for p in names]


def _resume(checkpoint, model, optimizer, scheduler, defence, run: dict, log_path: Path, rank: int) -> dict:
    """Restore the newest readable checkpoint: Ray's latest, then the older ones, saying which were
    skipped. Without one from Ray (killed after a checkpoint was copied, before Ray recorded it),
    those in the run's storage folder. The start position (step 0 if none is readable)."""
    if checkpoint is None:
        candidates = _stored_checkpoints(*_run_folder(run))
    else:
        path = checkpoint.path.rstrip("/")
        candidates = [checkpoint] + _stored_checkpoints(checkpoint.filesystem, path.rpartition("/")[0], but=path)
    for candidate in candidates:
        with candidate.as_directory() as d:
            try:
                position = _load_checkpoint(Path(d), model, optimizer, scheduler, defence, run)
            except DamagedCheckpoint as err:
                if rank == 0:
                    print(f"[{run['label']}] skipping a damaged checkpoint: {err}", flush=True)
                continue
            if rank == 0:
                shutil.copyfile(Path(d) / "train_log.jsonl", log_path)
                print(f"[{run['label']}] resumed from checkpoint at step {position['step']} (epoch "
                      f"{position['epoch']}, batch {position['batch']}; {Path(candidate.path).name})", flush=True)
            return position
    if rank == 0 and candidates:
        print(f"[{run['label']}] no readable checkpoint: training from the start", flush=True)
    return {"step": 0, "epoch": 0, "batch": 0}


def _cause(err: BaseException) -> BaseException:
    """What a failed Ray Train run raises on the driver: the worker's own error when retrying cannot
    help (bad input, a full disk), so that it is not retried again and reads as one line; else
    Ray's error as it is."""
    todo, seen = [err], set()
    while todo:  # Ray wraps it: WorkerGroupError.worker_failures -> RayTaskError.cause -> __cause__
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if permanent(e):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None), *getattr(e, "worker_failures", {}).values()]
    return err


def _run_folder(run: dict):
    """(pyarrow filesystem, path) of the run's folder in its Ray storage (local or remote)."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(run["storage"])
    return fs, f"{root}/{run['run_id']}"


def _stop_note(run: dict):
    """(pyarrow filesystem, path) of the note a stopped run leaves in its run folder."""
    fs, folder = _run_folder(run)
    return fs, f"{folder}/stopped.txt"


def _first_problem(problem: str | None, world: int, device: torch.device) -> str | None:
    """The problem any worker hit at this point (None: none did), agreed by all workers so that they
    stop together (a worker that stopped alone would leave the others waiting in a collective)."""
    if world == 1:
        return problem
    import torch.distributed as dist

    flag = torch.tensor([problem is not None], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    problems = [None] * world
    dist.all_gather_object(problems, problem)
    return next(p for p in problems if p)


def _step_keys(micro: list[dict], world: int) -> list[str]:
    """The step's global batch keys in the objective's row order: rank by rank, each rank's micro-batches in turn."""
    keys = [k for mb in micro for k in mb["keys"]]
    if world == 1:
        return keys
    import torch.distributed as dist

    every = [None] * world
    dist.all_gather_object(every, keys)
    return [k for part in every for k in part]


def _all_similarities(mine: dict, world: int) -> dict:
    """Every worker's share ({"keys": n strings, "similarity": [n] float32}) joined on every worker, in key order
    (the same whatever `world`): N keys and floats cross the network, not N embeddings."""
    shares = [mine]
    if world > 1:
        import torch.distributed as dist

        shares = [None] * world
        dist.all_gather_object(shares, mine)
    keys = [k for s in shares for k in s["keys"]]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    similarity = np.concatenate([s["similarity"] for s in shares])[order]
    return {"keys": [keys[i] for i in order], "similarity": similarity}


def _from_rank_0(defence, world: int) -> None:
    """Rank 0's defence state on every worker: one decision (a Gaussian mixture fitted on one CPU) for all,
    even across machines whose float kernels differ."""
    if world > 1:
        import torch.distributed as dist

        state = [defence.state_dict()]
        dist.broadcast_object_list(state, src=0)
        defence.load_state_dict(state[0])


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    params, run = parse_params(config["params"]), config["run"]
    cfg = params.pretrain
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(params.training_seed)
    model, preprocess, tokenizer = build_model(cfg.model, run["objective"])
    device = ray.train.torch.get_device()
    model = for_device(model, device)  # before the optimiser, so that resumed optimiser state lands beside its weights
    objective = get_objective(run["objective"], **cfg.weights.get(run["objective"], {}))
    defence = defence_of(params, run["defence"])
    # accum_steps micro-batches make one optimiser step's global batch of batch_size samples
    stream = BatchStream(Path(run["data_dir"]), cfg.batch_size // cfg.accum_steps, rank, world, params.training_seed, preprocess,
                         tokenizer, frozenset(run["views"]), cfg.split, cfg.shuffle_buffer, cfg.loader_workers,
                         pin_memory=device.type == "cuda", cache=SampleCache(cfg.cache_mb))
    steps_per_epoch = run["steps_per_epoch"]
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, is_vit(run["model_config"]), cfg.beta1, cfg.beta2, cfg.eps)
    scheduler = schedule(optimizer, cfg.warmup_steps, total_steps)
    # The per-step log travels inside each checkpoint, so a resumed run (on any node) continues it.
    log_path = Path(tempfile.mkdtemp()) / "train_log.jsonl"
    position = _resume(ray.train.get_checkpoint(), model, optimizer, scheduler, defence, run, log_path, rank)
    encoder = DualEncoder(model)
    ddp = ray.train.torch.prepare_model(torch.compile(encoder) if cfg.compile else encoder)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    def stop(problem: str) -> None:
        """Every worker returns (Ray would retry an exception into the same problem); rank 0 leaves
        the reason where the driver looks for it after fit() and raises RunStopped. Nothing is saved."""
        if rank == 0:
            fs, path = _stop_note(run)
            fs.create_dir(path.rpartition("/")[0], recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(f"pretrain run {run['label']} ({run['run_id']}): {problem}".encode())

    def save(metrics: dict, position: dict) -> str | None:
        """Save a checkpoint on rank 0 and report it (every worker); what stops the run, if anything."""
        with tempfile.TemporaryDirectory() as tmp:
            problem = None
            if rank == 0:
                try:
                    _save_checkpoint(Path(tmp), model, optimizer, scheduler, defence, position, run)
                    shutil.copyfile(log_path, Path(tmp) / "train_log.jsonl")
                except OSError as err:  # e.g. a full disk: the same again on a retry
                    problem = f"saving the checkpoint of step {position['step']} in {tmp}: {err}"
            if problem := _first_problem(problem, world, device):
                return problem
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        return None

    step, start_step, started = position["step"], position["step"], time.time()
    window_start, window_samples = started, 0
    accum, micro_per_epoch = cfg.accum_steps, steps_per_epoch * cfg.accum_steps
    def similarities() -> dict:
        """Every training pair's image-caption cosine under the model now: each worker embeds its share."""
        mine = embed_pairs(model, preprocess, tokenizer, Path(run["data_dir"]), device, 256, rank, world, cache=stream.cache)
        model.train()
        return _all_similarities({"keys": mine["keys"], "similarity": (mine["image"] * mine["text"]).sum(1).numpy()}, world)

    for epoch in range(position["epoch"], cfg.epochs):
        skip = position["batch"] if epoch == position["epoch"] else 0  # micro-batches, at a step boundary
        said = defence.begin_epoch(epoch, similarities, params.training_seed)
        _from_rank_0(defence, world)
        if said and rank == 0:
            print(f"[{run['label']}] epoch {epoch}: {run['defence']} {said}", flush=True)
        loss_fn = defence.wrap(objective)
        batches = stream.epoch(epoch, skip_batches=skip, n_batches=micro_per_epoch)
        for b in range(skip, micro_per_epoch, accum):
            problem, micro = None, []
            try:
                while len(micro) < accum:
                    micro.append(next(batches))
            except Exception as err:  # noqa: BLE001 (a sample that cannot be read: on this worker only)
                problem = f"reading batch {b + len(micro)} of epoch {epoch}: {err if isinstance(err, ShardError) else repr(err)}"
            if problem := _first_problem(problem, world, device):
                return stop(problem)
            defence.begin_step(_step_keys(micro, world) if defence.keyed else None)
            loss, parts = forward_backward(ddp, loss_fn, [to_device(mb, device) for mb in micro], autocast)
            if problem := _first_problem(None if torch.isfinite(loss) else
                                         f"the loss became {loss.item()} at step {step + 1} (epoch {epoch}, batch "
                                         f"{b + accum - 1}, lr {scheduler.get_last_lr()[0]:.3g}); lower pretrain.lr or "
                                         f"set pretrain.grad_clip", world, device):
                return stop(problem)
            window_samples += sum(len(mb["keys"]) for mb in micro) * world
            optimizer_step(model, optimizer, scheduler, cfg.grad_clip)
            defence.end_step()
            step += 1
            done_epoch = b + accum == micro_per_epoch
            position = {"step": step, "epoch": epoch + done_epoch, "batch": 0 if done_epoch else b + accum}
            metrics = {"step": step, "epoch": epoch + (b + accum) / micro_per_epoch,
                       "lr": scheduler.get_last_lr()[0], "logit_scale": model.logit_scale.exp().item(),
                       **{k: v.item() for k, v in parts.items()}, "loss": loss.item()}
            if step % cfg.log_every == 0 or step == total_steps:
                now = time.time()
                metrics["samples_per_s"] = window_samples / max(now - window_start, 1e-9)
                window_start, window_samples = now, 0
                if rank == 0:
                    eta = (total_steps - step) * (now - started) / max(1, step - start_step)
                    print(f"[{run['label']}] step {step}/{total_steps} epoch {metrics['epoch']:.2f} "
                          f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {metrics['samples_per_s']:.0f} samples/s "
                          f"ETA {eta:.0f}s", flush=True)
            if rank == 0:
                with log_path.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                bad = non_finite(model)  # the same on every worker: DDP keeps the weights in step
                if bad:
                    return stop(f"{len(bad)} tensor(s) of the model became non-finite at step {step} (epoch {epoch}, "
                                f"lr {metrics['lr']:.3g}), e.g. {bad[:3]}; lower pretrain.lr or set pretrain.grad_clip")
                if problem := save(metrics, position):
                    return stop(problem)
    if step == start_step > 0 and ray.train.get_checkpoint() is None:
        # resumed at the end from a checkpoint that a kill kept Ray from recording: record it, to export
        if problem := save({"step": step}, position):
            return stop(problem)


def init_ray(cfg: PretrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    for var, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(var, value)
    # Ray Train's workers both print and log what they print: each progress line reached the driver twice
    runtime_env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING", runtime_env=runtime_env)
    else:  # a one-machine Ray (the setting would stop other nodes from joining a cluster)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        cpus = max(os.cpu_count() or 1, (cfg.num_workers + 1) * cfg.concurrent_runs)  # + a controller per run
        # no dashboard: its head and 9 modules took ~12 s of CPU per pretrain stage that nothing here reads
        # (a cluster's own dashboard serves RAY_ADDRESS runs)
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING", _node_ip_address="127.0.0.1",
                 runtime_env=runtime_env)


def train(params: Params, objective: str, control: bool = False, defence: str = "none") -> dict:
    """Train one model (resuming its run if a checkpoint exists) and export it; returns its metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = pretrain_config(params)
    run = plan_run(params, objective, control, defence)
    init_ray(cfg)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 if cfg.use_gpu == "auto" else cfg.use_gpu
    threads = cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // (cfg.num_workers * cfg.concurrent_runs))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"params": params.model_dump(mode="json"), "run": run, "threads": threads},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=run["run_id"], storage_path=run["storage"],
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    started = time.time()
    fs, note = _stop_note(run)
    if fs.get_file_info(note).is_file:  # from an earlier attempt
        fs.delete_file(note)
    result = trainer.fit()
    if result.error:
        raise _cause(result.error)
    if fs.get_file_info(note).is_file:
        with fs.open_input_stream(note) as f:
            raise RunStopped(f.read().decode())
    return export(params, run, result.checkpoint, time.time() - started, use_gpu)


def export(params: Params, run: dict, checkpoint, seconds: float, use_gpu: bool) -> dict:
    """The final model as a plain state_dict + config, the log and metrics.json."""
    out = Path(run["out_dir"])
    partial = Path(f"{out}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # The optimiser state stays in the run's storage (resume); the export is the model (a third of the bytes).
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", weights_only=True, map_location="cpu")
        shutil.copyfile(Path(d) / "train_log.jsonl", partial / "train_log.jsonl")
    torch.save(state["model"], partial / "model.pt")
    atomic_write_json(partial / "model_config.json", {"model": params.pretrain.model, "objective": run["objective"],
                                                      "defence": run["defence"],
                                                      "open_clip_config": run["model_config"],
                                                      "sha256": {"model.pt": file_sha256(partial / "model.pt")}})
    records = [json.loads(line) for line in (partial / "train_log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    metrics = {"objective": run["objective"], "control": run["control"], "defence": run["defence"],
               "model": params.pretrain.model,
               "steps": state["step"], "epochs": params.pretrain.epochs, "final_loss": records[-1]["loss"],
               "first_loss": records[0]["loss"], "samples_per_s": sum(rates) / len(rates) if rates else None,
               "wall_seconds": round(seconds, 1), "workers": params.pretrain.num_workers, "gpu": bool(use_gpu),
               "parameters": sum(v.numel() for v in state["model"].values()), "run_id": run["run_id"]}
    atomic_write_json(partial / "metrics.json", metrics)
    from core.data.shards import swap_into_place

    swap_into_place(partial, out)
    return metrics
