"""python -m blastq.trainer.quantize: the int8 U-Net made, judged against fp32 on held-out data, shipped or not."""

from __future__ import annotations

import json

import onnx

from blastq.core.segment import default_model_path
from blastq.trainer.quantize import Calls, main


def test_calls_alike_count_cells_found_in_one_run_only_as_disagreements():
    a = Calls({(0, 1): True, (0, 2): False, (1, 1): True})
    b = Calls({(0, 1): True, (0, 2): True, (1, 3): False})
    assert a.agreement(b) == (1 / 4, 1, 4)  # (0,1) alike; (0,2) differs; (1,1) and (1,3) in one run only
    assert a.agreement(a) == (1.0, 3, 3)


def test_the_shipped_model_quantises_within_the_limits_and_ships(wbc_root, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    code = main(
        [
            str(default_model_path()),
            "--wbc",
            str(wbc_root),
            "--out",
            str(out),
            "--fields",
            "2",
            "--wide-fields",
            "2",
        ]
    )
    report = json.loads(out.with_suffix(".json").read_text())
    assert code == 0 and report["verdict"] == "ships" and out.is_file()
    assert all(abs(v) < 0.005 for v in report["change"].values())
    assert report["blast_calls_alike"]["share"] > 0.995 and report["blast_calls_alike"]["cells"] > 20
    assert "segmentation_wbc training crops" in report["calibration"]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["blastq.precision"] == "int8"
    assert "verdict: ships" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*candidate*"))  # the candidate file is not left behind
