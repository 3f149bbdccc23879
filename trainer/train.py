"""Build and run a Composer ``Trainer`` for a DiT from a ditperf training config.

``train(cfg)`` is what ``ditperf train`` and ``composer -n N -m ditperf.trainer`` call. Pieces:
:class:`~ditperf.trainer.model.DiTComposerModel` (flow-matching loss, analytic
``flops_per_batch`` so ``SpeedMonitor`` reports MFU), Composer's ``DecoupledAdamW``,
``CosineAnnealingWithWarmupScheduler``, the ``EMA`` and ``GradientClipping`` algorithms,
``SpeedMonitor`` / ``LRMonitor`` / ``MemoryMonitor`` callbacks, ditperf's ``PowerCallback``
(NVML) on GPUs, a NaN guard, checkpoints in Composer's own format
(``ep{epoch}-ba{batch}-rank{rank}.pt`` + ``latest-rank{rank}.pt`` symlink).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from ditperf.trainer.config import ConfigError, model_fields, validate_values

log = logging.getLogger("ditperf.trainer")


class TrainingStopped(RuntimeError):
    """Training stopped early for a reason the user must see (NaN loss)."""


def _world() -> tuple[int, int, int]:
    """(world size, global rank, local rank) from the launcher's environment."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def model_config(cfg: dict[str, Any]) -> Any:
    from ditperf.model import get_config

    m = cfg["model"]
    overrides = {k: m[k] for k in model_fields() if m.get(k) is not None}
    try:
        return get_config(m["preset"], **overrides)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


def resolve_device_precision(cfg: dict[str, Any]) -> tuple[str, str]:
    device = cfg["device"]
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "gpu"):
        raise ConfigError(f"device must be auto, cpu or gpu; got {device!r}")
    if device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("device=gpu but no CUDA GPU is visible")
    precision = cfg["precision"]
    if precision == "auto":
        precision = "amp_bf16" if device == "gpu" else "fp32"
    if device == "cpu" and precision != "fp32":
        raise ConfigError(f"precision={precision} needs a GPU (Composer refuses amp on CPU); use fp32 or auto")
    return device, precision


def resolve_parallelism(cfg: dict[str, Any], device: str) -> Any:
    """``parallelism_config`` for Composer, with its ``fsdp`` section as Composer's FSDP v1
    ``FSDPConfig`` or FSDP2 ``FSDP2Config`` per ``fsdp_version`` (auto: $FSDP_VERSION if set,
    else 1 on GPUs, Composer's default, and 2 on CPU, the only one that runs there)."""
    par = cfg.get("parallelism_config")
    if not isinstance(par, dict) or par.get("fsdp") is None:
        return par
    from composer.utils.parallelism import FSDP2Config, FSDPConfig

    version = str(cfg["fsdp_version"])
    if version == "auto":
        version = os.environ.get("FSDP_VERSION") or ("1" if device == "gpu" else "2")
    if version not in ("1", "2"):
        raise ConfigError(f"fsdp_version must be auto, 1 or 2; got {version!r}")
    fsdp = par["fsdp"]
    if not isinstance(fsdp, dict):
        raise ConfigError(f"parallelism_config.fsdp must be a mapping of FSDP options, got {fsdp!r}")
    if version == "1" and device == "cpu":
        raise ConfigError("FSDP v1 needs CUDA GPUs (Composer's FSDP wrapper places each rank on "
                          "torch.cuda.current_device()); on CPU use fsdp_version=2 (FSDP2, what auto picks "
                          "there) or drop the section: parallelism_config=null (DDP over gloo)")
    # Composer takes unknown keys silently (v1) or with a warning (v2): a misspelled option
    # (sharding_stategy) would quietly run with the default
    import dataclasses

    known = {f.name for f in dataclasses.fields(FSDPConfig)} | {f.name for f in dataclasses.fields(FSDP2Config)}
    unknown = sorted(set(fsdp) - known)
    if unknown:
        raise ConfigError(f"parallelism_config.fsdp: unknown option(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(known))}")
    try:
        built = FSDPConfig(**fsdp) if version == "1" else FSDP2Config.from_compatible_attrs(fsdp)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"parallelism_config.fsdp (FSDP v{version}): {exc}") from exc
    return {**par, "fsdp": built}


