"""The training loop: fixed seeds, a pool of samples, early stopping on validation loss.

Every run writes `<checkpoint>.run.json` beside its checkpoint: the full TrainConfig, the data split
(item ids per part, with digests), versions and timing. `retrain(run_json, out)` repeats the run
from that record and refuses if the data no longer gives the recorded split.

A `checkpoint_hook(epoch, state)` receives, after each epoch, everything a later `train(...,
resume_state=state)` needs to go on as if never stopped: weights (last and best), optimizer,
scheduler, early-stopping counters, history and both random generators. The state holds only
tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)` reads it back.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blastq.core.common import InvalidConfig, InvalidDataset, atomic_write, file_sha256
from blastq.core.image import PreprocessConfig
from blastq.core.segment import ModelInfo, UNet, save_checkpoint, to_model_input
from blastq.core.synth import STAIN_FAMILIES, VARIETIES
from blastq.trainer.augment import random_patch
from blastq.trainer.datasets import (
    IGNORE,
    WBC_DATASETS,
    WIDE_MPP_RANGE,
    Sample,
    name_split,
    pairs_items,
    pairs_sample,
    read_labelmap,
    segmentation_wbc_items,
    synth_sample,
    wbc_sample,
    wbc_split,
)
from blastq.trainer.defaults import TRAIN_DEFAULTS
from blastq.trainer.losses import segmentation_loss

# Seeds of synthetic fields: training draws from [0, 1e6), validation from [1e6, 2e6), the fixed
# synthetic test set from 9e6 on (trainer/SPLIT.md), so they never overlap.
SYNTH_TRAIN_SEED0 = 0
SYNTH_VAL_SEED0 = 1_000_000
SYNTH_TEST_SEED0 = 9_000_000
RUN_FORMAT = "blastq-run/1"
RESUME_FORMAT = "blastq-resume/1"
# Settings that may differ between a run and its resumption: where the checkpoint goes, and how fast.
RESUME_FREE = ("out", "threads", "device")
SPLITS = ("train", "val", "test")
SYNTH_VARIETIES = (*VARIETIES, "mixed")


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    version: str = TRAIN_DEFAULTS["version"]
    wbc_root: Path | None = None  # segmentation_wbc folder; None trains on synthetic data only
    # Which of its sources to train on: leave one out to measure the model on a lab it never saw.
    wbc_datasets: tuple[str, ...] = WBC_DATASETS
    pairs_dirs: tuple[Path, ...] = ()  # folders of image/mask pairs, each with a labelmap.json
    synth_train: int = TRAIN_DEFAULTS["synth_train"]  # synthetic fields in the training pool
    synth_val: int = 24
    synth_size_px: int = 320
    # "classic" (the generator's own look), "wide" (domain-randomised: datasets.synth_sample) or "mixed".
    synth_variety: str = TRAIN_DEFAULTS["synth_variety"]
    # The stain families and the magnifications (um/px) wide fields are drawn in: leave some out to
    # measure the model on a stain or a magnification it never saw.
    synth_families: tuple[str, ...] = STAIN_FAMILIES
    synth_mpp_min: float = WIDE_MPP_RANGE[0]
    synth_mpp_max: float = WIDE_MPP_RANGE[1]
    # Start from this checkpoint's weights (same depth and width) instead of random ones: fine-tuning.
    init_from: Path | None = None
    model_mpp: float = 0.2
    depth: int = TRAIN_DEFAULTS["depth"]
    width: int = TRAIN_DEFAULTS["width"]
    patch_px: int = 160
    batch_size: int = 12
    steps_per_epoch: int = TRAIN_DEFAULTS["steps_per_epoch"]
    max_epochs: int = TRAIN_DEFAULTS["max_epochs"]
    patience: int = TRAIN_DEFAULTS["patience"]  # epochs without a better validation loss before stopping
    lr: float = TRAIN_DEFAULTS["lr"]
    seed: int = TRAIN_DEFAULTS["seed"]
    threads: int = 0  # 0: torch's default
    device: str = "cpu"  # cpu or cuda[:N]; CUDA trains in mixed precision
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs_dirs", tuple(Path(p) for p in self.pairs_dirs))
        if self.patch_px % 2 ** (self.depth - 1):
            raise InvalidConfig(f"patch_px={self.patch_px} must be a multiple of {2 ** (self.depth - 1)}")
        if self.synth_variety not in SYNTH_VARIETIES:
            raise InvalidConfig(
                f"synth_variety={self.synth_variety!r}: expected one of {', '.join(SYNTH_VARIETIES)}"
            )
        object.__setattr__(self, "synth_families", tuple(self.synth_families))
        strange = sorted(set(self.synth_families) - set(STAIN_FAMILIES))
        if strange or not self.synth_families:
            raise InvalidConfig(
                f"synth_families={list(self.synth_families)}: choose from {', '.join(STAIN_FAMILIES)}"
            )
        if not 0.02 <= self.synth_mpp_min <= self.synth_mpp_max <= 2.0:
            raise InvalidConfig(
                f"synth_mpp_min={self.synth_mpp_min}, synth_mpp_max={self.synth_mpp_max}: expected "
                "0.02 <= min <= max <= 2 um/px"
            )
        if self.init_from is not None:
            object.__setattr__(self, "init_from", Path(self.init_from))
        object.__setattr__(self, "wbc_datasets", tuple(self.wbc_datasets))
        unknown = sorted(set(self.wbc_datasets) - set(WBC_DATASETS))
        if unknown or not self.wbc_datasets:
            raise InvalidConfig(
                f"wbc_datasets={list(self.wbc_datasets)}: choose from {', '.join(WBC_DATASETS)}"
            )
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InvalidConfig(f"device={self.device!r}: expected cpu, cuda or cuda:N")
        if self.synth_train < 1 and self.wbc_root is None and not self.pairs_dirs:
            raise InvalidConfig(
                "nothing to train on: give synthetic fields, a segmentation_wbc folder or pairs folders"
            )

    def to_dict(self) -> dict[str, Any]:
        """Every setting as JSON values, paths as absolute strings."""
        data = asdict(self)
        data["out"] = str(Path(self.out).absolute())
        data["wbc_root"] = None if self.wbc_root is None else str(Path(self.wbc_root).absolute())
        data["pairs_dirs"] = [str(Path(p).absolute()) for p in self.pairs_dirs]
        data["init_from"] = None if self.init_from is None else str(Path(self.init_from).absolute())
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> TrainConfig:
        """A config from `to_dict`'s form (missing settings take their defaults); overrides win."""
        if not isinstance(data, Mapping):
            raise InvalidConfig(f"a training config is a JSON object, got {type(data).__name__}")
        kinds = {f.name: str(f.type) for f in fields(cls)}
        merged = {**data, **overrides}
        unknown = sorted(set(merged) - set(kinds))
        if unknown:
            raise InvalidConfig(f"unknown training setting(s) {unknown}; known: {sorted(kinds)}")
        if "out" not in merged:
            raise InvalidConfig("a training config needs 'out' (the checkpoint to write)")
        return cls(**{name: _coerce(name, kinds[name], value) for name, value in merged.items()})

    @classmethod
    def from_json(cls, path: Path, **overrides: Any) -> TrainConfig:
        """Read a config file: a `to_dict` object, or a run record (its recorded config)."""
        data = _read_json(Path(path), "training config")
        if isinstance(data, dict) and data.get("format") == RUN_FORMAT:
            data = data.get("config")
        return cls.from_dict(data, **overrides)

    @classmethod
    def from_run(cls, run: Path | Mapping[str, Any], **overrides: Any) -> TrainConfig:
        """The config a run record (`<checkpoint>.run.json`, or its parsed dict) was trained with."""
        return cls.from_dict(read_run_record(run)["config"], **overrides)


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_val_loss: float
    history: tuple[EpochLog, ...]
    run_record: Path | None = None


