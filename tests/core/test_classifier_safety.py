"""A classifier file cannot run code when loaded: only the exact types blastq's classifiers use may load.

The hostile files are built by hand: a harmless model saved with skops, its schema edited to name a
callable that skops would call while loading (its ConstructorFromReduceNode calls the named type with
arguments from the file).
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile

import numpy as np
import pytest
import torch

from blastq.core.cells.cellcrops import CELL_TYPES
from blastq.core.cells.classify import (
    ALLOWED_SKLEARN_TYPES,
    CLASSIFIER_FORMAT,
    ClassifierInfo,
    default_classifier_path,
    load_classifier,
    save_classifier,
)
from blastq.core.cells.features import FEATURE_NAMES
from blastq.core.common.errors import ModelInvalid


def _node(module: str, name: str, loader: str, node_id: int, **rest) -> dict:
    return {"__class__": name, "__module__": module, "__loader__": loader, "__id__": node_id, **rest}


def _text(value: str, node_id: int) -> dict:
    return _node("builtins", "str", "JsonNode", node_id, content=json.dumps(value), is_json=True)


def crafted_skops(module: str, name: str, args: list[dict]) -> bytes:
    """skops bytes of a fitted StandardScaler whose `n_features_in_` is `module.name(*args)`."""
    import skops.io as sio
    from sklearn.preprocessing import StandardScaler

    source = zipfile.ZipFile(io.BytesIO(sio.dumps(StandardScaler().fit(np.eye(2)))))
    schema = json.loads(source.read("schema.json"))
    arguments = _node("builtins", "tuple", "TupleNode", 900, content=args)
    schema["content"]["content"]["n_features_in_"] = _node(
        module, name, "ConstructorFromReduceNode", 901, content=arguments
    )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for member in source.namelist():
            z.writestr(member, json.dumps(schema) if member == "schema.json" else source.read(member))
    return out.getvalue()


def classifier_file(path, sklearn_bytes: bytes) -> str:
    buf = io.BytesIO()
    payload = {
        "format": CLASSIFIER_FORMAT,
        "kind": "svm",
        "version": "hostile",
        "cell_types": list(CELL_TYPES),
        "sklearn": sklearn_bytes,
    }
    torch.save(payload, buf)
    path.write_bytes(buf.getvalue())
    return str(path)


def test_a_skops_file_naming_a_callable_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')"
    empty_dict = _node(
        "builtins",
        "dict",
        "DictNode",
        902,
        content={},
        key_types=_node("builtins", "list", "ListNode", 903, content=[]),
    )
    hostile = {
        # Inside an allowed package: numpy's test helper runstring(code, namespace) calls exec.
        "numpy.testing._private.utils.runstring": crafted_skops(
            "numpy.testing._private.utils", "runstring", [_text(code, 904), empty_dict]
        ),
        "builtins.exec": crafted_skops("builtins", "exec", [_text(code, 904)]),
        "os.system": crafted_skops("os", "system", [_text(f"touch {marker}", 904)]),
    }
    for type_name, data in hostile.items():
        path = classifier_file(tmp_path / "hostile.pt", data)
        with pytest.raises(ModelInvalid) as refused:
            load_classifier(path)
        message = str(refused.value)
        assert type_name in message and "types blastq does not load" in message
        assert "\n" not in message
        assert not marker.exists(), f"{type_name} ran while the file loaded"


def _fitted(model: str, n_features: int):
    from blastq.trainer.compare import _fit, make_estimator

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, n_features))
    labels = np.repeat(np.arange(3), 20)
    estimator = make_estimator(model, 0)
    _fit(estimator, x, labels)
    return estimator, x


@pytest.mark.parametrize("model", ["svm", "random_forest", "unet_encoder_linear"])
def test_every_model_the_trainer_saves_loads_under_the_exact_allow_list(model, tmp_path):
    import skops.io as sio

    n_features = len(FEATURE_NAMES) if model != "unet_encoder_linear" else 16
    estimator, x = _fitted(model, n_features)
    assert set(sio.get_untrusted_types(data=sio.dumps(estimator))) <= ALLOWED_SKLEARN_TYPES
    if model == "unet_encoder_linear":
        return  # its file also holds a U-Net; the scikit-learn part is what the allow-list governs
    save_classifier(tmp_path / "c.pt", ClassifierInfo(version=model, kind=model), sklearn_model=estimator)
    loaded = load_classifier(tmp_path / "c.pt").sklearn_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(loaded.predict_proba(x), estimator.predict_proba(x))


def test_the_shipped_classifier_needs_no_type_beyond_the_allow_list():
    import skops.io as sio

    payload = torch.load(default_classifier_path(), map_location="cpu", weights_only=True)
    assert set(sio.get_untrusted_types(data=payload["sklearn"])) <= ALLOWED_SKLEARN_TYPES
    assert load_classifier(default_classifier_path()).info.kind == payload["kind"]


def test_a_forest_whose_tree_points_outside_its_nodes_is_refused(tmp_path):
    estimator, _ = _fitted("random_forest", len(FEATURE_NAMES))
    tree = estimator.estimators_[0].tree_
    state = tree.__getstate__()
    state["nodes"] = state["nodes"].copy()
    state["nodes"]["left_child"][0] = 10**6  # prediction would read far past the node array
    tree.__setstate__(state)
    path = tmp_path / "forest.pt"
    save_classifier(path, ClassifierInfo(version="rf", kind="random_forest"), sklearn_model=estimator)
    with pytest.raises(ModelInvalid, match="out-of-range node indices"):
        load_classifier(path)