def device_batch_size(cfg: dict[str, Any], world_size: int) -> int:
    gbs = int(cfg["global_train_batch_size"])
    if gbs < 1 or gbs % world_size:
        raise ConfigError(f"global_train_batch_size={gbs} must be a positive multiple of the world size "
                          f"({world_size} ranks)")
    return gbs // world_size


def prepare_data(cfg: dict[str, Any], mcfg: Any, batch: int, world_size: int, rank: int) -> Any:
    """Validate the dataset (schema vs model, files, hashes) and build the train DataSpec."""
    from composer.core import DataSpec
    from ditperf.trainer import data as D

    d = cfg["data"]
    if not d["local"]:
        raise ConfigError("data.local is not set: give the dataset folder (e.g. data.local=/data/latents; "
                          "create one with `ditperf data synth --out DIR --preset tiny --num 256`)")
    local, remote = str(d["local"]), d["remote"]
    if remote:
        schema = D._load_schema(local, remote)  # shards are hash-checked by Streaming on download
    else:
        # rank 0 checks hashes, other ranks only sizes (same files, no need to read them N times)
        mode = d["verify"] if rank == 0 or d["verify"] in ("none", "size") else "size"
        schema = D.verify_dataset(local, mode=mode)
    D.check_compatible(schema, mcfg, remote or local)
    gbs = batch * world_size
    small = [b for b in schema.buckets if 0 < b.samples < gbs]
    if small:
        names = ", ".join(f"{b.name} ({b.samples})" for b in small)
        raise D.DataError(f"dataset {remote or local}: bucket(s) {names} have fewer samples than one global batch "
                          f"({gbs}); lower global_train_batch_size or add data")
    shuffle_seed = d["shuffle_seed"] if d["shuffle_seed"] is not None else cfg["seed"]
    kwargs: dict[str, Any] = {}
    if d["predownload"] is not None:
        kwargs["predownload"] = int(d["predownload"])
    if d["cache_limit"] is not None:
        kwargs["cache_limit"] = d["cache_limit"]
    dataset = D.build_dataset(local, remote=remote, batch_size=batch, shuffle=bool(d["shuffle"]),
                              shuffle_seed=int(shuffle_seed) % (2**31), schema=schema,
                              edit_task=d["edit_task"] if mcfg.edit else None, edit_seed=int(cfg["seed"]),
                              **kwargs)
    loader = D.build_dataloader(dataset, batch_size=batch, num_workers=int(d["num_workers"]),
                                prefetch_factor=int(d["prefetch_factor"]),
                                persistent_workers=bool(d["persistent_workers"]))
    return DataSpec(loader, get_num_samples_in_batch=lambda b: int(b["latents"].shape[0])), schema


def _enabled(value: Any, device: str) -> bool:
    if value == "auto":
        return device == "gpu"
    if isinstance(value, dict):
        return _enabled(value.get("enabled", True), device)
    return bool(value)


def build_callbacks(cfg: dict[str, Any], device: str) -> list[Any]:
    from composer.callbacks import LRMonitor, MemoryMonitor, SpeedMonitor
    from ditperf.trainer.model import BatchIndexCallback, InfGradAtBatch, NaNGuard, ResumeGuard

    cbs: list[Any] = [BatchIndexCallback(), NaNGuard(), ResumeGuard(int(cfg["global_train_batch_size"]))]
    if cfg["debug"]["inf_grad_at_batch"] is not None:
        cbs.append(InfGradAtBatch(cfg["debug"]["inf_grad_at_batch"]))
    c = cfg["callbacks"]
    sm = c["speed_monitor"]
    if _enabled(sm, device):
        cbs.append(SpeedMonitor(window_size=int(sm["window_size"]), gpu_flops_available=sm["gpu_flops_available"]))
    if _enabled(c["lr_monitor"], device):
        cbs.append(LRMonitor())
    if _enabled(c["memory_monitor"], device):
        if device != "gpu":
            warnings.warn("callbacks.memory_monitor needs a GPU; skipped", stacklevel=2)
        else:
            cbs.append(MemoryMonitor())
    power = c["power"]
    if _enabled(power, device):
        try:
            from ditperf.profiling import PowerCallback  # type: ignore[attr-defined]
        except ImportError as exc:
            warnings.warn(f"callbacks.power: ditperf.profiling.PowerCallback is not available ({exc}); "
                          "training without power logging", stacklevel=2)
        else:
            out_dir = power.get("out_dir") or (str(Path(_save_dir(cfg)) / "power") if cfg["save_folder"] else None)
            kwargs = {"out_dir": out_dir} if out_dir else {}
            cbs.append(PowerCallback(interval_s=float(power["interval_s"]), log_interval=int(power["log_interval"]),
                                     **kwargs))
    if cfg.get("stop_at"):
        cbs.append(_make_stop_at(str(cfg["stop_at"])))
    return cbs