def _coerce(name: str, kind: str, value: Any) -> Any:
    """A JSON value as the type of TrainConfig field `name` (annotation `kind`), or InvalidConfig."""

    def bad(expected: str) -> InvalidConfig:
        return InvalidConfig(f"training setting {name}={value!r}: expected {expected}")

    if value is None and "None" in kind:
        return None
    if kind in ("Path", "Path | None"):
        if not isinstance(value, str | Path):
            raise bad("a path")
        return Path(value)
    if kind == "tuple[str, ...]":
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise bad("a list of names")
        return tuple(value)
    if kind == "tuple[Path, ...]":
        if isinstance(value, str | Path) or not all(isinstance(v, str | Path) for v in value):
            raise bad("a list of paths")
        return tuple(Path(v) for v in value)
    if kind == "PreprocessConfig":
        if isinstance(value, PreprocessConfig):
            return value
        if not isinstance(value, Mapping):
            raise bad("an object of preprocessing settings")
        try:
            return PreprocessConfig(**value)
        except TypeError as exc:
            raise bad(f"preprocessing settings ({exc})") from exc
    if isinstance(value, bool):
        raise bad(kind)
    if kind == "int" and isinstance(value, int):
        return value
    if kind == "float" and isinstance(value, int | float):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    raise bad(kind)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidConfig(f"cannot read {what} {path}: {exc}") from exc


