"""The fixed validation set that decides promotions, measured through `blastq models register`."""

from __future__ import annotations

import json

from click.testing import CliRunner

from blastq.cli.main import main
from blastq.core.segment.unet import UNet, default_model_path


def test_register_with_validation_records_the_score_promotion_compares(wbc_root, tmp_path, monkeypatch):
    monkeypatch.setenv("BLASTQ_DATA_DIR", str(tmp_path / "data"))
    for var in ("BLASTQ_DATABASE_URL", "BLASTQ_STORE_URL", "BLASTQ_CONFIG", "BLASTQ_MODEL"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    result = runner.invoke(
        main, ["models", "register", str(default_model_path()), "--validate-on", str(wbc_root)]
    )
    assert result.exit_code == 0, result.output
    version = UNet.from_checkpoint(default_model_path())[1].version  # the shipped model's
    shown = runner.invoke(main, ["models", "show", version])
    metrics = json.loads(shown.output)["metrics"]
    parts = {k: v for k, v in metrics.items() if k != "validation_score"}
    assert set(parts) >= {"dataset1_val_cell_dice", "dataset2_val_nucleus_dice", "synthetic_val_blast_dice"}
    assert metrics["validation_score"] == round(sum(parts.values()) / len(parts), 4)
    assert metrics["dataset1_val_cell_dice"] > 0.9 and metrics["synthetic_val_blast_dice"] > 0.9
