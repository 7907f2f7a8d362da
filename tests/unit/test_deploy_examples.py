"""The shipped example settings load as they are (a broken example is a support ticket)."""

from pathlib import Path

from cargohold import config, units

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_loads():
    settings = config.load(ROOT / "deploy" / "cargohold.yaml", {}, {})
    assert settings.cluster == "prod" and settings.site == "eu" and len(settings.etcd) == 3
    assert units.parse_window(settings.gc_window) == (60, 300)


def test_systemd_unit_runs_serve_with_that_config():
    unit = (ROOT / "deploy" / "cargohold.service").read_text()
    assert "ExecStart=/opt/cargohold/.venv/bin/cargohold serve --config /etc/cargohold/cargohold.yaml" in unit
