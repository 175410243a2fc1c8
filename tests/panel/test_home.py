"""The panel boots and serves its first pages, with safe defaults."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

REPO = Path(__file__).resolve().parents[2]


def load_settings(var_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Load panel.settings in a fresh interpreter with a clean VPANEL_* environment.

    A subprocess, because pytest-django forces DEBUG off in this process and
    settings are read once per process.
    """
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("VPANEL_") and k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}
    }
    clean |= {"VPANEL_VAR_DIR": str(var_dir), "PYTHONPATH": str(REPO), **env}
    code = (
        "import json, django; from django.conf import settings; "
        "print(json.dumps({'debug': settings.DEBUG, 'secret_key': settings.SECRET_KEY, "
        "'db': str(settings.DATABASES['default']['NAME'])}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env=clean | {"DJANGO_SETTINGS_MODULE": "panel.settings"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def loaded(var_dir: Path, **env: str) -> dict[str, object]:
    proc = load_settings(var_dir, **env)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_home_page_answers_and_names_vpanel(client: Client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    body = response.content.decode()
    assert "<h1>vpanel</h1>" in body
    assert "Linux-VServer" in body
    assert "<code>vserver</code>" in body
    assert "/static/css/vpanel.css" in body
    assert f"vpanel {settings.VPANEL_VERSION}" in body


def test_home_page_sends_protective_headers(client: Client) -> None:
    response = client.get("/")
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"


def test_home_page_refuses_writes(client: Client) -> None:
    assert client.post("/").status_code == 405


def test_healthz_returns_ok_json(client: Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"status": "ok"}
    assert "no-store" in response["Cache-Control"]


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.evil.example", "localhost:8000@x"])
def test_unknown_host_header_is_refused(client: Client, host: str) -> None:
    assert client.get("/", HTTP_HOST=host).status_code == 400
    assert client.get("/healthz", HTTP_HOST=host).status_code == 400


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:8000", "[::1]:8000"])
def test_loopback_hosts_are_served(client: Client, host: str) -> None:
    assert client.get("/healthz", HTTP_HOST=host).status_code == 200


def test_admin_login_page_loads(client: Client) -> None:
    response = client.get("/admin/login/")
    assert response.status_code == 200
    assert 'name="password"' in response.content.decode()


def test_admin_index_asks_for_login(client: Client) -> None:
    response = client.get("/admin/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


def test_debug_is_off_by_default(tmp_path: Path) -> None:
    assert loaded(tmp_path / "var")["debug"] is False
    assert loaded(tmp_path / "var", VPANEL_DEBUG="1")["debug"] is True
    assert loaded(tmp_path / "var", VPANEL_DEBUG="off")["debug"] is False


def test_unrecognised_debug_value_is_an_error(tmp_path: Path) -> None:
    proc = load_settings(tmp_path / "var", VPANEL_DEBUG="maybe")
    assert proc.returncode != 0
    assert "VPANEL_DEBUG" in proc.stderr


def test_secret_key_is_generated_once_and_private(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    first = loaded(var_dir)
    key_file = var_dir / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(var_dir.stat().st_mode) == 0o700
    assert len(str(first["secret_key"])) >= 50
    assert key_file.read_text().strip() == first["secret_key"]
    assert loaded(var_dir)["secret_key"] == first["secret_key"]
    assert first["db"] == str(var_dir / "db.sqlite3")
    assert [p.name for p in var_dir.iterdir()] == ["secret_key"]


def test_secret_key_from_environment_writes_no_file(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    assert loaded(var_dir, VPANEL_SECRET_KEY="k" * 60)["secret_key"] == "k" * 60
    assert not (var_dir / "secret_key").exists()


def test_secret_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    var_dir.mkdir()
    key_file = var_dir / "secret_key"
    key_file.write_text("x" * 60)
    key_file.chmod(0o644)
    proc = load_settings(var_dir)
    assert proc.returncode != 0
    assert "chmod 600" in proc.stderr
