"""The node-to-node credential as pure code (cargohold.auth.peer), and the start-up rule for the
gRPC port in config.py: the check can be turned off only on loopback or under mutual TLS."""

from __future__ import annotations

import pytest

from cargohold import config
from cargohold.auth.peer import MAX_SKEW, PeerSecrets, check, sign

METHOD = "/cargohold.replication.v1.Replication/ReadBlob"
NOW = 1_800_000_000.0


@pytest.fixture
def keys() -> PeerSecrets:
    return PeerSecrets.generate(NOW)


def test_a_signed_call_passes_within_the_allowed_clock_skew(keys):
    for drift in (0, MAX_SKEW - 1, -(MAX_SKEW - 1)):
        assert check(sign(keys.signing, METHOD, NOW + drift), METHOD, keys, NOW) is None


@pytest.mark.parametrize("value, why", [
    (None, "no peer credential"),
    ("", "malformed"),
    ("Bearer abc", "malformed"),
    ("cargohold-peer 12x.abc", "malformed"),
    ("cargohold-peer ١٢٣.abc", "malformed"),            # non-ASCII digits are not a time stamp
    ("cargohold-peer 1800000000.", "wrong"),
    ("cargohold-peer 1800000000.é" + "0" * 63, "wrong"),   # non-ASCII in the MAC: refused, not an error
])
def test_missing_or_malformed_credentials_are_refused(keys, value, why):
    reason = check(value, METHOD, keys, NOW)
    assert reason is not None and why in reason


def test_a_credential_is_bound_to_its_method_its_time_and_the_secret(keys):
    assert "wrong" in check(sign(keys.signing, "/cargohold.replication.v1.Replication/StatBlob", NOW),
                            METHOD, keys, NOW)
    assert "clock" in check(sign(keys.signing, METHOD, NOW - MAX_SKEW - 2), METHOD, keys, NOW)
    assert "clock" in check(sign(keys.signing, METHOD, NOW + MAX_SKEW + 2), METHOD, keys, NOW)
    stranger = PeerSecrets.generate(NOW)
    assert "wrong" in check(sign(stranger.signing, METHOD, NOW), METHOD, keys, NOW)


def test_rotation_keeps_the_previous_secret_accepted_unless_dropped(keys):
    rotated = keys.rotated(NOW, drop_old=False)
    assert rotated.signing != keys.signing and rotated.secrets[1:] == (keys.signing,)
    old_call = sign(keys.signing, METHOD, NOW)
    assert check(old_call, METHOD, rotated, NOW) is None
    assert check(sign(rotated.signing, METHOD, NOW), METHOD, rotated, NOW) is None
    twice = rotated.rotated(NOW, drop_old=False)
    assert len(twice.secrets) == 2 and check(old_call, METHOD, twice, NOW) is not None
    dropped = keys.rotated(NOW, drop_old=True)
    assert dropped.secrets == (dropped.signing,) and check(old_call, METHOD, dropped, NOW) is not None


def test_stored_secrets_round_trip_and_malformed_ones_are_refused(keys):
    rotated = keys.rotated(NOW + 5, drop_old=False)
    assert PeerSecrets.decode(rotated.encode()) == rotated
    for raw in (b"", b"{}", b'{"secrets": []}', b'{"secrets": ["c2hvcnQ="]}', b'{"secrets": ["!!"]}',
                b'{"secrets": 3}', b"[1]"):
        with pytest.raises(ValueError):
            PeerSecrets.decode(raw)


@pytest.mark.parametrize("listen, tls, insecure, refused", [
    ("0.0.0.0:5001", False, False, False),          # the credential is always checked: any address
    ("127.0.0.1:5001", False, True, False),         # unchecked on loopback: debugging
    ("[::1]:5001", False, True, False),
    ("localhost:5001", False, True, False),
    ("0.0.0.0:5001", False, True, True),            # unchecked on a network: refused
    ("10.0.0.7:5001", False, True, True),
    (":5001", False, True, True),                   # all addresses
    ("0.0.0.0:5001", True, True, False),            # unchecked under mutual TLS: the CA still gates it
])
def test_an_unchecked_grpc_port_needs_loopback_or_mutual_tls(listen, tls, insecure, refused):
    settings = config.Settings(grpc_listen=listen, grpc_insecure=insecure)
    if tls:
        settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_ca = "c.pem", "k.pem", "ca.pem"
    if refused:
        with pytest.raises(config.ConfigError, match="--grpc-insecure"):
            config.validate(settings)
    else:
        config.validate(settings)


def test_grpc_insecure_comes_from_flags_environment_and_file(tmp_path):
    assert config.load(None, {"grpc_insecure": True}, environ={}).grpc_insecure
    assert config.load(None, {}, environ={"CARGOHOLD_GRPC_INSECURE": "true"}).grpc_insecure
    path = tmp_path / "c.yaml"
    path.write_text("grpc_insecure: true\ngrpc_listen: 0.0.0.0:5001\n")
    with pytest.raises(config.ConfigError, match="not a loopback address"):
        config.load(path, {}, environ={})
