"""`blastq train`'s defaults, written once: TrainConfig (trainer/train.py) takes its field defaults from here
and the CLI's options show the same values. Nothing here imports torch, so `blastq --help` stays quick."""

from __future__ import annotations

from typing import Any

TRAIN_DEFAULTS: dict[str, Any] = {
    "version": "unet-dev",
    "synth_train": 300,  # synthetic fields in the training pool
    "synth_variety": "classic",
    "max_epochs": 40,
    "steps_per_epoch": 60,
    "patience": 6,  # epochs without a better validation loss before stopping
    "width": 16,
    "depth": 4,
    "seed": 0,
    "lr": 2e-3,
}
