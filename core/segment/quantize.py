"""int8 static quantisation of the U-Net for ONNX Runtime on CPUs, and the int8 file shipped beside it.

`quantize_int8` turns a checkpoint into an ONNX model whose convolutions run in 8-bit integers (weights
per output channel, activations per tensor, QDQ format, ONNX Runtime's static quantisation), calibrated on
batches of preprocessed smear pixels: the activation ranges are those seen on them. The file carries the
checkpoint's sha256 like every blastq ONNX export, and `blastq.precision = int8`, so an engine refuses it
for any other checkpoint.

The shipped default U-Net's int8 file (`engines.default_int8_path`) is made, and judged, by
`python -m blastq.trainer.quantize` (calibration on synthetic fields and the segmentation_wbc training
crops; shipped only when held-out Dice moves by < 0.005 and blast calls agree on > 99.5% of cells). The
engine `onnx-int8` (`BLASTQ_ENGINE=onnx-int8`) runs it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from blastq.core.common import InvalidConfig, atomic_write
from blastq.core.segment.engines import ONNX_HINT, ONNX_INPUT, PRECISION_KEY, export_onnx_file
from blastq.core.segment.unet import ModelInfo, UNet

INT8 = "int8"
CALIBRATION_KEY = "blastq.calibration"


def quantize_int8(
    model: UNet, info: ModelInfo, out_path: str | Path, batches: Iterable[np.ndarray], calibration: str
) -> Path:
    """Write `model` as an int8 ONNX file calibrated on `batches` (NCHW float32, `to_model_input`).

    `calibration` says in words what the batches were; it is kept in the file's metadata."""
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise InvalidConfig(f"int8 quantisation needs onnx and onnxruntime: {ONNX_HINT}") from exc

    batches = list(batches)
    if not batches:
        raise InvalidConfig("int8 calibration needs at least one batch of tiles")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._left = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._left, None)
            return None if batch is None else {ONNX_INPUT: np.ascontiguousarray(batch, np.float32)}

    with tempfile.TemporaryDirectory(prefix="blastq-int8-") as tmp:
        fp32 = export_onnx_file(model, Path(tmp) / "fp32.onnx", sha256=info.sha256, version=info.version)
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        int8 = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(int8),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # 7-bit weights. On x86 CPUs without VNNI (AVX2 only: AMD Zen 1-3, Intel before Ice Lake) ONNX
            # Runtime multiplies uint8 activations by int8 weights with VPMADDUBSW, whose int16 pair sums
            # saturate at full-range weights: the shipped model's class maps then agreed with fp32 on
            # 68-88% of a smear tile's pixels on an AMD EPYC (AVX2), against 99.95-100% with reduce_range,
            # at the same speed (core/weights/blastq-unet-default.int8.json).
            reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
        proto = onnx.load(str(int8))
        meta = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
        meta |= {PRECISION_KEY: INT8, CALIBRATION_KEY: calibration}
        onnx.helper.set_model_props(proto, meta)
        onnx.checker.check_model(proto)
        out_path = Path(out_path)
        atomic_write(out_path, proto.SerializeToString())
    return out_path
