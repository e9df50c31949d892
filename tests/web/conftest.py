"""The review station over a real PostgreSQL schema and a store holding a real pipeline result."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import cv2
import pytest
from webkit import PASSWORDS, ROLES, sign_in


@dataclass
class Station:
    settings: object
    db: object
    result_id: int
    threshold: float

    def new_sample(self, prefix: str = "S") -> tuple[int, str]:
        """A new sample holding the recorded field; returns (id, name)."""
        from blastq.core.adapters import add_to_sample, ensure_sample

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        sample_id = ensure_sample(self.db, name, self.threshold, 5)
        add_to_sample(self.db, sample_id, self.result_id)
        return sample_id, name


@pytest.fixture(scope="session")
def station(tmp_path_factory, smear):
    """Settings on a fresh PostgreSQL schema and a file store, one recorded field, four accounts."""
    from services import pg_schema

    from blastq.core.adapters import Settings, add_user, upgrade
    from blastq.core.pipeline import LocalRunner

    root = tmp_path_factory.mktemp("station")
    image = root / "field.png"
    cv2.imwrite(str(image), smear.image[..., ::-1])
    with pg_schema() as url:
        upgrade(url)
        settings = Settings(data_dir=root / "data", database_url=url, secret_key="k" * 40)
        runner = LocalRunner.from_settings(settings)
        runner.run(image, mpp=0.2)
        [result_id] = [r for r in _result_ids(runner.db)]
        for name, password in PASSWORDS.items():
            add_user(runner.db, name, password, ROLES[name], f"{name.title()} Test")
        yield Station(settings, runner.db, result_id, 20.0)
        runner.db.dispose()


def _result_ids(db):
    from blastq.core.adapters import list_results

    return [r.id for r in list_results(db)]


@pytest.fixture
def app(station):
    from blastq.web.app import create_app

    return create_app(station.settings, db=station.db)


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


@pytest.fixture
def as_user(client):
    def login(username: str):
        token = sign_in(client, username)
        client.headers["X-CSRF-Token"] = token
        return client

    return login
