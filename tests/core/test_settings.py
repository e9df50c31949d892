from __future__ import annotations

from pathlib import Path

import pytest

from blastq.core.adapters.settings import hide_secrets, load_settings, mask_secret
from blastq.core.common.errors import InvalidConfig


def test_embedded_defaults_live_under_the_data_dir(tmp_path):
    s = load_settings({"BLASTQ_DATA_DIR": str(tmp_path)})
    assert s.database_url.get_secret_value() == f"sqlite:///{tmp_path}/blastq.db"
    assert s.store_url == f"file://{tmp_path}/store"
    assert s.engine == "auto" and s.device == "cpu"


def test_environment_overrides_file_and_overrides_win(tmp_path):
    cfg = tmp_path / "blastq.toml"
    cfg.write_text('tile_px = 128\ndevice = "cuda:0"\nblast_threshold_percent = 10\n')
    env = {"BLASTQ_CONFIG": str(cfg), "BLASTQ_TILE_PX": "512", "BLASTQ_DATA_DIR": str(tmp_path)}
    s = load_settings(env, device="cpu")
    assert (s.tile_px, s.device, s.blast_threshold_percent) == (512, "cpu", 10.0)
    assert isinstance(s.data_dir, Path)


@pytest.mark.parametrize(
    "env,match",
    [
        ({"BLASTQ_TILE_PX": "big"}, "tile_px"),
        ({"BLASTQ_BLAST_THRESHOLD_PERCENT": "150"}, "blast_threshold_percent"),
        ({"BLASTQ_MAX_PIXELS": "0"}, "max_pixels"),
        ({"BLASTQ_BLAST_CELL_THRESHOLD": "1.5"}, "blast_cell_threshold"),
        ({"BLASTQ_CONFIG": "/nonexistent/blastq.toml"}, "not found"),
    ],
)
def test_bad_settings_are_one_clear_error(env, match):
    with pytest.raises(InvalidConfig, match=match):
        load_settings(env)


def test_unknown_or_broken_config_file_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("tile_pix = 3\n")
    with pytest.raises(InvalidConfig, match="tile_pix"):
        load_settings({"BLASTQ_CONFIG": str(cfg)})
    cfg.write_text("tile_px = = 3\n")
    with pytest.raises(InvalidConfig, match="TOML"):
        load_settings({"BLASTQ_CONFIG": str(cfg)})


def test_passwords_never_printed():
    s = load_settings(
        {"BLASTQ_DATABASE_URL": "postgresql://lab:s3cret@db:5432/blastq", "BLASTQ_DATA_DIR": "/tmp/x"}
    )
    shown = " ".join(s.describe().values())
    assert "s3cret" not in shown and "lab:***@db" in shown
    assert mask_secret("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_whole_slide_chunking_comes_from_the_settings(tmp_path):
    from blastq.core.pipeline.wholeslide import whole_slide_config, whole_slide_key

    base = {"BLASTQ_DATA_DIR": str(tmp_path)}
    small = whole_slide_config(load_settings({**base, "BLASTQ_WSI_CHUNK_PX": "1536"}))
    default = whole_slide_config(load_settings(base))
    assert (small.chunk_px, default.chunk_px) == (1536, 3072)
    assert whole_slide_key("k", small) != whole_slide_key("k", default)  # another chunking, another result
    with pytest.raises(InvalidConfig, match="chunk_px=10"):
        whole_slide_config(load_settings({**base, "BLASTQ_WSI_CHUNK_PX": "10"}))
    with pytest.raises(InvalidConfig, match="BLASTQ_WSI_CHUNK_PX|wsi_chunk_px"):
        load_settings({**base, "BLASTQ_WSI_CHUNK_PX": "big"})


@pytest.mark.parametrize(
    "url,secret,shown",
    [
        ("postgresql://lab:s3cret@db:5432/blastq", "s3cret", "postgresql://lab:***@db:5432/blastq"),
        ("postgresql://lab:se/cr/et@db/blastq", "se/cr/et", "postgresql://lab:***@db/blastq"),
        (
            "postgresql+psycopg://lab:p@ss:w@rd@db/blastq",
            "p@ss:w@rd",
            "postgresql+psycopg://lab:***@db/blastq",
        ),
        ("postgresql://lab@db/blastq?password=s3cret&sslmode=require", "s3cret", "?password=***&sslmode"),
        ("postgresql://db/blastq?sslmode=require&pwd=s3cret", "s3cret", "&pwd=***"),
        ("postgresql://db/blastq?pass=s3cret", "s3cret", "?pass=***"),
        ("redis://q:6379/0?token=t0ken&secret=s3cret", "t0ken", "?token=***&secret=***"),
        ("redis://:hunt/er@2@q:6379/0", "hunt/er@2", "redis://:***@q:6379/0"),
        (
            "rediss://user:hunter2@q:6380/0?ssl_cert_reqs=required",
            "hunter2",
            "rediss://user:***@q:6380/0?ssl",
        ),
        ("sentinel://:pw-one@h1:26379;sentinel://:pw-two@h2:26379", "pw-", "@h1:26379;sentinel://:***@h2"),
    ],
)
def test_every_form_of_password_is_masked(url, secret, shown):
    masked = mask_secret(url)
    assert secret not in masked and shown in masked
    settings = load_settings(
        {"BLASTQ_DATA_DIR": "/tmp/x", "BLASTQ_DATABASE_URL": url, "BLASTQ_BROKER_URL": url}
    )
    described = settings.describe()
    assert secret not in described["database_url"] and secret not in described["broker_url"]


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "sqla+sqlite:////data/broker.db", "file:///data/store", "s3://bucket/p"],
)
def test_urls_without_a_password_are_shown_whole(url):
    assert mask_secret(url) == url