def _id_list(ids: list[str]) -> dict[str, Any]:
    return {"count": len(ids), "sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(), "ids": ids}


def split_manifest(cfg: TrainConfig) -> dict[str, Any]:
    """Which data is train, val and test for this config (trainer/SPLIT.md), with a digest of it all.

    Lists file ids (never pixels); the digest leaves out where the folders are, so the same data
    moved elsewhere has the same split.
    """
    s0 = SYNTH_TRAIN_SEED0 + cfg.seed * 10_000
    v0 = SYNTH_VAL_SEED0 + cfg.seed * 10_000
    parts: dict[str, Any] = {
        "rule": "trainer/SPLIT.md",
        "synthetic": {
            "size_px": cfg.synth_size_px,
            "mpp": cfg.model_mpp,
            "train": {"first_seed": s0, "count": cfg.synth_train},
            "val": {"first_seed": v0, "count": cfg.synth_val},
            "test": {"first_seed": SYNTH_TEST_SEED0, "count": None},  # evaluation's set, not loaded here
        },
    }
    if cfg.wbc_root is not None:
        items = segmentation_wbc_items(cfg.wbc_root, datasets=cfg.wbc_datasets)
        parts["segmentation_wbc"] = {
            sp: _id_list([f"{it.dataset}/{it.image_path.name}" for it in items if wbc_split(it.number) == sp])
            for sp in SPLITS
        }
    if cfg.pairs_dirs:
        parts["pairs"] = []
        for folder in cfg.pairs_dirs:
            names = [it.name for it in pairs_items(folder)]
            entry: dict[str, Any] = {
                "folder": Path(folder).name,
                "labelmap_sha256": read_labelmap(folder).sha256,
            }
            entry.update({sp: _id_list([n for n in names if name_split(n) == sp]) for sp in SPLITS})
            parts["pairs"].append(entry)
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"sha256": digest, **parts}


def run_record_path(checkpoint: Path) -> Path:
    """Where train() writes the run record of a checkpoint: NAME.pt -> NAME.run.json."""
    return Path(checkpoint).with_suffix(".run.json")


def read_run_record(run: Path | Mapping[str, Any]) -> dict[str, Any]:
    """A run record, checked to be one (from its path or already parsed)."""
    data = dict(run) if isinstance(run, Mapping) else _read_json(Path(run), "run record")
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT or "config" not in data:
        raise InvalidConfig(
            f"not a blastq run record (format {RUN_FORMAT}): {run if not isinstance(run, Mapping) else 'dict'}"
        )
    return data


def _code_versions() -> dict[str, str]:
    try:
        blastq = package_version("blastq")
    except PackageNotFoundError:
        blastq = "unknown"
    return {
        "blastq": blastq,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": str(torch.get_num_threads()),
    }


def _trained_on(cfg: TrainConfig, split_sha256: str, run_path: Path) -> str:
    s0 = SYNTH_TRAIN_SEED0 + cfg.seed * 10_000
    variety = "" if cfg.synth_variety == "classic" else f"{cfg.synth_variety} "
    if cfg.synth_variety != "classic":
        if cfg.synth_families != STAIN_FAMILIES:
            variety += f"({', '.join(cfg.synth_families)} stains only) "
        if (cfg.synth_mpp_min, cfg.synth_mpp_max) != WIDE_MPP_RANGE:
            variety += f"({cfg.synth_mpp_min:g}-{cfg.synth_mpp_max:g} um/px only) "
    parts = (
        [f"{cfg.synth_train} {variety}synthetic fields (seeds {s0}..{s0 + cfg.synth_train - 1})"]
        if cfg.synth_train
        else []
    )
    if cfg.wbc_root is not None:
        only = "" if cfg.wbc_datasets == WBC_DATASETS else f" ({', '.join(cfg.wbc_datasets)} only)"
        parts.append(f"segmentation_wbc train split{only}")
    parts += [f"pairs folder {Path(d).name} train split" for d in cfg.pairs_dirs]
    start = "" if cfg.init_from is None else f"; fine-tuned from {file_sha256(cfg.init_from)[:16]}"
    return (
        f"{' + '.join(parts)}; split sha256 {split_sha256[:16]}, seed {cfg.seed}{start}, "
        f"run record {run_path.name}"
    )


