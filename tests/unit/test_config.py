from pathlib import Path

import pytest

from cargohold import config, units


def test_precedence_file_env_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("listen: 127.0.0.1:6000\ncluster: fromfile\nsite: s1\n")
    env = {"CARGOHOLD_CLUSTER": "fromenv", "CARGOHOLD_ETCD": "http://a:1,http://b:2"}
    s = config.load(f, {"site": "fromflag", "listen": None}, env)
    assert s.listen == "127.0.0.1:6000" and s.cluster == "fromenv" and s.site == "fromflag"
    assert s.etcd == ["http://a:1", "http://b:2"]


def test_toml_and_unknown_keys(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('data_dir = "/tmp/x"\nmin_copies = 2\n')
    s = config.load(f, {}, {})
    assert s.data_dir == Path("/tmp/x") and s.min_copies == 2
    f.write_text('nonsense = 1\n')
    with pytest.raises(config.ConfigError):
        config.load(f, {}, {})


@pytest.mark.parametrize("flags", [{"runtime": "gevent"}, {"listen": "nope"}, {"node_id": "a/b"},
                                   {"tls_cert": "x"}])
def test_invalid_settings(flags):
    with pytest.raises(config.ConfigError):
        config.load(None, flags, {})


def test_node_id_is_generated_once(tmp_path):
    s = config.load(None, {"data_dir": tmp_path}, {})
    first = config.resolve_node_id(s)
    assert first == config.resolve_node_id(s) and "/" not in first


def test_map_settings_from_file_and_environment(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("site_bandwidth:\n  eu: 50M\n")
    assert config.load(f, {}, {}).site_bandwidth == {"eu": "50M"}
    s = config.load(None, {}, {"CARGOHOLD_SITE_BANDWIDTH__us": "20M"})
    assert s.site_bandwidth == {"us": "20M"}
    assert units.parse_size("50M") == 50 * 2**20 and units.parse_size("1.5K") == 1536
    with pytest.raises(config.ConfigError):
        config.load(None, {"site_bandwidth": {"eu": "fast"}}, {})
