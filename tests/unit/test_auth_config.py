"""Access-control settings: validated at load, secure by default off loopback."""

import pytest

from cargohold import config


def test_defaults_and_flags():
    s = config.load(None, {}, {})
    assert (s.auth, s.insecure_open, s.token_ttl, s.login_rate, s.login_rate_client) == ("auto", False, 300.0,
                                                                                         "10/300", "30/60")
    s = config.load(None, {"auth": "on", "audit_log": "-", "insecure_open": None}, {"CARGOHOLD_TOKEN_TTL": "60"})
    assert s.auth == "on" and s.audit_log == "-" and s.token_ttl == 60.0


@pytest.mark.parametrize("flags", [{"auth": "maybe"}, {"login_rate": "lots"}, {"login_rate_client": "0/60"},
                                   {"token_ttl": 1}, {"token_ttl": 10**6},
                                   {"auth": "off", "listen": "0.0.0.0:5000"},
                                   {"auth": "off", "listen": "[::]:5000"},
                                   {"auth": "off", "listen": "10.1.2.3:5000"}])
def test_invalid_access_settings(flags):
    with pytest.raises(config.ConfigError):
        config.load(None, flags, {})


def test_auth_off_is_allowed_on_loopback_or_when_insisted():
    for listen in ("127.0.0.1:5000", "[::1]:5000", "localhost:5000", "127.8.9.10:5000"):
        assert config.load(None, {"auth": "off", "listen": listen}, {}).auth == "off"
    assert config.load(None, {"auth": "off", "listen": "0.0.0.0:5000", "insecure_open": True}, {}).insecure_open


def test_loopback_detection():
    assert config.is_loopback("127.0.0.1") and config.is_loopback("::1") and config.is_loopback("localhost")
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""):
        assert not config.is_loopback(host)