def _initial_weights(cfg: TrainConfig) -> UNet:
    """The checkpoint to fine-tune from, checked to fit the run: same architecture, scale, preprocessing."""
    start, info = UNet.from_checkpoint(Path(cfg.init_from))
    if (start.depth, start.width) != (cfg.depth, cfg.width):
        raise InvalidConfig(
            f"init_from {cfg.init_from}: a U-Net of depth {start.depth}, width {start.width}; this run "
            f"trains depth {cfg.depth}, width {cfg.width}"
        )
    if abs(info.mpp - cfg.model_mpp) > 1e-9 or info.preprocess != asdict(cfg.preprocess):
        raise InvalidConfig(f"init_from {cfg.init_from}: trained at another scale or preprocessing")
    return start


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=1))


def _pool(cfg: TrainConfig, split: str, progress: Callable[[str], None]) -> list[Sample]:
    n_synth = cfg.synth_train if split == "train" else cfg.synth_val
    seed0 = SYNTH_TRAIN_SEED0 if split == "train" else SYNTH_VAL_SEED0
    samples = [
        synth_sample(
            seed0 + cfg.seed * 10_000 + i,
            cfg.synth_size_px,
            cfg.model_mpp,
            cfg.preprocess,
            cfg.synth_variety,
            families=cfg.synth_families,
            mpp_range=(cfg.synth_mpp_min, cfg.synth_mpp_max),
        )
        for i in range(n_synth)
    ]
    if cfg.wbc_root is not None:
        samples += [
            wbc_sample(it, cfg.model_mpp, cfg.preprocess)
            for it in segmentation_wbc_items(cfg.wbc_root, split, datasets=cfg.wbc_datasets)
        ]
    for folder in cfg.pairs_dirs:
        samples += [pairs_sample(it, cfg.model_mpp, cfg.preprocess) for it in pairs_items(folder, split)]
    progress(f"{split}: {len(samples)} samples")
    if not samples:
        raise InvalidDataset(f"no {split} samples: add synthetic fields or data with a {split} split")
    return samples


def _batch(samples: list[Sample], indices, size: int, rng: np.random.Generator):
    patches = [random_patch(samples[i], size, rng) for i in indices]
    # channels_last: ~1.6x faster convolutions on CPU (oneDNN) for the same numbers.
    x = torch.from_numpy(to_model_input(np.stack([p[0] for p in patches]))).contiguous(
        memory_format=torch.channels_last
    )
    targets = [torch.from_numpy(np.stack([p[k] for p in patches])) for k in (1, 2, 3)]
    if any(len(p) > 4 for p in patches):
        # Patches of fully labelled samples need no foreground: their classes say it everywhere.
        fg = [p[4] if len(p) > 4 else np.full_like(p[1], IGNORE) for p in patches]
        targets.append(torch.from_numpy(np.stack(fg)))
    return x, targets


def _pick(samples: list[Sample], n: int, rng: np.random.Generator) -> np.ndarray:
    # Half the batch from each source family, so ~300 real crops are not drowned by synthetic fields.
    real = [i for i, s in enumerate(samples) if s.source != "synthetic"]
    synth = [i for i, s in enumerate(samples) if s.source == "synthetic"]
    if not real or not synth:
        return rng.integers(0, len(samples), n)
    half = n // 2
    return np.concatenate([rng.choice(real, half), rng.choice(synth, n - half)])


