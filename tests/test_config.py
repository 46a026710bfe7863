"""
Configuration layers, checks and secret handling.
"""

from __future__ import annotations

import pytest

from reductrai.config import ConfigError, FIELDS, example_config, load_settings


def test_defaults_are_store_only():
    """
    The embedded defaults listen on loopback and configure no upstream.
    """
    settings = load_settings(None, environ={})
    assert settings.effective_mode == "store-only"
    assert not settings.has_upstream
    assert settings["server.listen"] == ["ssl:8443:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1"]
    assert settings["server.admin_listen"] == ["tcp:8081:interface=127.0.0.1"]
    assert settings["server.data_dir"] == "./var"


def test_file_then_environment_then_command_line(tmp_path):
    """
    The environment overrides the file and the command line overrides both.
    """
    path = tmp_path / "reductrai.toml"
    path.write_text('[proxy]\nforward_to = "https://file.invalid"\nsample_rate = 0.5\n[storage]\ncompression_level = 9\n')
    settings = load_settings(str(path), environ={"FORWARD_TO": "https://env.invalid", "SAMPLE_RATE": "0.25"})
    assert settings["proxy.forward_to"] == "https://env.invalid"
    assert settings["proxy.sample_rate"] == 0.25
    assert settings["storage.compression_level"] == 9
    assert settings.origins["storage.compression_level"] == str(path)
    settings = load_settings(
        str(path), environ={"FORWARD_TO": "https://env.invalid"},
        overrides={"proxy.forward_to": "https://cli.invalid/"},
    )
    assert settings["proxy.forward_to"] == "https://cli.invalid"
    assert settings.origins["proxy.forward_to"] == "command line"
    assert settings.effective_mode == "sample"


def test_generic_environment_names():
    """
    Every setting is reachable as REDUCTRAI_<SECTION>_<NAME>.
    """
    settings = load_settings(None, environ={"REDUCTRAI_UPSTREAM_TIMEOUT": "7.5", "REDUCTRAI_STORAGE_DURABILITY": "fsync"})
    assert settings["upstream.timeout"] == 7.5
    assert settings["storage.durability"] == "fsync"


def test_host_and_port_shortcuts():
    """
    REDUCTRAI_HOST and REDUCTRAI_PORT rewrite the default listeners.
    """
    settings = load_settings(None, environ={"REDUCTRAI_HOST": "0.0.0.0", "REDUCTRAI_PORT": "9090"})
    assert settings["server.listen"] == ["ssl:8443:interface=0.0.0.0", "tcp:9090:interface=0.0.0.0"]


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"PROXY_MODE": "both"}, "proxy.mode: invalid value 'both' from environment variable PROXY_MODE; allowed: '', 'forward', 'sample', 'store-only', 'forward-only'"),
        ({"SAMPLE_RATE": "-0.1"}, "proxy.sample_rate: invalid value '-0.1' from environment variable SAMPLE_RATE; the minimum is 0"),
        ({"REDUCTRAI_PORT": "70000"}, "the maximum is 65535"),
        ({"DD_SITE": "datadoghq.org"}, "datadog.site: invalid value 'datadoghq.org'"),
        ({"DATADOG_ENDPOINT": "api.datadoghq.eu"}, "expected an http:// or https:// base URL"),
    ],
)
def test_invalid_values_name_setting_value_and_choices(environ, message):
    """
    Wrong values raise ConfigError naming setting, value and what is allowed.
    """
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ=environ)
    assert message in str(caught.value)


def test_unknown_key_in_file(tmp_path):
    """
    A misspelled key is an error that lists the section's keys.
    """
    path = tmp_path / "bad.toml"
    path.write_text('[proxy]\nforward_too = "x"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path), environ={})
    assert "unknown setting 'proxy.forward_too'" in str(caught.value)
    assert "proxy.forward_to" in str(caught.value)


def test_secret_from_file_and_redacted(tmp_path):
    """
    DATADOG_API_KEY_FILE reads the key; repr and describe never show it.
    """
    key_file = tmp_path / "key"
    key_file.write_text("s3cr3tvalue0123456789\n")
    settings = load_settings(None, environ={"DATADOG_API_KEY_FILE": str(key_file)})
    secret = settings["datadog.api_key"]
    assert secret.reveal() == "s3cr3tvalue0123456789"
    assert "s3cr3tvalue" not in repr(settings)
    assert "s3cr3tvalue" not in repr(secret)
    assert "s3cr3tvalue" not in str(settings.describe())


def test_secret_file_key_in_toml(tmp_path):
    """
    A secret's <name>_file key in the file reads the value from that file.
    """
    key_file = tmp_path / "key"
    key_file.write_text("fromfile123")
    path = tmp_path / "c.toml"
    path.write_text(f'[datadog]\napi_key_file = "{key_file}"\n')
    settings = load_settings(str(path), environ={})
    assert settings["datadog.api_key"].reveal() == "fromfile123"


def test_invalid_secret_message_hides_value():
    """
    Even a rejected secret value is never part of the message.
    """
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={"DATADOG_API_KEY": "   "})
    assert "<secret>" in str(caught.value) or "non-empty" in str(caught.value)


def test_example_config_parses_to_defaults(tmp_path):
    """
    The annotated example holds every setting and parses to the defaults.
    """
    text = example_config()
    path = tmp_path / "example.toml"
    path.write_text(text)
    settings = load_settings(str(path), environ={})
    defaults = load_settings(None, environ={})
    for field in FIELDS:
        assert settings[field.key] == defaults[field.key], field.key
        if field.kind != "secret":
            assert f"\n{field.name} = " in text, field.key


def test_shipped_example_is_current():
    """
    conf/reductrai.example.toml is what example_config renders today
    (regenerate it with make example-config).
    """
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "conf" / "reductrai.example.toml"
    assert shipped.read_text() == example_config()
