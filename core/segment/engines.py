"""Inference engines: one small interface, several back ends.

An engine takes a batch of NCHW float32 tiles (already scaled by `unet.to_model_input`) and returns
NCHW float32 logits with `unet.N_OUTPUTS` channels. Callers never know which back end runs:

- `TorchEngine`: eager PyTorch on CPU or CUDA; fp16 autocast and torch.compile on CUDA.
- `OnnxEngine`: ONNX Runtime (CPU, CUDA where its provider is installed) on an ONNX export, or on the
  int8 quantised one (`onnx-int8`: core.segment.quantize).
- `TensorRTEngine`: torch-tensorrt (the `tensorrt` extra), fp16, cached per model and GPU.

The checkpoint is the source of truth; ONNX files and TensorRT engines are caches derived from it,
keyed by its sha256. `load_engine` checks every engine other than eager fp32 torch against that
reference on one batch before handing it out, and falls back to torch when they disagree.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from blastq.core.common import InvalidConfig, ModelInvalid, ModelNotFound, atomic_write
from blastq.core.segment.stitch import logits_to_probabilities
from blastq.core.segment.unet import N_CLASSES, ModelInfo, UNet, default_model_path, to_model_input

log = logging.getLogger(__name__)

ENGINE_KINDS = ("auto", "torch", "onnx", "onnx-int8", "tensorrt")
DEFAULT_OPSET = 17
ONNX_INPUT, ONNX_OUTPUT = "tiles", "logits"
# onnx and onnxruntime are dependencies of blastq itself: missing, the installation is broken.
ONNX_HINT = "reinstall them: pip install --force-reinstall onnx onnxruntime"
TENSORRT_HINT = "TensorRT engine needs torch-tensorrt and a CUDA GPU: pip install blastq[tensorrt]"

# The CPU engine `auto` picks, measured with benchmarks/bench_engines.py: batches of 8 synthetic-smear
# tiles of 256x256, 2 threads, the shipped model, on a 2-core shared AMD EPYC VM, torch 2.13.0+cpu,
# onnxruntime 1.32.0; median tiles/s over 10-15 rounds, in 6 runs:
#   quiet machine:  torch fp32 channels_last 26-29, onnxruntime 76-79
#   loaded machine: torch fp32 channels_last  8-9,  onnxruntime 30-31
#   (1 thread: torch 17, onnxruntime 44)
# ONNX Runtime is 2.7-3.7x faster (its fused conv+BN+ReLU kernels) with probabilities within 4e-6, so
# it is the CPU default when installed; without onnxruntime, torch. Where an int8 file made for the
# checkpoint is at hand (the shipped default U-Net has one: core.segment.quantize), `auto` runs that:
# 1.46x fp32 ONNX per 1024 px tile on an AVX2 AMD EPYC, held-out Dice within 0.0008, every blast call
# the same (core/weights/blastq-unet-default.int8.json).
CPU_AUTO_KIND = "onnx"

# Agreement an engine must reach with the fp32 torch reference before it is used: the largest absolute
# difference of any probability (softmax classes, sigmoid nucleus/marker). fp16 engines round logits to
# ~1e-3 relative, so they get a looser bound that still catches an all-zero or NaN output (a wrong
# engine is off by >= 0.3 somewhere).
FP32_PROB_TOLERANCE = 1e-3
FP16_PROB_TOLERANCE = 5e-2
# int8 moves probabilities near class boundaries by up to ~0.1 (the shipped model on random pixels: 0.10,
# its class maps agreeing on 99.9% of them); a broken quantisation gives far less agreement.
INT8_PROB_TOLERANCE = 0.5
INT8_MIN_MASK_AGREEMENT = 0.99
# ONNX metadata naming a quantised export's precision (core.segment.quantize); absent: fp32.
PRECISION_KEY = "blastq.precision"


class Engine(Protocol):
    name: str
    stride: int  # tile sides must be multiples of this

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float32 in, NCHW float32 logits out."""
        ...


# --- torch ---------------------------------------------------------------------------------------


