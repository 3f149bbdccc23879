"""Training configuration: defaults, YAML loading (by path or packaged name), dotted overrides.

A config is a nested dict. Every key a YAML file or an override may set exists in
:data:`DEFAULTS` (``model`` also accepts every ``DiTConfig`` field, e.g. ``model.depth=4``);
an unknown key is an error that lists the valid keys at that level. ``parallelism_config``
is passed to Composer as is (e.g. ``{fsdp: {sharding_strategy: FULL_SHARD}}``).

Overrides are ``key.sub=value`` strings; the value is parsed as YAML (``true``, ``8ba``,
``[0.9, 0.95]``, ``null``) and converted to the type of the default when that is a number
(``optimizer.lr=1e-4`` is a float even though YAML 1.1 reads it as a string).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

FREEFORM = {"parallelism_config"}  # passed through unvalidated

DEFAULTS: dict[str, Any] = {
    "run_name": None,  # Composer run name (needed by autoresume); default: config name
    "seed": 17,  # seeds init, data shuffle and the per-batch training generators
    "model": {
        "preset": "tiny",  # a ditperf.model.PRESETS name
        "backend": "torch",  # torch | triton (ditperf kernels)
        "attention_backend": None,  # torch | triton | null (= backend): per-op switch for attention
        "compile": False,  # torch.compile the DiT
        # + any DiTConfig field (depth, edit, conditioning, num_classes, text_dim, ...)
    },
    "data": {
        "local": None,  # dataset folder (or the local cache when remote is set)
        "remote": None,  # optional Streaming remote (s3://..., gs://..., /path)
        "shuffle": True,
        "shuffle_seed": None,  # default: seed
        "num_workers": 2,  # DataLoader workers per rank
        "prefetch_factor": 2,
        "persistent_workers": True,
        "verify": "auto",  # auto | hashes | size | none: pre-flight check of the shards
        "edit_task": "mixed",  # edit configs: inpaint | outpaint | expand | mixed
        "predownload": None,
        "cache_limit": None,  # e.g. 100gb (remote datasets)
    },
    "global_train_batch_size": 32,  # across all ranks; must divide by the world size
    "device_train_microbatch_size": None,  # None = the device batch; an int or "auto" (GPU)
    "max_duration": "100ba",  # Composer time string: 8ba, 2ep, ... (also sets the LR schedule length)
    "stop_at": None,  # stop cleanly (with a checkpoint) at this time, keeping max_duration's schedule
    "precision": "auto",  # auto (amp_bf16 on GPU, fp32 on CPU) | fp32 | amp_bf16 | amp_fp16
    "device": "auto",  # auto | cpu | gpu
    "torch_threads": None,  # torch intra-op threads during training (None: torch's default)
    # Composer's deterministic_mode: torch.use_deterministic_algorithms, deterministic cuDNN and
    # cuBLAS (for bit-exact GPU resumes; slower; an op without a deterministic kernel errors)
    "deterministic": False,
    "optimizer": {  # Composer DecoupledAdamW
        "lr": 1.0e-4,
        "betas": [0.9, 0.999],
        "eps": 1.0e-8,
        "weight_decay": 0.0,
    },
    "scheduler": {  # Composer CosineAnnealingWithWarmupScheduler
        "t_warmup": "10ba",
        "alpha_f": 0.1,  # final lr = alpha_f * lr
    },
    "ema": {
        "enabled": True,
        "half_life": "1000ba",
    },
    "grad_clip_norm": 1.0,  # Composer GradientClipping (norm); null or 0 disables
    "loss": {
        "cond_dropout": 0.1,  # CFG: probability of the null conditioning per sample
        "edit_region_only": False,
        "t_mean": 0.0,  # logit-normal timestep sampling
        "t_std": 1.0,
    },
    "save_folder": None,
    "save_interval": "1000ba",
    "save_num_checkpoints_to_keep": -1,
    "save_overwrite": False,
    "load_path": None,
    "load_weights_only": False,
    "autoresume": False,
    "console_log_interval": "1ba",
    "progress_bar": False,
    "summary_file": None,  # JSON summary (loss, img/s, MFU); default: <save_folder>/train_summary.json
    "callbacks": {
        "speed_monitor": {"enabled": True, "window_size": 10, "gpu_flops_available": None},
        "lr_monitor": True,
        "memory_monitor": "auto",  # auto = on a GPU
        # NVML power (ditperf.profiling.PowerCallback); auto = on a GPU; report in out_dir
        # (default <save_folder>/power)
        "power": {"enabled": "auto", "interval_s": 0.05, "log_interval": 10, "out_dir": None},
    },
    "parallelism_config": None,
    "fsdp_version": "auto",  # auto | 1 | 2: how the fsdp section runs (auto: $FSDP_VERSION, else 1 on GPU, 2 on CPU)
    "debug": {
        "nan_at_batch": None,  # test hook: make the loss NaN at this (0-based) batch index
        "inf_grad_at_batch": None,  # test hook: an infinite gradient (finite loss) at this batch index
        "param_digest": False,  # write <save_folder>/param_digest-rank<r>.json: param/EMA sha256, sample ids
    },
}

PACKAGE_CONFIGS = "configs"


class ConfigError(ValueError):
    """A bad config file or override (the message says which key and what is valid)."""


def model_fields() -> list[str]:
    from ditperf.model.config import DiTConfig

    return [f.name for f in dataclasses.fields(DiTConfig) if f.name != "name"]


def packaged_configs() -> list[str]:
    """Names of the configs shipped in ``ditperf/trainer/configs/``."""
    root = resources.files("ditperf.trainer") / PACKAGE_CONFIGS
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> tuple[str, str]:
    """(text, source) of a config given as a file path or a packaged name (``tiny-cpu``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text(), str(path)
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") or str(path.parent) in ("trainer/configs", "configs"):
        res = resources.files("ditperf.trainer") / PACKAGE_CONFIGS / f"{name}.yaml"
        if res.is_file():
            return res.read_text(), f"ditperf:{name}"
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a packaged config; "
                      f"packaged: {', '.join(packaged_configs())}")