def _make_stop_at(spec: str) -> Any:
    from composer.core import Callback, Time

    class StopAt(Callback):
        """Stop cleanly after ``spec`` (a time string) without changing ``max_duration``, so the
        LR schedule is the full run's; the end-of-training checkpoint is written."""

        def __init__(self) -> None:
            self.at = Time.from_timestring(spec)

        def batch_end(self, state: Any, logger: Any) -> None:
            if state.timestamp.get(self.at.unit) >= self.at:
                state.stop_training()

    return StopAt()


def _torch_at_least(version: str) -> bool:
    return torch.torch_version.TorchVersion(torch.__version__) >= version


def build_trainer(cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Construct the Composer ``Trainer``; returns (trainer, info)."""
    validate_values(cfg)
    _kernels_first(cfg)
    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.loggers import InMemoryLogger
    from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
    from composer.utils import reproducibility
    from ditperf.model import DiT
    from ditperf.trainer.ema import EMA
    from ditperf.trainer.model import DiTComposerModel

    world_size, rank, _ = _world()
    device, precision = resolve_device_precision(cfg)
    parallelism = resolve_parallelism(cfg, device)
    batch = device_batch_size(cfg, world_size)
    mcfg = model_config(cfg)
    backend = cfg["model"]["backend"]
    if backend not in ("torch", "triton"):
        raise ConfigError(f"model.backend must be torch or triton, got {backend!r}")
    attention_backend = cfg["model"].get("attention_backend")
    if attention_backend not in (None, "torch", "triton"):
        raise ConfigError(f"model.attention_backend must be torch, triton or null (= model.backend), "
                          f"got {attention_backend!r}")
    train_spec, schema = prepare_data(cfg, mcfg, batch, world_size, rank)

    reproducibility.seed_all(int(cfg["seed"]))  # same init on every rank, and across resumes
    dit = DiT(mcfg, backend=backend, attention_backend=attention_backend)
    loss_cfg = cfg["loss"]
    model = DiTComposerModel(dit, seed=int(cfg["seed"]), cond_dropout=float(loss_cfg["cond_dropout"]),
                             edit_region_only=bool(loss_cfg["edit_region_only"]), t_mean=float(loss_cfg["t_mean"]),
                             t_std=float(loss_cfg["t_std"]), nan_at_batch=cfg["debug"]["nan_at_batch"])
    if cfg["debug"]["param_digest"]:
        model.seen_sample_ids = []
    o = cfg["optimizer"]
    optimizer = DecoupledAdamW(model.parameters(), lr=float(o["lr"]), betas=tuple(float(b) for b in o["betas"]),
                               eps=float(o["eps"]), weight_decay=float(o["weight_decay"]))
    s = cfg["scheduler"]
    scheduler = CosineAnnealingWithWarmupScheduler(t_warmup=str(s["t_warmup"]), alpha_f=float(s["alpha_f"]))
    algorithms: list[Any] = []
    if cfg["ema"]["enabled"]:
        algorithms.append(EMA(half_life=str(cfg["ema"]["half_life"])))
    if cfg["grad_clip_norm"]:
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=float(cfg["grad_clip_norm"])))
    memory = InMemoryLogger()
    micro = cfg["device_train_microbatch_size"]
    if micro == "auto" and parallelism is not None and _torch_at_least("2.7.1"):
        # Composer 0.32.1 patches FSDP's unshard for automicrobatching with a function it
        # defines only for torch < 2.7.1: on newer torch the Trainer dies with a NameError
        raise ConfigError(f"device_train_microbatch_size=auto with parallelism_config (FSDP) fails in Composer "
                          f"on torch {torch.__version__} (its automicrobatching patch exists only for torch < "
                          "2.7.1): give a whole number, e.g. device_train_microbatch_size=4")
    kwargs: dict[str, Any] = {}
    if cfg["save_folder"]:
        kwargs.update(save_folder=str(cfg["save_folder"]), save_interval=str(cfg["save_interval"]),
                      save_num_checkpoints_to_keep=int(cfg["save_num_checkpoints_to_keep"]),
                      save_overwrite=bool(cfg["save_overwrite"]))
    elif cfg["autoresume"]:
        raise ConfigError("autoresume=true needs save_folder (where it looks for the latest checkpoint)")
    kwargs.update(_resume_plan(cfg))
    if cfg["model"]["compile"]:
        # static shapes: one graph per aspect-ratio bucket (inductor 2.7 fails on the dynamic one: "cannot
        # determine truth value of Relational" on CPU), and the best kernels for each
        kwargs["compile_config"] = {"dynamic": False}
    with _clear_load_errors(cfg):
        trainer = Trainer(
            model=model, train_dataloader=train_spec, max_duration=str(cfg["max_duration"]),
            optimizers=optimizer, schedulers=scheduler, step_schedulers_every_batch=True,
            algorithms=algorithms, callbacks=build_callbacks(cfg, device), loggers=[memory],
            run_name=cfg["run_name"], progress_bar=bool(cfg["progress_bar"]),
            log_to_console=not cfg["progress_bar"], console_log_interval=str(cfg["console_log_interval"]),
            autoresume=bool(cfg["autoresume"]), parallelism_config=parallelism,
            device=device, precision=precision, device_train_microbatch_size=micro if micro is not None else batch,
            seed=int(cfg["seed"]), deterministic_mode=cfg["deterministic"], **kwargs,
        )
    info = {"device": device, "precision": precision, "world_size": world_size, "rank": rank,
            "device_batch_size": batch, "model": mcfg.describe(), "params": dit.num_params(),
            "backend": backend if attention_backend in (None, backend) else f"{backend} (attention: {attention_backend})",
            "memory_logger": memory, "schema": schema}
    return trainer, info


def _series(memory: Any, key: str) -> list[float]:
    return [float(v) for _, v in memory.data.get(key, [])]


def summarize(trainer: Any, info: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Loss, throughput and MFU from the in-memory logger (what SpeedMonitor logged)."""
    mem = info["memory_logger"]
    loss = _series(mem, "loss/train/total")
    sps = _series(mem, "throughput/samples_per_sec")
    dev_sps = _series(mem, "throughput/device/samples_per_sec")
    mfu = _series(mem, "throughput/device/mfu")
    flops = _series(mem, "throughput/device/flops_per_sec")

    def last(xs: list[float]) -> float | None:
        return xs[-1] if xs else None

    def median(xs: list[float]) -> float | None:
        return sorted(xs)[len(xs) // 2] if xs else None

    state = trainer.state
    power = next((cb for cb in state.callbacks if type(cb).__name__ == "PowerCallback"), None)
    power_summary = getattr(power, "fit_summary", None) if power is not None else None
    return {
        "power": power_summary,
        "run_name": state.run_name, "config": cfg.get("_source"), "model": info["model"], "params": info["params"],
        "backend": info["backend"], "device": info["device"], "precision": info["precision"],
        "gpu": torch.cuda.get_device_name() if info["device"] == "gpu" else None,
        "world_size": info["world_size"], "device_batch_size": info["device_batch_size"],
        "batches": int(state.timestamp.batch.value), "samples": int(state.timestamp.sample.value),
        "epochs": int(state.timestamp.epoch.value),
        "loss_first": loss[0] if loss else None, "loss_last": last(loss),
        "loss_first5_mean": sum(loss[:5]) / len(loss[:5]) if loss else None,
        "loss_last5_mean": sum(loss[-5:]) / len(loss[-5:]) if loss else None,
        "img_per_s_last": last(sps), "img_per_s_median": median(sps),
        "img_per_s_per_device_last": last(dev_sps), "mfu_last": last(mfu), "mfu_median": median(mfu),
        "tflops_per_device_last": (last(flops) or 0) / 1e12 if flops else None,
        "speed_monitor_window": cfg["callbacks"]["speed_monitor"]["window_size"],
        "wall_s": state.timestamp.total_wct.total_seconds(),
    }


def param_digest(trainer: Any) -> dict[str, str]:
    """sha256 of the training parameters and of the EMA parameters (for cross-rank checks)."""
    from ditperf.trainer.ema import full_tensor

    train_p, ema_p = training_and_ema_params(trainer)
    out = {}
    for name, params in (("params", train_p), ("ema", ema_p)):
        if params is None:
            continue
        h = hashlib.sha256()
        for k in sorted(params):
            h.update(k.encode())
            h.update(full_tensor(params[k]).detach().float().cpu().contiguous().numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def training_and_ema_params(trainer: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(training params, EMA params or None) by name, whichever is currently swapped in."""
    from composer.algorithms import EMA
    from ditperf.trainer.model import unwrap

    model = unwrap(trainer.state.model)
    current = {k: v.detach().clone() for k, v in model.named_parameters()}
    ema = next((a for a in trainer.state.algorithms if isinstance(a, EMA)), None)
    if ema is None or ema.ema_model is None:
        return current, None
    stored = {k: v.detach().clone() for k, v in ema.ema_model.named_parameters_dict.items()}
    return (stored, current) if ema.ema_weights_active else (current, stored)


def _kernels_first(cfg: dict[str, Any]) -> None:
    """Import ditperf.kernels before Composer when the triton backend is used: without a GPU
    it turns on Triton's CPU interpreter, which only works if it happens before anything
    imports triton (Composer does, through torch.distributed)."""
    if "triton" in (cfg["model"]["backend"], cfg["model"].get("attention_backend")):
        import ditperf.kernels  # noqa: F401


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train per ``cfg`` (see :mod:`ditperf.trainer.config`); return the summary dict."""
    _kernels_first(cfg)
    threads = torch.get_num_threads()
    if cfg["torch_threads"]:
        torch.set_num_threads(int(cfg["torch_threads"]))
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: dict[str, Any]) -> dict[str, Any]:
    from ditperf.trainer.model import NonFiniteLossError

    trainer, info = build_trainer(cfg)
    _, rank, _ = _world()
    if rank == 0:
        print(f"ditperf train: {info['model']} ({info['params'] / 1e6:.2f}M params), backend {info['backend']}, "
              f"{info['device']} {info['precision']}, {info['world_size']} rank(s) x batch {info['device_batch_size']}, "
              f"data {cfg['data']['remote'] or cfg['data']['local']} ({info['schema'].total_samples} samples, "
              f"buckets {', '.join(b.name for b in info['schema'].buckets)})", flush=True)
    try:
        trainer.fit()
    except NonFiniteLossError as exc:
        latest = _latest_checkpoint(cfg)
        trainer.close()
        keep = f"last good checkpoint: {latest}" if latest else "no checkpoint was written before it"
        raise TrainingStopped(f"{exc}; stopped without saving that step ({keep}). "
                              "Lower optimizer.lr, check the data, or resume from the checkpoint.") from exc
    summary = summarize(trainer, info, cfg)
    if cfg["debug"]["param_digest"]:
        folder = Path(_save_dir(cfg) or ".")
        folder.mkdir(parents=True, exist_ok=True)
        from ditperf.trainer.model import unwrap

        doc = {**param_digest(trainer), "sample_ids": unwrap(trainer.state.model).seen_sample_ids}
        (folder / f"param_digest-rank{rank}.json").write_text(json.dumps(doc))
    summary_file = cfg["summary_file"] or (Path(_save_dir(cfg)) / "train_summary.json" if cfg["save_folder"] else None)
    if rank == 0:
        _print_summary(summary)
        if summary_file:
            Path(summary_file).parent.mkdir(parents=True, exist_ok=True)
            Path(summary_file).write_text(json.dumps(summary, indent=2, default=str))
            print(f"summary: {summary_file}", flush=True)
    trainer.close()
    summary["_trainer"] = trainer
    return summary


def _save_dir(cfg: dict[str, Any]) -> str | None:
    """``save_folder`` with Composer's ``{run_name}`` placeholder filled in (as Composer does)."""
    folder = cfg["save_folder"]
    if not folder:
        return None
    if cfg.get("run_name") is None:  # Composer makes up a name per run: nothing to find
        return str(folder)
    try:
        return str(folder).format(run_name=cfg["run_name"])
    except (KeyError, IndexError, ValueError):  # other placeholders: Composer's business
        return str(folder)


def _checkpoints(folder: str | Path, rank: int = 0) -> list[Path]:
    """Composer's checkpoint files of ``rank`` in ``folder``, oldest to newest by (epoch, batch)."""
    if not Path(folder).is_dir():
        return []
    name = re.compile(rf"ep(\d+)-ba(\d+)-rank{rank}\.pt$")
    found = [(m, p) for p in Path(folder).glob(f"ep*-ba*-rank{rank}.pt") if (m := name.search(p.name))]
    return [p for m, p in sorted(found, key=lambda mp: (int(mp[0][1]), int(mp[0][2])))]


def _resume_plan(cfg: dict[str, Any]) -> dict[str, Any]:
    """Trainer kwargs for loading, after checking that nothing a folder holds gets lost:
    * no autoresume, no load_path, and save_folder already has checkpoints: refuse (Composer's
      own error says to set save_overwrite, which would start over on top of them);
    * autoresume with save_folder's ``latest`` link missing (e.g. deleted, or a copied
      folder) but checkpoints present: resume from the newest of them;
    * a load_path that does not exist (also under autoresume when there is nothing to resume)."""
    folder = _save_dir(cfg)
    found = _checkpoints(folder) if folder else []
    load_path = cfg["load_path"]
    if found and not cfg["autoresume"] and not load_path and not cfg["save_overwrite"]:
        raise ConfigError(f"save_folder {folder} already has checkpoints (newest: {found[-1].name}): continue "
                          f"that run with autoresume=true (or load_path={found[-1]}), or pick another "
                          "save_folder; save_overwrite=true would train from scratch over them")
    has_latest = bool(folder) and (Path(folder) / "latest-rank0.pt").exists()
    if cfg["autoresume"] and not has_latest and found and not load_path:
        load_path = str(found[-1])
        print(f"ditperf train: autoresume: {folder} has no latest-rank0.pt link; resuming from {load_path}",
              flush=True)
    if not load_path:
        return {}
    if "://" not in str(load_path) and not Path(load_path).exists() and not (cfg["autoresume"] and has_latest):
        raise ConfigError(f"load_path {load_path} does not exist")
    return {"load_path": str(load_path), "load_weights_only": bool(cfg["load_weights_only"])}


@contextlib.contextmanager
def _clear_load_errors(cfg: dict[str, Any]) -> Iterator[None]:
    """Composer's errors while it sets up saving and loads a checkpoint, as ConfigErrors."""
    try:
        yield
    except FileExistsError as exc:
        raise ConfigError(f"save_folder {_save_dir(cfg)}: {exc}. To continue that run use autoresume=true "
                          "or load_path=; or pick another save_folder") from exc
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as exc:
        text = str(exc)
        unreadable = isinstance(exc, (EOFError, pickle.UnpicklingError)) or (
            isinstance(exc, OSError) and exc.errno == errno.EINVAL) or any(
            k in text for k in ("PytorchStreamReader", "zip archive", "Ran out of input", "invalid load key"))
        if not unreadable or not (cfg["load_path"] or cfg["autoresume"]):
            raise
        path = cfg["load_path"] or _latest_checkpoint(cfg)
        first = (text.splitlines() or [""])[0]
        raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {first}): "
                          "a run killed while saving leaves a partial file; delete it and resume from the "
                          "previous checkpoint (load_path=...)") from exc


def _latest_checkpoint(cfg: dict[str, Any]) -> str | None:
    folder = _save_dir(cfg)
    if not folder:
        return None
    _, rank, _ = _world()
    link = Path(folder) / f"latest-rank{rank}.pt"
    if link.exists():
        return str(link.resolve())
    files = _checkpoints(folder, rank)
    return str(files[-1]) if files else None


def _print_summary(s: dict[str, Any]) -> None:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    print(f"done: {s['batches']} batches, {s['samples']} samples, {f(s['wall_s'], '.1f')} s; "
          f"loss {f(s['loss_first5_mean'], '.4f')} (first 5) -> {f(s['loss_last5_mean'], '.4f')} (last 5); "
          f"img/s {f(s['img_per_s_last'], '.1f')} (SpeedMonitor, last window of {s['speed_monitor_window']}); "
          f"MFU {f(s['mfu_last'] and 100 * s['mfu_last'], '.1f')}%", flush=True)
