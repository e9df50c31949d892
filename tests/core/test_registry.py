"""The model registry on SQLite with a file store, and on the real PostgreSQL server."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from services import pg_schema

from blastq.core.adapters.db import connect, upgrade
from blastq.core.adapters.registry import (
    fetch_checkpoint,
    get_model,
    list_models,
    promote,
    promoted,
    register_model,
    rollback,
)
from blastq.core.adapters.store import FileStore
from blastq.core.common.errors import InvalidConfig, ModelInvalid
from blastq.core.segment.unet import UNet, default_model_path, save_checkpoint


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """checkpoint(version, seed=0) -> a tiny U-Net checkpoint (random weights) recording `version`."""
    folder = tmp_path_factory.mktemp("checkpoints")
    _, shipped = UNet.from_checkpoint(default_model_path())

    def checkpoint(version: str, seed: int = 0) -> Path:
        path = folder / f"{version}-{seed}.pt"
        if not path.exists():
            torch.manual_seed(seed)
            save_checkpoint(path, UNet(depth=2, width=4), replace(shipped, version=version, sha256=""))
        return path

    return checkpoint


@pytest.fixture
def db(migrated_db):
    return migrated_db


@pytest.fixture
def store(tmp_path) -> FileStore:
    return FileStore(tmp_path / "store")


def test_a_registered_checkpoint_is_a_listed_candidate_with_its_bytes_in_the_store(
    db, store, make_checkpoint
):
    path = make_checkpoint("reg-a")
    model = register_model(
        db, store, path, metrics={"validation_score": 0.8}, config={"epochs": 3}, split={"seed": 1}
    )
    assert (model.version, model.state) == ("reg-a", "candidate")
    assert model.checkpoint_key == f"models/reg-a/{model.sha256}.pt"
    assert store.get(model.checkpoint_key) == path.read_bytes()
    assert (model.metrics, model.config, model.split) == (
        {"validation_score": 0.8},
        {"epochs": 3},
        {"seed": 1},
    )
    assert [m.version for m in list_models(db)] == ["reg-a"]
    assert get_model(db, "reg-a") == model
    assert get_model(db, "nope") is None and promoted(db) is None


def test_registering_the_same_checkpoint_again_returns_the_same_version(db, store, make_checkpoint):
    first = register_model(db, store, make_checkpoint("same"), metrics={"validation_score": 0.5})
    again = register_model(db, store, make_checkpoint("same"), metrics={"validation_score": 0.9})
    assert again == first  # the first registration's metrics stand
    assert len(list_models(db)) == 1


def test_the_same_version_with_other_bytes_is_refused(db, store, make_checkpoint):
    register_model(db, store, make_checkpoint("clash", seed=1), metrics={})
    with pytest.raises(InvalidConfig, match="registered already with sha256"):
        register_model(db, store, make_checkpoint("clash", seed=2), metrics={})


def test_a_worse_candidate_is_refused_unless_forced_and_the_old_one_is_retired(db, store, make_checkpoint):
    register_model(db, store, make_checkpoint("good"), metrics={"validation_score": 0.8})
    register_model(db, store, make_checkpoint("worse"), metrics={"validation_score": 0.7})
    assert promote(db, "good").state == "promoted"
    with pytest.raises(
        InvalidConfig, match=r"worse than the promoted good on validation_score \(0.7 < 0.8\)"
    ):
        promote(db, "worse")
    assert promoted(db).version == "good"
    forced = promote(db, "worse", force=True)
    assert forced.state == "promoted" and forced.promoted_at is not None
    old = get_model(db, "good")
    assert old.state == "retired" and old.retired_at is not None
    assert [m.version for m in list_models(db) if m.state == "promoted"] == ["worse"]
    with pytest.raises(InvalidConfig, match="no model version ghost"):
        promote(db, "ghost", force=True)


def test_rollback_promotes_the_most_recently_retired_version_again(db, store, make_checkpoint):
    with pytest.raises(InvalidConfig, match="no retired model version"):
        rollback(db)
    for i, version in enumerate(("v1", "v2", "v3")):
        register_model(db, store, make_checkpoint(version), metrics={"validation_score": 0.5 + i / 10})
        promote(db, version)
    assert rollback(db).version == "v2"
    assert {m.version: m.state for m in list_models(db)} == {
        "v1": "retired",
        "v2": "promoted",
        "v3": "retired",
    }
    assert rollback(db).version == "v3"  # rolling back a rollback swaps back


def test_fetch_verifies_the_checksum_and_reuses_a_good_cached_copy(db, store, make_checkpoint, tmp_path):
    model = register_model(db, store, make_checkpoint("fetched"), metrics={})
    cache = tmp_path / "cache"
    path = fetch_checkpoint(store, model, cache)
    assert path == cache / f"{model.sha256}.pt" and UNet.from_checkpoint(path)[1].sha256 == model.sha256

    path.write_bytes(b"damaged")  # a bad cached copy is fetched again
    assert UNet.from_checkpoint(fetch_checkpoint(store, model, cache))[1].version == "fetched"

    store.put(model.checkpoint_key, make_checkpoint("fetched", seed=9).read_bytes())  # tampered object
    path.unlink()
    with pytest.raises(ModelInvalid, match="checksum mismatch"):
        fetch_checkpoint(store, model, cache)
    assert not path.exists()


def promote_at_once(db, versions: list[str]) -> list[Exception]:
    """Promote each version (forced) from its own thread, released together; the errors raised."""
    start, errors = threading.Barrier(len(versions)), []

    def race(version: str) -> None:
        start.wait()
        try:
            promote(db, version, force=True)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def test_two_promotions_at_once_leave_exactly_one_promoted_version(store, make_checkpoint):
    with pg_schema() as url:
        upgrade(url)
        db = connect(url)
        try:
            register_model(db, store, make_checkpoint("base"), metrics={"validation_score": 0.5})
            promote(db, "base")
            for round_ in range(3):
                versions = [f"race-{round_}-{side}" for side in "ab"]
                for version in versions:
                    register_model(db, store, make_checkpoint(version), metrics={"validation_score": 0.9})
                assert promote_at_once(db, versions) == []
                states = {m.version: m.state for m in list_models(db)}
                assert list(states.values()).count("promoted") == 1
                assert promoted(db).version in versions
                assert all(states[v] == "retired" for v in states if v != promoted(db).version)
        finally:
            db.dispose()


def test_the_models_commands_register_list_show_promote_and_roll_back(monkeypatch, tmp_path, make_checkpoint):
    from blastq.cli.main import main
    from blastq.cli.models import register

    register(main)
    for name in ("BLASTQ_CONFIG", "BLASTQ_DATABASE_URL", "BLASTQ_STORE_URL", "BLASTQ_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BLASTQ_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()

    def blastq(*args):
        return runner.invoke(main, ["models", *map(str, args)], catch_exceptions=False)

    for version, score in (("cli-a", 0.9), ("cli-b", 0.6)):
        metrics = tmp_path / f"{version}.json"
        metrics.write_text(json.dumps({"validation_score": score}))
        done = blastq("register", make_checkpoint(version), "--metrics-json", metrics)
        assert done.exit_code == 0 and f"model {version} is candidate" in done.output, done.output
    assert blastq("promote", "cli-a").exit_code == 0
    refused = blastq("promote", "cli-b")
    assert refused.exit_code == 2
    assert refused.output.strip().count("\n") == 0 and "use --force" in refused.output
    assert blastq("promote", "cli-b", "--force").exit_code == 0
    listed = blastq("list").output.splitlines()
    assert listed[0].split()[:3] == ["version", "state", "validation_score"]
    assert [line.split()[:2] for line in listed[1:]] == [["cli-a", "retired"], ["cli-b", "promoted"]]
    assert "model cli-a is promoted" in blastq("rollback").output
    shown = json.loads(blastq("show", "cli-a").output)
    assert shown["state"] == "promoted" and shown["metrics"] == {"validation_score": 0.9}
    assert blastq("show", "nope").exit_code == 2


# --- cell classifiers beside the U-Nets ---------------------------------------------------------------


@pytest.fixture(scope="session")
def make_classifier(tmp_path_factory):
    """classifier(version) -> the shipped classifier's model saved under another version."""
    from blastq.core.cells import load_cell_classifier, save_classifier

    folder = tmp_path_factory.mktemp("classifiers")
    shipped = load_cell_classifier("default")

    def classifier(version: str) -> Path:
        path = folder / f"{version}.pt"
        if not path.exists():
            save_classifier(path, replace(shipped.info, version=version), sklearn_model=shipped.sklearn_model)
        return path

    return classifier