def _valid_keys(defaults: dict[str, Any], path: str) -> list[str]:
    keys = list(defaults)
    if path == "model":
        keys += model_fields()
    return keys


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Parse strings that YAML 1.1 leaves as strings (1e-4) and match the default's type."""
    numeric = (isinstance(default, (int, float)) and not isinstance(default, bool)) or (
        default is None and key.startswith("model."))
    if numeric and isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip()):
        value = float(value) if any(c in value for c in ".eE") else int(value)
    if isinstance(default, bool) or default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return value


def _merge(base: dict[str, Any], update: dict[str, Any], defaults: dict[str, Any], path: str) -> None:
    for key, value in update.items():
        full = f"{path}.{key}" if path else key
        valid = _valid_keys(defaults, path)
        if key not in valid:
            raise ConfigError(f"unknown config key {full!r}; valid keys{' under ' + path if path else ''}: "
                              f"{', '.join(valid)}")
        default = defaults.get(key)
        if full in FREEFORM:
            base[key] = copy.deepcopy(value)
        elif isinstance(default, dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping with keys {', '.join(_valid_keys(default, full))}, "
                                  f"got {value!r}")
            base.setdefault(key, {})
            _merge(base[key], value, default, full)
        else:
            base[key] = _coerce(value, default, full)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1e-4"`` -> (["a", "b"], "1e-4" parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. max_duration=8ba)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(name_or_path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Defaults <- YAML file (path or packaged name) <- ``key=value`` overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    source = "defaults"
    if name_or_path:
        text, source = resolve_config_path(name_or_path)
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({exc})") from exc
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: the top level must be a mapping")
        try:
            _merge(cfg, doc, DEFAULTS, "")
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if cfg["run_name"] is None:
            cfg["run_name"] = Path(source.split(":")[-1]).stem
    for text in overrides:
        parts, value = parse_override(text)
        _merge(cfg, nest(parts, value), DEFAULTS, "")
    cfg["_source"] = source
    return cfg


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (free-form sections stay whole)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in FREEFORM:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def describe_keys() -> str:
    """One line per valid key with its default (for ``ditperf train --list-keys``)."""
    lines = [f"{k} = {v!r}" for k, v in flatten(DEFAULTS).items()]
    lines.append("model.<DiTConfig field> = preset value  (" + ", ".join(model_fields()) + ")")
    return "\n".join(lines)


