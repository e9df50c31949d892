"""The blast caller: a fitted per-cell blast call over the U-Net's share and the cell's measurements."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_cells import probs_for

from blastq.core.cells.blastcall import (
    CALLER_FEATURES,
    BlastCaller,
    caller_setting,
    features_of,
    read_caller,
    write_caller,
)
from blastq.core.cells.instances import extract_cells
from blastq.core.common.errors import InvalidConfig
from blastq.core.pipeline.field import PipelineConfig

N = len(CALLER_FEATURES)


def _by_area(threshold: float = 0.5, **kwargs) -> BlastCaller:
    """A caller that ignores the share and calls large cells blasts (log area above 6.5: 665 um^2)."""
    coef = [0.0] * N
    coef[CALLER_FEATURES.index("log_area_um2")] = 5.0
    mean = [0.0] * N
    mean[CALLER_FEATURES.index("log_area_um2")] = 6.5
    return BlastCaller("by-area", tuple(coef), 0.0, tuple(mean), (1.0,) * N, threshold, **kwargs)


def test_a_caller_decides_from_the_measurements_and_the_share_rule_stays_the_default():
    rgb = np.full((200, 300, 3), 200, np.uint8)
    # Same blast share 0.1; a small cell (radius 20 px = 4 um: ~50 um^2) and a large one (radius 60 px at
    # 0.4 um/px... here 0.5 um/px: 30 um radius, ~2800 um^2).
    p = probs_for([(60, 60, 20, 0.1, 10), (120, 200, 60, 0.1, 30)], shape=(200, 300))
    plain = extract_cells(p, rgb, mpp=0.5)
    assert [c.label for c in plain.cells] == ["white_cell", "white_cell"]
    called = extract_cells(p, rgb, mpp=0.5, caller=_by_area())
    assert [c.label for c in called.cells] == ["white_cell", "blast"]
    large = called.instances == called.cells[1].cell_id
    assert np.all(called.classes[large] == 2) and np.all(called.classes[called.instances == 1] == 1)
    # The share column stays the U-Net's share; the measurements are the same as without a caller.
    assert [c.blast_probability for c in called.cells] == [c.blast_probability for c in plain.cells]
    assert [c.circularity for c in called.cells] == [c.circularity for c in plain.cells]
    # A blast called below even odds by a caller is marked for review, saying whose probability it is.
    doubtful = extract_cells(p, rgb, mpp=0.5, caller=_by_area(threshold=0.01))
    small = doubtful.cells[0]
    assert small.label == "blast" and small.review and "blast call probability" in small.review_reason


def test_the_features_are_the_shares_logit_and_measurements_in_microns():
    f = features_of([0.5, 1.0, 0.0], [100.0, 100.0, 0.0], [0.5, 1.5, -1.0], [0.9, 0.9, 0.9], [50.0, 0.0, 0.0])
    assert f.shape == (3, N)
    share = f[:, CALLER_FEATURES.index("blast_share_logit")]
    assert share[0] == 0.0 and np.isfinite(share).all() and share[1] > 9 and share[2] < -9
    nc = f[:, CALLER_FEATURES.index("nc_ratio")]
    assert list(nc) == [0.5, 1.0, 0.0]
    assert np.isfinite(f).all()


def test_a_caller_file_round_trips_and_its_figures_do_not_change_the_result_key(tmp_path):
    caller = _by_area(trained_on="test cells", metrics={"sensitivity": 0.9})
    path = write_caller(caller, tmp_path / "caller.json")
    again = read_caller(path)
    assert again == caller and again.metrics == {"sensitivity": 0.9}
    assert (
        caller_setting(str(path)) == caller and caller_setting("") is None and caller_setting("share") is None
    )
    plain = PipelineConfig()
    with_caller = PipelineConfig(blast_caller=caller)
    reworded = PipelineConfig(blast_caller=_by_area(trained_on="other words", metrics={"x": 1}))
    stricter = PipelineConfig(blast_caller=_by_area(threshold=0.7))
    assert with_caller.key() == reworded.key()
    assert len({plain.key(), with_caller.key(), stricter.key()}) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n", "not a JSON file"),
        (b"[1, 2]", "not a blastq-blast-caller-1 file"),
        (json.dumps({"format": "blastq-blast-caller-1", "features": ["area"]}).encode(), "features"),
        ("NaN", "not a blastq-blast-caller-1 file"),
    ],
)
def test_a_file_that_is_not_a_caller_is_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "caller.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InvalidConfig, match=message) as err:
        read_caller(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"coef": [1.0] * (N - 1)}, "coef"),
        ({"intercept": float("nan")}, "intercept"),
        ({"scale": [0.0] * N}, "scale"),
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": "0.5"}, "threshold"),
        ({"mean": [1e400] * N}, "mean"),
        ({"version": ""}, "version"),
    ],
)
def test_a_caller_with_a_bad_number_is_refused(tmp_path, change, message):
    data = _by_area().to_json() | change
    path = tmp_path / "caller.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidConfig, match=message):
        read_caller(path)


def test_a_missing_folder_or_huge_caller_path_is_refused(tmp_path):
    with pytest.raises(InvalidConfig, match="cannot read"):
        read_caller(tmp_path / "absent.json")
    with pytest.raises(InvalidConfig, match="not a regular file"):
        read_caller(tmp_path)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (2 << 20))
    with pytest.raises(InvalidConfig, match="too large"):
        read_caller(big)


def test_settings_refuse_a_bad_caller_before_anything_runs(tmp_path):
    from blastq.core.adapters.settings import load_settings
    from blastq.core.pipeline.field import pipeline_config

    with pytest.raises(InvalidConfig, match="blast caller"):
        load_settings(
            env={"BLASTQ_BLAST_CALLER": str(tmp_path / "nope.json"), "BLASTQ_DATA_DIR": str(tmp_path)}
        )
    path = write_caller(_by_area(), tmp_path / "c.json")
    settings = load_settings(env={"BLASTQ_BLAST_CALLER": str(path), "BLASTQ_DATA_DIR": str(tmp_path)})
    assert pipeline_config(settings).blast_caller == _by_area()
    assert pipeline_config(load_settings(env={"BLASTQ_DATA_DIR": str(Path(tmp_path))})).blast_caller is None