class TorchEngine:
    """Eager PyTorch on CPU or CUDA: fp16 autocast on CUDA when asked, torch.compile when asked.

    `compile=None` compiles on CUDA only: on CPU, compiling takes longer than most slides run. A model
    that fails to compile runs eagerly, with a warning, instead of failing the slide.
    """

    def __init__(
        self,
        model: UNet,
        device: str = "cpu",
        fp16: bool = False,
        compile: bool | None = None,
        bf16: bool = False,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidConfig(f"device {device} asked for, but this torch build sees no CUDA GPU")
        # channels_last: oneDNN/cuDNN convolutions run faster in NHWC; results are the same.
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.fp16 = fp16 and self.device.type == "cuda"
        # bfloat16 autocast (CPU and CUDA): fp32's range, 8 bits of mantissa; for benchmarks/bench_gpu.py.
        self.bf16 = bf16 and not self.fp16
        self.precision = "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"
        self.stride = model.stride
        self.compiled = self.device.type == "cuda" if compile is None else compile
        self._forward: Callable[[torch.Tensor], torch.Tensor] = (
            # dynamic=False: one specialised graph per batch shape; a pipeline sees two or three shapes.
            torch.compile(self.model, dynamic=False) if self.compiled else self.model
        )
        self.name = self._name()

    def _name(self) -> str:
        dev = f"torch-{self.device.type}"
        precision = f"-{self.precision}" if self.precision != "fp32" else ""
        return f"{dev}{precision}{'-compiled' if self.compiled else ''}"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        try:
            y = self._run(x)
        except Exception as exc:  # compilers fail in many ways (Triton, C++ toolchain, graph breaks)
            if not self.compiled:
                raise
            log.warning(
                "torch.compile failed (%s: %s); running %s eagerly", type(exc).__name__, exc, self.name
            )
            self.compiled, self._forward = False, self.model
            self.name = self._name()
            y = self._run(x)
        return y.float().cpu().numpy()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        # Compiled graphs are traced under no_grad: inference-mode tensors have tripped Dynamo before.
        grad_off = torch.no_grad() if self.compiled else torch.inference_mode()
        dtype = torch.bfloat16 if self.bf16 else torch.float16
        with grad_off, torch.autocast(self.device.type, enabled=self.fp16 or self.bf16, dtype=dtype):
            return self._forward(x)


# --- ONNX ----------------------------------------------------------------------------------------


def export_onnx_file(
    model: UNet, out_path: str | Path, *, sha256: str = "", version: str = "", opset: int = DEFAULT_OPSET
) -> Path:
    """Write `model` as ONNX (dynamic batch, height, width; input "tiles", output "logits"), atomically.

    The checkpoint's sha256, the model version and the U-Net depth/stride go into metadata_props, so an
    ONNX file says where it came from and which tile sides it accepts. Checked with onnx.checker.
    """
    try:
        import onnx
    except ImportError as exc:
        raise InvalidConfig(f"ONNX export needs the onnx package: {ONNX_HINT}") from exc
    model = copy.deepcopy(model).float().cpu().eval()
    side = max(64, model.stride)
    example = torch.zeros(2, model.in_channels, side, side)
    axes = {0: "batch", 2: "height", 3: "width"}
    kwargs: dict[str, Any] = {
        "input_names": [ONNX_INPUT],
        "output_names": [ONNX_OUTPUT],
        "dynamic_axes": {ONNX_INPUT: axes, ONNX_OUTPUT: axes},
        "opset_version": opset,
        "do_constant_folding": True,
    }
    # The TorchScript-based exporter: exact opset, named dynamic axes, ~0.3 s, no onnxscript dependency.
    # torch >= 2.9 defaults to the dynamo exporter (needs onnxscript, ~5 s, emits opset 18 then
    # down-converts); torch < 2.5 has no `dynamo` argument at all.
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter"; still supported in 2.13
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(model, (example,), buffer, **kwargs)
    proto = onnx.load_from_string(buffer.getvalue())
    meta = {
        "blastq.checkpoint_sha256": sha256,
        "blastq.model_version": version,
        "blastq.depth": str(model.depth),
        "blastq.stride": str(model.stride),
        "blastq.n_outputs": str(model.n_outputs),
        "blastq.opset": str(opset),
    }
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    out_path = Path(out_path)
    atomic_write(out_path, proto.SerializeToString())
    return out_path


class OnnxEngine:
    """ONNX Runtime on CPU, or CUDA when `device` is cuda and the CUDA execution provider is installed."""

    def __init__(
        self, onnx_path: str | Path, info: ModelInfo, device: str = "cpu", threads: int | None = None
    ):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise InvalidConfig(f"the onnx engine needs onnxruntime: {ONNX_HINT}") from exc
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise ModelNotFound(f"ONNX model not found: {onnx_path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or cpu_cores()
        options.inter_op_num_threads = 1  # one conv chain; parallelism is inside each op
        # The memory pattern pre-plans one block per input shape: 170 MB more resident memory for batches of
        # eight 256 px tiles, and no faster here (0.45 vs 0.50 s per batch on 2 cores, without it).
        options.enable_mem_pattern = False
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                device_id = int(device.partition(":")[2] or 0)
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
            else:
                log.warning("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu); using CPU")
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelInvalid(f"not a usable ONNX model: {onnx_path} ({exc})") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        source = meta.get("blastq.checkpoint_sha256", "")
        if info.sha256 and source != info.sha256:
            raise ModelInvalid(
                f"{onnx_path} was exported from checkpoint {source[:12] or '(unknown)'}, "
                f"not {info.sha256[:12]}: re-export it"
            )
        if "blastq.stride" not in meta:
            raise ModelInvalid(f"{onnx_path} has no blastq.stride metadata: export it with blastq")
        self.stride = int(meta["blastq.stride"])
        self.precision = meta.get(PRECISION_KEY, "fp32")
        self.path = onnx_path
        self.device_type = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.name = f"onnx-{self.device_type}" + (f"-{self.precision}" if self.precision != "fp32" else "")
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        (y,) = self.session.run([self._output], {self._input: x})
        return np.asarray(y, dtype=np.float32)


def onnx_cache_path(cache_dir: Path, sha256: str, opset: int = DEFAULT_OPSET) -> Path:
    """Where the ONNX export of the checkpoint with this sha256 lives in the engine cache."""
    return Path(cache_dir) / sha256 / f"model.opset{opset}.onnx"


def cached_onnx(model: UNet, info: ModelInfo, cache_dir: Path, opset: int = DEFAULT_OPSET) -> Path:
    """The ONNX export of this checkpoint: made on first use, reused after (keyed by sha256 + opset)."""
    if not info.sha256:
        raise InvalidConfig(
            "caching an ONNX export needs the checkpoint's sha256 (load it with UNet.from_checkpoint)"
        )
    path = onnx_cache_path(cache_dir, info.sha256, opset)
    if not path.is_file():
        log.info("exporting %s to ONNX (opset %d) at %s", info.version, opset, path)
        export_onnx_file(model, path, sha256=info.sha256, version=info.version, opset=opset)
    return path


# --- TensorRT ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeProfile:
    """The NCHW input shapes a TensorRT engine is built for: any shape between min and max runs."""

    min: tuple[int, int, int, int] = (1, 3, 64, 64)
    opt: tuple[int, int, int, int] = (8, 3, 1024, 1024)  # the pipeline's tile; the batch bench_gpu.py times
    max: tuple[int, int, int, int] = (32, 3, 1024, 1024)

    def admits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 4 and all(
            lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max, strict=True)
        )


def tensorrt_cache_key(
    model_sha256: str, trt_version: str, gpu_arch: str, shape_profile: ShapeProfile, precision: str
) -> str:
    """Hex key of a TensorRT engine: a different model, TensorRT, GPU, profile or precision is a rebuild."""
    parts = {
        "model_sha256": model_sha256,
        "trt_version": trt_version,
        "gpu_arch": gpu_arch,
        "shape_profile": asdict(shape_profile),
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class TensorRTEngine:
    """torch-tensorrt engine, built once per (model, TensorRT version, GPU arch, shape profile, precision).

    UNTESTED in this repository's CI: it was written without a GPU or torch-tensorrt to run it. Only
    the refusal without torch-tensorrt/CUDA and `tensorrt_cache_key` are tested. `load_engine` checks
    its output against the fp32 torch model before use and falls back to torch when they differ.

    The engine lives at <cache_dir>/<model sha256>/trt-<key>.ep (an ExportedProgram holding the
    serialized TensorRT engine), with a .json beside it recording what it was built for.
    """

    def __init__(
        self,
        model: UNet,
        info: ModelInfo,
        device: str = "cuda",
        *,
        cache_dir: str | Path | None = None,
        profile: ShapeProfile = ShapeProfile(),
        precision: str = "fp16",
    ):
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise InvalidConfig(TENSORRT_HINT)
        try:
            import torch_tensorrt
        except Exception as exc:  # ImportError, or OSError when the TensorRT libraries do not load
            raise InvalidConfig(TENSORRT_HINT) from exc
        if precision not in ("fp16", "fp32"):
            raise InvalidConfig(f"TensorRT precision must be fp16 or fp32, got {precision!r}")
        if not info.sha256:
            raise InvalidConfig(
                "a TensorRT engine needs the checkpoint's sha256 (load it with UNet.from_checkpoint)"
            )
        self.device = torch.device(device)
        self.profile, self.precision, self.stride = profile, precision, model.stride
        major, minor = torch.cuda.get_device_capability(self.device)
        self.built_for = {
            "model_sha256": info.sha256,
            "trt_version": _tensorrt_version(torch_tensorrt),
            "gpu_arch": f"sm_{major}{minor}",
            "gpu_name": torch.cuda.get_device_name(self.device),
            "shape_profile": asdict(profile),
            "precision": precision,
        }
        key = tensorrt_cache_key(info.sha256, self.built_for["trt_version"], self.built_for["gpu_arch"], profile, precision)  # fmt: skip
        root = Path(cache_dir) if cache_dir else process_cache_dir()
        self.path = root / info.sha256 / f"trt-{key[:24]}.ep"
        self.module = self._load() if self._cached() else None
        if self.module is None:
            self.module = self._build(torch_tensorrt, model)
        self.name = f"tensorrt-{self.built_for['gpu_arch']}-{precision}"

    def _cached(self) -> bool:
        sidecar = self.path.with_suffix(".json")
        if not (self.path.is_file() and sidecar.is_file()):
            return False
        try:
            recorded = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            return False
        # The key already covers these; the sidecar guards against a hand-copied or renamed file.
        return all(recorded.get(k) == v for k, v in self.built_for.items() if k != "gpu_name")

    def _load(self) -> Any:
        """The cached engine, or None when it cannot be deserialised (then it is rebuilt)."""
        log.info("loading TensorRT engine %s", self.path)
        try:
            # torch_tensorrt, imported by __init__, registers the TensorRT ops the program refers to.
            return torch.export.load(str(self.path)).module().to(self.device)
        except Exception as exc:  # TensorRT refuses engines from other versions/GPUs in its own ways
            log.warning("cached TensorRT engine %s unusable (%s); rebuilding", self.path, exc)
            return None

    def _build(self, torch_tensorrt: Any, model: UNet) -> Any:
        log.info("building TensorRT engine %s (%s) - this takes minutes", self.path, self.precision)
        model = copy.deepcopy(model).float().to(self.device).eval()
        spec = torch_tensorrt.Input(
            min_shape=self.profile.min,
            opt_shape=self.profile.opt,
            max_shape=self.profile.max,
            dtype=torch.float32,
        )
        precisions = {torch.float16, torch.float32} if self.precision == "fp16" else {torch.float32}
        with torch.no_grad():
            module = torch_tensorrt.compile(model, ir="dynamo", inputs=[spec], enabled_precisions=precisions)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.ep")
        try:
            torch_tensorrt.save(module, str(tmp), inputs=[spec])
            tmp.replace(self.path)
        finally:
            tmp.unlink(missing_ok=True)
        atomic_write(self.path.with_suffix(".json"), json.dumps(self.built_for, indent=2))
        return module

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if not self.profile.admits(batch.shape):
            raise InvalidConfig(
                f"batch of shape {tuple(batch.shape)} is outside the TensorRT engine's profile "
                f"{self.profile.min}..{self.profile.max}: use smaller tiles/batches or engine torch"
            )
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.no_grad():
            y = self.module(x)
        return y.float().cpu().numpy()


def _tensorrt_version(torch_tensorrt: Any) -> str:
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # the TensorRT wheel is a dependency of torch-tensorrt; be safe anyway
        return f"torch_tensorrt-{torch_tensorrt.__version__}"


def tensorrt_available() -> bool:
    """Whether torch-tensorrt is installed and a CUDA GPU is visible (without importing it)."""
    return importlib.util.find_spec("torch_tensorrt") is not None and torch.cuda.is_available()


# --- checking and loading ------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineCheck:
    """How one engine's output compares with the fp32 torch reference on one batch."""

    engine: str
    max_prob_diff: float  # NaN when the engine failed or gave the wrong shape
    mask_agreement: float  # share of pixels whose argmax class matches
    tolerance: float
    error: str = ""
    min_mask_agreement: float = 0.0

    @property
    def passed(self) -> bool:
        return (
            not self.error
            and self.max_prob_diff < self.tolerance
            and self.mask_agreement >= self.min_mask_agreement
        )


def check_engine(
    engine: Engine,
    reference: Engine,
    tolerance: float = FP32_PROB_TOLERANCE,
    seed: int = 0,
    min_mask_agreement: float = 0.0,
    batch: np.ndarray | None = None,
) -> EngineCheck:
    """Run `engine` and `reference` on `batch` (default: one seeded random batch of 2 tiles) and compare
    probabilities and class maps."""
    if batch is None:
        side = max(64, engine.stride, reference.stride)
        batch = np.random.default_rng(seed).uniform(-2.0, 2.0, (2, 3, side, side)).astype(np.float32)
    want = logits_to_probabilities(reference.infer(batch))
    try:
        got = logits_to_probabilities(np.asarray(engine.infer(batch), dtype=np.float32))
    except Exception as exc:  # a broken engine fails in its own way; the check reports, never raises
        return EngineCheck(engine.name, float("nan"), 0.0, tolerance, f"{type(exc).__name__}: {exc}")
    if got.shape != want.shape:
        return EngineCheck(
            engine.name, float("nan"), 0.0, tolerance, f"output shape {got.shape} != {want.shape}"
        )
    diff = float(np.nan_to_num(np.abs(got - want), nan=np.inf).max())
    agree = float((got[:, :N_CLASSES].argmax(1) == want[:, :N_CLASSES].argmax(1)).mean())
    return EngineCheck(engine.name, diff, agree, tolerance, min_mask_agreement=min_mask_agreement)


ENGINE_PROBE = "engine-probe.png"


def probe_batch() -> np.ndarray:
    """The engine probe as a batch of one (NCHW float32): a 256 px synthetic smear field with white cells
    and a blast, already prepared as the model sees a slide (core/weights/engine-probe.png, written by
    blastq.trainer.quantize.write_engine_probe). Engines are judged on it where random pixels are not
    enough (int8 at load; `blastq doctor`'s engine check)."""
    import cv2

    path = default_model_path().with_name(ENGINE_PROBE)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise ModelInvalid(f"cannot read the engine probe {path}: reinstall blastq")
    return to_model_input(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[None])


_PROCESS_CACHE: list[tempfile.TemporaryDirectory] = []


def process_cache_dir() -> Path:
    """Where derived engines (ONNX exports, TensorRT builds) go when the caller names no cache: a folder of
    this process's own, removed when it exits. The lasting cache is a setting (BLASTQ_ENGINE_CACHE_DIR,
    default <data dir>/engines) that the CLI and the workers pass; nothing here reads the environment."""
    if not _PROCESS_CACHE:
        _PROCESS_CACHE.append(tempfile.TemporaryDirectory(prefix="blastq-engines-"))
    return Path(_PROCESS_CACHE[0].name)


def median_infer_seconds(engine: Engine, batch: np.ndarray, rounds: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of `engine.infer(batch)` over `rounds` calls after `warmup` untimed ones (the
    answer comes back as a host array, so every call is complete when timed)."""
    for _ in range(warmup):
        engine.infer(batch)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        engine.infer(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cpu_cores() -> int:
    """CPU cores this process may run on (respects taskset/cpusets, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def load_engine(
    model_path: str | Path | None = None,
    *,
    kind: str = "auto",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> tuple[Engine, ModelInfo]:
    """Load a checkpoint (the shipped default when None) into the engine `kind` on `device`.

    `auto`: on CUDA, TensorRT when torch-tensorrt is installed, else torch fp16; on CPU, `CPU_AUTO_KIND`
    (ONNX Runtime) when installed, else torch. Derived engines are cached under `cache_dir` (none given:
    `process_cache_dir()`, for this process only); `threads` sets ONNX Runtime's intra-op threads
    (default: all cores here).
    """
    if kind not in ENGINE_KINDS:
        raise InvalidConfig(f"unknown engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")
    try:
        device_type = torch.device(device).type
    except RuntimeError as exc:
        raise InvalidConfig(f"unknown device {device!r}; use cpu, cuda or cuda:N") from exc
    if device_type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfig(f"device {device} asked for, but this torch build sees no CUDA GPU")
    model, info = UNet.from_checkpoint(Path(model_path) if model_path else default_model_path())
    # fp32 eager on CPU: the output every other engine must match. Copied now, before an engine moves
    # or converts `model`.
    reference = TorchEngine(copy.deepcopy(model), "cpu")
    cache = Path(cache_dir) if cache_dir else process_cache_dir()
    chosen = _auto_kind(device, info.sha256, cache) if kind == "auto" else kind
    try:
        engine = _build(chosen, model, info, device, cache, threads)
    except Exception as exc:
        if kind != "auto" or chosen == "torch":
            raise
        log.warning("engine %s unavailable (%s: %s); using torch", chosen, type(exc).__name__, exc)
        engine = _build("torch", model, info, device, cache, threads)
    if isinstance(engine, TorchEngine) and not engine.fp16 and not engine.compiled:
        return engine, info  # the reference itself
    precision = getattr(engine, "precision", "fp32")
    tolerance = {"fp16": FP16_PROB_TOLERANCE, "int8": INT8_PROB_TOLERANCE}.get(precision, FP32_PROB_TOLERANCE)
    min_agreement = INT8_MIN_MASK_AGREEMENT if precision == "int8" else 0.0
    check = check_engine(engine, reference, tolerance, min_mask_agreement=min_agreement)
    if check.passed and precision == "int8":
        # Random pixels are not enough for int8: its errors depend on how a smear drives the activations
        # (saturating kernels on CPUs without VNNI agreed on 99.9% of random pixels, 68-88% of a smear's).
        # On the probe smear only the class map is judged: probabilities near a boundary move by design.
        check = check_engine(engine, reference, 1.01, min_mask_agreement=min_agreement, batch=probe_batch())
    if check.passed:
        log.info("engine %s agrees with torch: max |dp| %.2g", engine.name, check.max_prob_diff)
        return engine, info
    if precision == "int8":  # asked for by name, and results are keyed as int8: no quiet fp32 instead
        raise ModelInvalid(
            f"the int8 model disagrees with the fp32 model (max |dp| {check.max_prob_diff:.3g}, class maps "
            f"agreeing on {check.mask_agreement:.2%}{', ' + check.error if check.error else ''}): "
            "make it again with python -m blastq.trainer.quantize, or use BLASTQ_ENGINE=onnx"
        )
    log.warning(
        "engine %s disagrees with the torch model (max |dp| %.3g, tolerance %g, mask agreement %.4f%s); "
        "falling back to torch fp32",
        check.engine,
        check.max_prob_diff,
        check.tolerance,
        check.mask_agreement,
        f", {check.error}" if check.error else "",
    )
    if torch.device(device).type == "cpu":
        return reference, info
    return TorchEngine(model, device, compile=False), info


def _auto_kind(device: str, sha256: str, cache: Path) -> str:
    if device.startswith("cuda"):
        return "tensorrt" if tensorrt_available() else "torch"
    if CPU_AUTO_KIND == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return "torch"
    if CPU_AUTO_KIND == "onnx" and int8_available(sha256, cache):
        return "onnx-int8"
    return CPU_AUTO_KIND


def int8_available(sha256: str, cache_dir: str | Path | None) -> bool:
    """Whether an int8 file made for the checkpoint with this sha256 is at hand (engine cache or shipped)."""
    paths = [default_int8_path()]
    if cache_dir:
        paths.insert(0, int8_cache_path(Path(cache_dir), sha256))
    return bool(sha256) and any(p.is_file() and _onnx_source(p) == sha256 for p in paths)


def planned_precision(kind: str, device: str, sha256: str, cache_dir: str | Path | None) -> str:
    """ "int8" when `load_engine(kind=..., device=...)` will run this checkpoint quantised, else "".

    What `blastq submit` keys results by before any worker has loaded an engine (core.pipeline.field)."""
    if kind == "onnx-int8":
        return "int8"
    cpu = not str(device).startswith("cuda")
    on_cpu_onnx = CPU_AUTO_KIND == "onnx" and importlib.util.find_spec("onnxruntime") is not None
    return "int8" if kind == "auto" and cpu and on_cpu_onnx and int8_available(sha256, cache_dir) else ""


def default_int8_path() -> Path:
    """Where the shipped default U-Net's int8 ONNX file lives, beside its checkpoint (core.segment.quantize)."""
    return default_model_path().with_name("blastq-unet-default.int8.onnx")


def int8_cache_path(cache_dir: Path, sha256: str) -> Path:
    """Where `python -m blastq.trainer.quantize` puts the int8 file of another checkpoint: the engine cache."""
    return Path(cache_dir) / sha256 / "model.int8.onnx"


def int8_onnx(info: ModelInfo, cache_dir: Path) -> Path:
    """The int8 ONNX file made for this checkpoint: in the engine cache, else the shipped default's."""
    for path in (int8_cache_path(cache_dir, info.sha256), default_int8_path()):
        if info.sha256 and path.is_file() and _onnx_source(path) == info.sha256:
            return path
    raise InvalidConfig(
        f"no int8 model for checkpoint {info.version} ({info.sha256[:12]}): make one with "
        f"python -m blastq.trainer.quantize MODEL.pt --wbc DIR --out {int8_cache_path(cache_dir, info.sha256)}"
        ", or use BLASTQ_ENGINE=onnx"
    )


def _onnx_source(path: Path) -> str:
    """The checkpoint sha256 an ONNX file says it was made from ("" when it says none or is unreadable).

    Read once per file version: `blastq submit` asks for every file it keys (`planned_precision`)."""
    try:
        stat = path.stat()
    except OSError:
        return ""
    return _onnx_source_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _onnx_source_of(path: str, _size: int, _mtime_ns: int) -> str:
    try:
        import onnx

        meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    except Exception:  # a truncated or foreign file is simply not this checkpoint's
        return ""
    return meta.get("blastq.checkpoint_sha256", "")


def _build(kind: str, model: UNet, info: ModelInfo, device: str, cache: Path, threads: int | None) -> Engine:
    if kind == "torch":
        return TorchEngine(model, device, fp16=device.startswith("cuda"))
    if kind == "onnx-int8":
        if importlib.util.find_spec("onnxruntime") is None:
            raise InvalidConfig(f"the onnx-int8 engine needs onnxruntime: {ONNX_HINT}")
        return OnnxEngine(int8_onnx(info, cache), info, device=device, threads=threads)
    if kind == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            raise InvalidConfig(f"the onnx engine needs onnxruntime: {ONNX_HINT}")
        path = cached_onnx(model, info, cache)
        try:
            return OnnxEngine(path, info, device=device, threads=threads)
        except (
            ModelNotFound,
            ModelInvalid,
        ) as exc:  # truncated by a full disk, or written by another exporter: redo it
            log.warning("cached ONNX export unusable (%s); exporting it again", exc)
            export_onnx_file(model, path, sha256=info.sha256, version=info.version)
            return OnnxEngine(path, info, device=device, threads=threads)
    return TensorRTEngine(model, info, device, cache_dir=cache)