def test_an_error_message_hides_the_pieces_a_parser_splits_off_a_password():
    url = "postgresql://lab:p@ss/word@db/blastq"  # a driver reads password "p", host "ss"
    text = "failed to resolve host 'ss': ... database 'word@db/blastq' ... p@ss/word"
    hidden = hide_secrets(text, url)
    assert "'ss'" not in hidden and "word" not in hidden and "p@ss" not in hidden


def test_the_pipelines_defaults_are_the_settings_defaults_written_once(tmp_path):
    from blastq.core.adapters.settings import Settings, setting_default
    from blastq.core.pipeline import PipelineConfig, WholeSlideConfig, pipeline_config, whole_slide_config

    defaults = load_settings({"BLASTQ_DATA_DIR": str(tmp_path)})
    assert pipeline_config(defaults) == PipelineConfig()
    assert whole_slide_config(defaults) == WholeSlideConfig()
    assert setting_default("tile_px") == Settings(data_dir=tmp_path).tile_px == PipelineConfig().tile_px


def test_a_password_in_a_url_is_never_in_the_settings_printed_form(tmp_path):
    url = "postgresql+psycopg://lab:s3cret-pw@db:5432/blastq"
    s = load_settings(
        {"BLASTQ_DATA_DIR": str(tmp_path), "BLASTQ_DATABASE_URL": url, "BLASTQ_BROKER_URL": url}
    )
    assert "s3cret-pw" not in repr(s) and "s3cret-pw" not in str(s)
    assert s.database_url.get_secret_value() == url and s.broker_url.get_secret_value() == url
    with pytest.raises(InvalidConfig) as refused:  # a bad value next to a secret: the error shows no secret
        load_settings(
            {"BLASTQ_DATA_DIR": str(tmp_path), "BLASTQ_DATABASE_URL": url, "BLASTQ_MAX_ATTEMPTS": "0"}
        )
    assert "s3cret-pw" not in str(refused.value) and "BLASTQ_MAX_ATTEMPTS" in str(refused.value)


def test_only_load_settings_reads_the_environment(tmp_path, monkeypatch):
    from blastq.core.adapters.settings import Settings

    monkeypatch.setenv("BLASTQ_TILE_PX", "384")
    assert (
        load_settings({"BLASTQ_DATA_DIR": str(tmp_path)}).tile_px == 1024
    )  # the given mapping, not os.environ
    assert load_settings().tile_px == 384
    assert Settings(data_dir=tmp_path).tile_px == 1024  # built directly: the values given, nothing else


def test_settings_updated_are_checked_like_any_others(tmp_path):
    s = load_settings({"BLASTQ_DATA_DIR": str(tmp_path)})
    assert s.updated(watch_settle_s=0.0).watch_settle_s == 0.0 and s.watch_settle_s == 10.0
    with pytest.raises(InvalidConfig, match="watch_interval_s"):
        s.updated(watch_interval_s=float("nan"))
