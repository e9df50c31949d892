"""The Celery configuration ARCHITECTURE.md decides, the service settings, and how submit finds files."""

from __future__ import annotations

import pytest

from blastq.core.adapters.settings import load_settings
from blastq.core.common.errors import InvalidConfig
from blastq.worker.celery_app import make_app
from blastq.worker.submit import expand_paths
from blastq.worker.tasks import PROCESS_SLIDE


def test_the_app_is_json_only_late_acking_one_message_at_a_time(tmp_path):
    settings = load_settings(
        {"BLASTQ_DATA_DIR": str(tmp_path), "BLASTQ_BROKER_URL": "redis://127.0.0.1:6379/3"}
    )
    conf = make_app(settings).conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert [q.name for q in conf.task_queues] == ["slides", "train"]
    assert conf.task_default_queue == "slides"
    assert conf.broker_transport_options["visibility_timeout"] == 3600
    assert conf.broker_connection_retry_on_startup
    assert not conf.result_backend and conf.task_ignore_result
    # A pool process loads its engine before it reports up (2-7 s on 2 cores): Celery's 4 s default
    # killed new pool processes one after another on a loaded machine (the soak).
    assert conf.worker_proc_alive_timeout >= 600


def test_the_task_has_its_explicit_name_and_policy(tmp_path):
    task = make_app(load_settings({"BLASTQ_DATA_DIR": str(tmp_path)})).tasks[PROCESS_SLIDE]
    assert (
        task.acks_late and task.reject_on_worker_lost and task.max_retries is None
    )  # run_job bounds retries


def test_two_apps_keep_their_own_settings(tmp_path):
    one = make_app(load_settings({"BLASTQ_DATA_DIR": str(tmp_path / "one")}))
    two = make_app(load_settings({"BLASTQ_DATA_DIR": str(tmp_path / "two")}))
    assert one.tasks[PROCESS_SLIDE].app is one and two.tasks[PROCESS_SLIDE].app is two


def test_the_embedded_broker_is_sqlite_under_the_data_dir(tmp_path):
    settings = load_settings({"BLASTQ_DATA_DIR": str(tmp_path)})
    assert settings.broker_url.get_secret_value() == f"sqla+sqlite:///{tmp_path}/broker.db"
    # Kombu hands these options to SQLAlchemy's create_engine: no Redis-only keys allowed there.
    assert make_app(settings).conf.broker_transport_options == {"connect_args": {"timeout": 30}}


def test_service_settings_are_read_as_integers_and_checked(tmp_path):
    env = {"BLASTQ_DATA_DIR": str(tmp_path), "BLASTQ_MAX_ATTEMPTS": "5", "BLASTQ_WORKER_CONCURRENCY": "2"}
    settings = load_settings(env)
    assert (settings.max_attempts, settings.worker_concurrency) == (5, 2)
    assert (settings.visibility_timeout_s, settings.task_retry_max, settings.transient_wait_s) == (
        3600,
        1000,
        3600,
    )
    with pytest.raises(InvalidConfig, match="max_attempts"):
        load_settings({**env, "BLASTQ_MAX_ATTEMPTS": "0"})
    with pytest.raises(InvalidConfig, match="visibility_timeout_s"):
        load_settings({**env, "BLASTQ_VISIBILITY_TIMEOUT_S": "soon"})


def test_a_redis_password_is_masked(tmp_path):
    settings = load_settings(
        {"BLASTQ_DATA_DIR": str(tmp_path), "BLASTQ_BROKER_URL": "redis://:hunter2@q:6379/0"}
    )
    assert settings.describe()["broker_url"] == "redis://:***@q:6379/0"


def test_files_folders_and_globs_expand_to_each_file_once(tmp_path):
    (tmp_path / "scans").mkdir()
    for name in ("b.png", "a.TIF", "notes.txt"):
        (tmp_path / "scans" / name).write_bytes(b"x")
    (tmp_path / "scans" / "sub").mkdir()
    named = tmp_path / "scans" / "notes.txt"
    files, errors = expand_paths(
        [
            tmp_path / "scans",
            str(tmp_path / "scans" / "*.png"),
            named,
            tmp_path / "missing.png",
            "/nowhere/*.png",
        ]
    )
    assert [f.name for f in files] == ["a.TIF", "b.png", "notes.txt"]  # a folder gives images only
    assert [e.error.split(": ")[1] for e in errors] == ["no such file", "no files match"]