def verdict(acceptable: bool, base: str) -> dict:
    return {"acceptable": acceptable, "base": base, "reasons": ["lab held-out: macro F1 0.7 < 0.8"]}


def test_a_classifier_is_promoted_beside_the_unet_only_on_its_own_not_worse_verdict(
    db, store, make_checkpoint, make_classifier
):
    from blastq.core.cells import load_cell_classifier

    shipped = load_cell_classifier("default").info.version
    register_model(db, store, make_checkpoint("unet-x"), metrics={"validation_score": 0.9})
    promote(db, "unet-x")
    worse = register_model(
        db, store, make_classifier("cls-worse"), metrics=verdict(False, shipped), kind="classifier"
    )
    assert worse.kind == "classifier" and worse.state == "candidate"
    with pytest.raises(InvalidConfig, match="not found not worse.*macro F1"):
        promote(db, "cls-worse")
    stale = register_model(
        db, store, make_classifier("cls-stale"), metrics=verdict(True, "other"), kind="classifier"
    )
    with pytest.raises(InvalidConfig, match=f"judged against other, but {shipped} is in use"):
        promote(db, stale.version)
    register_model(db, store, make_classifier("cls-good"), metrics=verdict(True, shipped), kind="classifier")
    promote(db, "cls-good")
    assert promoted(db, kind="classifier").version == "cls-good"
    assert promoted(db).version == "unet-x"  # one promoted of each kind
    # The next one must be judged against cls-good, the one now in use.
    register_model(
        db, store, make_classifier("cls-next"), metrics=verdict(True, "cls-good"), kind="classifier"
    )
    promote(db, "cls-next")
    assert rollback(db, kind="classifier").version == "cls-good"
    assert [m.version for m in list_models(db, kind="classifier")] == [
        "cls-worse",
        "cls-stale",
        "cls-good",
        "cls-next",
    ]
    promote(db, "cls-worse", force=True)
    assert promoted(db, kind="classifier").version == "cls-worse"


