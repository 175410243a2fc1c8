"""deploy/systemd: an agent restart leaves the guests alone; a host shutdown stops them."""

from __future__ import annotations

import configparser
import shlex
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "deploy" / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    # systemd repeats keys (Environment=, Wants=), which strict parsing refuses;
    # the last one wins here, enough for the keys checked below.
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    with (UNITS / name).open(encoding="utf-8") as f:
        p.read_file(f)
    return p


def words(value: str) -> list[str]:
    return value.split()


def test_stopping_or_restarting_the_agent_kills_only_the_agent() -> None:
    agent = unit("vpanel-agent.service")["Service"]
    assert agent["KillMode"] == "process"
    assert agent["Restart"] == "on-failure"
    argv = shlex.split(agent["ExecStart"])
    assert argv[0].endswith("/hostagent") and argv[1] == "serve"
    # The agent starts the ONBOOT guests once per boot (it keeps the boot id),
    # so a restart does not start again a guest an admin has stopped.
    assert "--no-onboot" not in argv[2:]
    text = (UNITS / "vpanel-agent.service").read_text()
    for var in ("VSERVER_CONFDIR", "VSERVER_ROOTDIR", "VSERVER_RUNDIR", "VSERVER_CGROUP"):
        assert f"Environment={var}=" in text


def test_the_guests_unit_stops_every_guest_only_when_it_is_stopped_itself() -> None:
    guests = unit("vpanel-guests.service")
    svc = guests["Service"]
    assert svc["Type"] == "oneshot"
    assert svc["RemainAfterExit"] == "yes"
    assert shlex.split(svc["ExecStop"])[0].endswith("/vservers")
    assert shlex.split(svc["ExecStop"])[1:] == ["stop"]
    # A failed guest at boot must not fail the unit: ExecStop runs only for an active one.
    assert svc["ExecStart"].startswith("-")
    assert shlex.split(svc["ExecStart"].lstrip("-"))[1:] == ["start"]
    assert "vpanel-agent.service" in words(guests["Unit"]["After"])
    # Any of these would carry an agent restart over to the guests.
    for key in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert "vpanel-agent.service" not in words(guests["Unit"].get(key, "")), key


@pytest.mark.parametrize("name", ["vpanel-agent.service", "vpanel-guests.service"])
def test_units_run_commands_from_the_venv_and_can_be_enabled(name: str) -> None:
    u = unit(name)
    assert u["Install"]["WantedBy"] == "multi-user.target"
    for key in ("ExecStart", "ExecStop"):
        if key in u["Service"]:
            exe = shlex.split(u["Service"][key].lstrip("-"))[0]
            assert exe.startswith("/opt/vpanel/.venv/bin/"), exe


def test_the_commands_the_units_run_are_console_scripts() -> None:
    with (REPO / "pyproject.toml").open("rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["vservers"] == "hostagent.cli.vservers:main"
    assert "hostagent" in scripts
