"""segment: pixels -> per-pixel probability maps.

unet (the network and its checkpoints) -> engines (torch, ONNX Runtime, TensorRT: one interface) run it on
tiling's overlapping tiles -> stitch writes each tile's own pixels into one map (the whole-image answer).
"""

from blastq.core import room_api

__all__, __getattr__, __dir__, _PUBLIC = room_api(
    __name__,
    {
        "engines": (
            "DEFAULT_OPSET",
            "Engine",
            "OnnxEngine",
            "TensorRTEngine",
            "TorchEngine",
            "cached_onnx",
            "cpu_cores",
            "default_int8_path",
            "export_onnx_file",
            "int8_available",
            "int8_cache_path",
            "planned_precision",
            "load_engine",
            "median_infer_seconds",
            "probe_batch",
            "tensorrt_available",
        ),
        "quantize": ("quantize_int8",),
        "stitch": (
            "Stitcher",
            "background_map",
            "logits_to_probabilities",
        ),
        "tiling": (
            "MIN_INPUT_PX",
            "Tile",
            "axis_layout",
            "fit_to_stain",
            "is_empty_tile",
            "iter_batches",
            "needed_blocks",
            "pad_to_stride",
            "padded_shape",
            "plan_tiles",
            "stained_pixels",
        ),
        "unet": (
            "CLASS_NAMES",
            "MARKER_CHANNEL",
            "ModelInfo",
            "NUCLEUS_CHANNEL",
            "N_CLASSES",
            "N_OUTPUTS",
            "UNet",
            "default_model_path",
            "load_plain",
            "receptive_radius",
            "save_checkpoint",
            "to_model_input",
        ),
    },
)