def train(
    cfg: TrainConfig,
    progress: Callable[[str], None] = print,
    *,
    checkpoint_hook: Callable[[int, dict[str, Any]], None] | None = None,
    resume_state: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train a U-Net; the best checkpoint by validation loss is written to cfg.out, its run record beside it.

    `checkpoint_hook(epoch, state)` is called after every epoch with a resume state (copied, so it
    may be kept); `resume_state` continues a run from one, with the same results as never stopping.
    """
    started, t_start = _now(), time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if resume_state is not None:
        _check_resume_state(cfg, resume_state)
    split = split_manifest(cfg)
    run_path = run_record_path(cfg.out)
    record: dict[str, Any] = {
        "format": RUN_FORMAT,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "split": split,
        "code": _code_versions(),
        "timing": {"started_utc": started, "finished_utc": None, "data_seconds": None, "seconds": None},
        "result": None,  # filled when training ends; None in the record of a run that was killed
        "history": [],
    }
    _write_json(run_path, record)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train_pool = _pool(cfg, "train", progress)
    val_pool = _pool(cfg, "val", progress)
    # Validation patches are drawn once with a fixed generator: the same patches every epoch.
    val_rng = np.random.default_rng(cfg.seed + 1)
    val_batches = [
        _batch(val_pool, range(i, min(i + cfg.batch_size, len(val_pool))), cfg.patch_px, val_rng)
        for i in range(0, len(val_pool), cfg.batch_size)
    ]
    record["timing"]["data_seconds"] = round(time.perf_counter() - t_start, 1)
    device = torch.device(cfg.device)
    model = UNet(depth=cfg.depth, width=cfg.width).to(memory_format=torch.channels_last)
    if cfg.init_from is not None and resume_state is None:
        model.load_state_dict(_initial_weights(cfg).state_dict())
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.max_epochs * cfg.steps_per_epoch, pct_start=0.1
    )
    amp = _Precision(device)
    best, best_epoch, stale, history, sha256 = float("inf"), 0, 0, [], ""
    best_weights: dict[str, torch.Tensor] | None = None
    info = ModelInfo(
        version=cfg.version,
        mpp=cfg.model_mpp,
        preprocess=asdict(cfg.preprocess),
        trained_on=_trained_on(cfg, split["sha256"], run_path),
    )
    first_epoch = 1
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        amp.load_state_dict(resume_state.get("scaler") or {})
        best, best_epoch, stale = (
            float(resume_state["best_val_loss"]),
            int(resume_state["best_epoch"]),
            int(resume_state["stale"]),
        )
        history = [EpochLog(**h) for h in resume_state["history"]]
        rng.bit_generator.state = _numpy_state(resume_state["numpy_rng"])
        torch.set_rng_state(resume_state["torch_rng"].cpu())
        if "cuda_rng" in resume_state and device.type == "cuda":
            torch.cuda.set_rng_state(resume_state["cuda_rng"].cpu(), device)
        best_weights = resume_state.get("best_model")
        if best_weights is not None:
            # The best epoch may be behind us: its checkpoint file belonged to the stopped process.
            best_model = UNet(depth=cfg.depth, width=cfg.width)
            best_model.load_state_dict(best_weights)
            sha256 = save_checkpoint(cfg.out, best_model, info)
        first_epoch = int(resume_state["epoch"]) + 1
        progress(f"resuming after epoch {first_epoch - 1}")
    stopped = stale >= cfg.patience
    for epoch in range(first_epoch, cfg.max_epochs + 1):
        if stopped:
            break
        t0 = time.perf_counter()
        model.train()
        losses = []
        for _ in range(cfg.steps_per_epoch):
            x, targets = _batch(train_pool, _pick(train_pool, cfg.batch_size, rng), cfg.patch_px, rng)
            x, targets = x.to(device), [t.to(device) for t in targets]
            with amp.autocast():
                loss, _ = segmentation_loss(model(x), *targets)
            opt.zero_grad(set_to_none=True)
            amp.step(loss, opt)
            sched.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad(), amp.autocast():
            val = float(
                np.mean(
                    [
                        segmentation_loss(model(x.to(device)), *(t.to(device) for t in ts))[0].item()
                        for x, ts in val_batches
                    ]
                )
            )
        log = EpochLog(
            epoch, round(float(np.mean(losses)), 4), round(val, 4), round(time.perf_counter() - t0, 1)
        )
        history.append(log)
        progress(f"epoch {epoch}: train {log.train_loss:.4f} val {log.val_loss:.4f} ({log.seconds}s)")
        if val < best:
            best, best_epoch, stale = val, epoch, 0
            sha256 = save_checkpoint(cfg.out, model, info)
            if checkpoint_hook is not None:
                best_weights = _cpu_copy(model.state_dict())
        else:
            stale += 1
            stopped = stale >= cfg.patience
        if checkpoint_hook is not None:
            checkpoint_hook(
                epoch,
                _resume_state(cfg, epoch, model, opt, sched, amp, best, best_epoch, stale, history, rng)
                | {"best_model": best_weights},
            )
        if stopped:
            progress(f"early stop: no better validation loss for {cfg.patience} epochs")
    history_path = Path(cfg.out).with_suffix(".history.json")
    history_path.write_text(json.dumps([asdict(h) for h in history], indent=1))
    record["history"] = [asdict(h) for h in history]
    record["result"] = {
        "checkpoint": Path(cfg.out).name,
        "checkpoint_sha256": sha256,
        "best_epoch": best_epoch,
        "best_val_loss": round(best, 4),
        "epochs_run": len(history),
        "stopped_early": len(history) < cfg.max_epochs,
    }
    record["timing"].update(finished_utc=_now(), seconds=round(time.perf_counter() - t_start, 1))
    _write_json(run_path, record)
    return TrainResult(Path(cfg.out), best_epoch, round(best, 4), tuple(history), run_path)


class _Precision:
    """Mixed precision on CUDA (bfloat16 where supported, else float16 with loss scaling); CPU: float32."""

    def __init__(self, device: torch.device):
        self.device = device
        self.dtype: torch.dtype | None = None
        if device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # bfloat16 has float32's range: only float16 gradients need scaling to not underflow.
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            opt.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else dict(self.scaler.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(dict(state))


def _cpu_copy(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def _plain(value: Any) -> Any:
    """numpy scalars, tuples and nested containers as plain Python values (for weights_only loading)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _numpy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in state.items()}


