"""A slide worker's check before it takes any job: can it run its model? (`blastq doctor`'s model,
classifier and engine checks, in a fresh interpreter.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from blastq.core.adapters import Settings

# The checks a worker runs before it takes any job (worker.celery_app.run_worker).
MODEL_CHECKS = ("model", "classifier", "engine")
# Loading an engine can build it first (an ONNX export in seconds; a TensorRT engine in minutes).
ENGINE_TIMEOUT_S = 900.0


def preflight(settings: Settings, timeout_s: float = ENGINE_TIMEOUT_S) -> None:
    """Refuse to start a slide worker that cannot run its model: MODEL_CHECKS in a fresh interpreter.

    A fresh process, because loading the engine here would start torch's thread pools in the parent of
    the pool's fork (not fork-safe). ModelInvalid with the first failed check's verdict and fix."""
    from blastq.core.common import ModelInvalid

    env = {**os.environ, "BLASTQ_DEVICE": settings.device, "BLASTQ_ENGINE": settings.engine}
    command = [sys.executable, "-m", "blastq", "doctor", "--json", "--only", ",".join(MODEL_CHECKS)]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelInvalid(f"the worker's model check gave no answer within {timeout_s:g} s") from exc
    try:
        report = json.loads(done.stdout)
    except ValueError:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelInvalid(f"the worker's model check failed: {last}") from None
    for check in report["checks"]:
        if not check["ok"]:
            raise ModelInvalid(
                f"this worker cannot run its {check['name']}: {check['verdict']} (fix: {check['fix']})"
            )