def test_a_checkpoint_registers_only_as_its_own_kind(db, store, make_checkpoint, make_classifier):
    with pytest.raises(ModelInvalid):
        register_model(db, store, make_checkpoint("unet-as-cls"), metrics={}, kind="classifier")
    with pytest.raises(ModelInvalid):
        register_model(db, store, make_classifier("cls-as-unet"), metrics={})


def test_the_registry_setting_runs_the_promoted_classifier_verified(tmp_path, make_classifier):
    from blastq.core.adapters import Settings
    from blastq.core.cells import load_cell_classifier
    from blastq.core.common import ModelInvalid as Invalid
    from blastq.core.pipeline import classifier_file, model_checkpoint

    settings = Settings(data_dir=tmp_path / "data", classifier="registry")
    assert classifier_file(settings) == "default"  # nothing promoted: the shipped one
    from blastq.core.adapters import connect as connect_db
    from blastq.core.adapters import store_from_settings

    db, store = connect_db(settings.database_url.get_secret_value()), store_from_settings(settings)
    path = make_classifier("cls-reg")
    model = register_model(db, store, path, metrics=verdict(True, "x"), kind="classifier")
    promote(db, "cls-reg", force=True)
    fetched = classifier_file(settings)
    assert load_cell_classifier(fetched).info.sha256 == model.sha256
    with pytest.raises(Invalid, match="is a classifier"):
        model_checkpoint(settings, "cls-reg")
