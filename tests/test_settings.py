import pytest

from bot.settings import DEFAULT_MODEL, Settings


def test_defaults_need_nothing():
    s = Settings.load(env={})
    assert s.model == str(DEFAULT_MODEL) and s.allow_private_fetch is False and s.discord_token is None


def test_environment_overrides_toml_and_parses_types(tmp_path):
    config = tmp_path / "hnaas.toml"
    config.write_text('batch_size = 4\ndb = "from-file.sqlite3"\ntemperature = 0.7\n')
    s = Settings.load(config, env={"HNAAS_BATCH_SIZE": "16", "HNAAS_ALLOW_PRIVATE_FETCH": "1",
                                   "HNAAS_HN_API_BASE": "http://127.0.0.1:9/v0", "DISCORD_TOKEN": "sekrit"})
    assert s.batch_size == 16 and s.db == "from-file.sqlite3" and s.temperature == 0.7
    assert s.allow_private_fetch is True and s.hn_api_base == "http://127.0.0.1:9/v0"
    assert s.discord_token == "sekrit" and "sekrit" not in repr(s)


def test_config_file_from_environment_and_bad_values(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("max_links_per_message = 2\n")
    assert Settings.load(env={"HNAAS_CONFIG": str(config)}).max_links_per_message == 2
    with pytest.raises(ValueError, match="HNAAS_BATCH_SIZE"):
        Settings.load(env={"HNAAS_BATCH_SIZE": "many"})
    config.write_text("batch_sise = 2\n")
    with pytest.raises(ValueError, match="batch_sise"):
        Settings.load(config, env={})
