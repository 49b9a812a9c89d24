"""deploy/docker-compose.yml agrees with the settings the node reads.
(Docker cannot run here; the file itself is checked.)"""

from __future__ import annotations

from typing import Any

import yaml

from fluxkv import config

from .conftest import ROOT


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_every_flux_variable_is_a_setting_with_a_valid_value() -> None:
    known = {s.env for s in config.SETTINGS}
    services = compose()["services"]
    assert services
    for name, service in services.items():
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        flux = {k: v for k, v in env.items() if k.startswith("FLUX_")}
        assert set(flux) <= known, f"{name}: variables the node does not read: {sorted(set(flux) - known)}"
        config.load({}, flux)  # raises ConfigError on an invalid value


def test_nodes_listen_on_all_interfaces_on_their_published_port() -> None:
    for name, service in compose()["services"].items():
        if "fluxkv-server" not in service["command"]:
            continue
        env = service["environment"]
        assert env["FLUX_SERVER_HOST"] == "0.0.0.0", name
        published = [p.split(":")[-1] for p in service["ports"]]
        assert str(env["FLUX_SERVER_PORT"]) in published, name