def _resume_state(
    cfg, epoch, model, opt, sched, amp, best, best_epoch, stale, history, rng
) -> dict[str, Any]:
    """Everything `train(resume_state=...)` needs to continue after `epoch`, copied off the device."""
    optimizer = copy.deepcopy(opt.state_dict())
    for slot in optimizer["state"].values():
        for name, value in slot.items():
            if isinstance(value, torch.Tensor):
                slot[name] = value.detach().cpu()
    state: dict[str, Any] = {
        "format": RESUME_FORMAT,
        "config": _plain(cfg.to_dict()),
        "epoch": epoch,
        "model": _cpu_copy(model.state_dict()),
        "optimizer": optimizer,
        "scheduler": _plain(sched.state_dict()),
        "scaler": _plain(amp.state_dict()),
        "best_val_loss": float(best),
        "best_epoch": best_epoch,
        "stale": stale,
        "history": [asdict(h) for h in history],
        "numpy_rng": _plain(rng.bit_generator.state),
        "torch_rng": torch.get_rng_state(),
    }
    if amp.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(amp.device)
    return state


def _check_resume_state(cfg: TrainConfig, state: Mapping[str, Any]) -> None:
    """Refuse a resume state that is not one, or that belongs to a differently configured run."""
    if not isinstance(state, Mapping) or state.get("format") != RESUME_FORMAT:
        raise InvalidConfig(f"not a blastq resume state (format {RESUME_FORMAT})")
    recorded = {k: v for k, v in dict(state.get("config") or {}).items() if k not in RESUME_FREE}
    ours = {k: v for k, v in _plain(cfg.to_dict()).items() if k not in RESUME_FREE}
    differ = sorted(k for k in ours.keys() | recorded.keys() if ours.get(k) != recorded.get(k))
    if differ:
        raise InvalidConfig(f"the resume state is of a run with other settings: {', '.join(differ)} differ")


def retrain(run: Path, out: Path, progress: Callable[[str], None] = print, **overrides: Any) -> TrainResult:
    """Repeat a recorded run into `out` (overrides: e.g. data folders that moved).

    Refuses if the data no longer gives the recorded split, since the run would not be the same.
    """
    record = read_run_record(run)
    cfg = TrainConfig.from_run(record, out=Path(out), **overrides)
    if Path(out).absolute() == Path(record["config"]["out"]):
        raise InvalidConfig(f"retrain would overwrite the checkpoint it reproduces: {out}")
    split = split_manifest(cfg)
    recorded = record.get("split", {})
    if split["sha256"] != recorded.get("sha256"):
        changed = sorted(
            k
            for k in split.keys() - {"sha256"} | recorded.keys() - {"sha256"}
            if split.get(k) != recorded.get(k)
        )
        raise InvalidDataset(
            f"the data no longer gives the split recorded in {run}: {', '.join(changed)} differ"
        )
    versions = record.get("code", {})
    now = _code_versions()
    differ = [
        f"{k} {versions.get(k)} -> {now[k]}"
        for k in ("blastq", "torch", "numpy")
        if versions.get(k) != now[k]
    ]
    if differ:
        progress(f"note: recorded with other versions ({'; '.join(differ)}); losses may differ slightly")
    return train(cfg, progress)