def _time_string(key: str, value: Any) -> None:
    from composer.core import Time

    try:
        Time.from_timestring(str(value))
    except (ValueError, TypeError):
        raise ConfigError(f"{key}={value!r} is not a Composer time string; expected a number with a unit, "
                          "e.g. 8ba (batches), 2ep (epochs), 1000sp (samples)") from None


def validate_values(cfg: dict[str, Any]) -> None:
    """Value checks the key/type merge cannot make: time strings, ranges, choices, paths.
    Raises :class:`ConfigError` naming the key, before Composer would fail with a traceback."""
    for key in ("max_duration", "console_log_interval"):
        _time_string(key, cfg[key])
    if cfg.get("stop_at"):
        _time_string("stop_at", cfg["stop_at"])
    if cfg["save_folder"]:
        _time_string("save_interval", cfg["save_interval"])
        folder = Path(str(cfg["save_folder"]))
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"save_folder {folder} exists and is not a folder")
    _time_string("scheduler.t_warmup", cfg["scheduler"]["t_warmup"])
    if cfg["ema"]["enabled"]:
        _time_string("ema.half_life", cfg["ema"]["half_life"])
    gbs = cfg["global_train_batch_size"]
    if isinstance(gbs, bool) or not isinstance(gbs, int):
        raise ConfigError(f"global_train_batch_size must be a whole number, got {gbs!r}")
    if not isinstance(cfg["deterministic"], bool):
        raise ConfigError(f"deterministic must be true or false, got {cfg['deterministic']!r}")
    micro = cfg["device_train_microbatch_size"]
    if micro is not None and micro != "auto" and (isinstance(micro, bool) or not isinstance(micro, int) or micro < 1):
        raise ConfigError(f"device_train_microbatch_size must be a positive whole number, 'auto' (GPU) or null "
                          f"(= the device batch), got {micro!r}")
    def number(v: object) -> bool:  # bools are ints to Python: "lr=yes" must not train at lr 1.0
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    o = cfg["optimizer"]
    if not (number(o["lr"]) and o["lr"] >= 0):
        raise ConfigError(f"optimizer.lr must be a finite number >= 0, got {o['lr']!r}")
    if not (number(o["eps"]) and o["eps"] > 0):
        raise ConfigError(f"optimizer.eps must be > 0, got {o['eps']!r}")
    if not (number(o["weight_decay"]) and o["weight_decay"] >= 0):
        raise ConfigError(f"optimizer.weight_decay must be >= 0, got {o['weight_decay']!r}")
    betas = o["betas"]
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {betas!r}")
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int):
        raise ConfigError(f"seed must be a whole number, got {cfg['seed']!r}")
    loss = cfg["loss"]
    if not (number(loss["cond_dropout"]) and 0 <= loss["cond_dropout"] <= 1):
        raise ConfigError(f"loss.cond_dropout must be a probability in [0, 1], got {loss['cond_dropout']!r}")
    if not number(loss["t_mean"]):
        raise ConfigError(f"loss.t_mean must be a finite number, got {loss['t_mean']!r}")
    if not (number(loss["t_std"]) and loss["t_std"] >= 0):
        raise ConfigError(f"loss.t_std must be a finite number >= 0, got {loss['t_std']!r}")
    clip = cfg["grad_clip_norm"]
    if clip is not None and clip is not False and not (number(clip) and clip >= 0):
        raise ConfigError(f"grad_clip_norm must be a number >= 0 or null (off), got {clip!r}")
    from ditperf.model import EDIT_TASKS

    task = cfg["data"]["edit_task"]
    if task not in (None, "mixed", *EDIT_TASKS):
        raise ConfigError(f"data.edit_task must be one of {', '.join((*EDIT_TASKS, 'mixed'))}, got {task!r}")
