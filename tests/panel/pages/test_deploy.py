"""`manage.py check --deploy` with production settings finds nothing to warn about."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]


def python(var_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Python in a fresh interpreter with a clean VPANEL_* environment (as test_home.py)."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("VPANEL_") and k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}}
    clean |= {"VPANEL_VAR_DIR": str(var_dir), "PYTHONPATH": str(REPO),
              "DJANGO_SETTINGS_MODULE": "panel.settings", **env}
    return subprocess.run([sys.executable, *args], env=clean, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


PRODUCTION = {
    "VPANEL_HTTPS": "1",
    "VPANEL_DEBUG": "0",
    "VPANEL_SECRET_KEY": secrets.token_urlsafe(64),
    "VPANEL_ALLOWED_HOSTS": "panel.example.com",
}


def test_check_deploy_reports_nothing_with_production_settings(tmp_path: Path) -> None:
    proc = python(tmp_path / "var", str(REPO / "manage.py"), "check", "--deploy",
                  "--fail-level", "WARNING", **PRODUCTION)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "System check identified no issues" in proc.stdout
    assert "WARNINGS" not in proc.stdout + proc.stderr


def test_https_turns_on_redirect_hsts_and_secure_cookies(tmp_path: Path) -> None:
    code = ("from django.conf import settings as s; print(s.SECURE_SSL_REDIRECT, "
            "s.SECURE_HSTS_SECONDS, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE)")
    proc = python(tmp_path / "var", "-c", code, **PRODUCTION)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "31536000", "True", "True"]
    plain = {**PRODUCTION, "VPANEL_HTTPS": "0"}
    proc = python(tmp_path / "var", "-c", code, **plain)
    assert proc.stdout.split() == ["False", "0", "False", "False"]


def test_behind_proxies_the_scheme_and_client_address_come_from_their_headers(
        tmp_path: Path) -> None:
    code = ("from django.conf import settings as s; print(s.SECURE_PROXY_SSL_HEADER, "
            "s.AXES_IPWARE_PROXY_COUNT)")
    proc = python(tmp_path / "var", "-c", code, **PRODUCTION, VPANEL_PROXIES="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["('HTTP_X_FORWARDED_PROTO',", "'https')", "1"]
    bad = python(tmp_path / "var", "-c", code, **PRODUCTION, VPANEL_PROXIES="-1")
    assert bad.returncode != 0 and "VPANEL_PROXIES" in bad.stderr


def test_the_audited_address_is_the_one_the_providers_proxies_appended(settings: Any) -> None:
    from django.test import RequestFactory

    from panel.hosting.views import source_ip

    rf = RequestFactory()
    forged = {"HTTP_X_FORWARDED_FOR": "198.19.113.9, 198.18.7.7", "REMOTE_ADDR": "198.18.0.1"}
    settings.VPANEL_PROXIES = 0
    assert source_ip(rf.get("/", **forged)) == "198.18.0.1"  # no proxy: the header is ignored
    settings.VPANEL_PROXIES = 1
    assert source_ip(rf.get("/", **forged)) == "198.18.7.7"  # what our proxy appended
    settings.VPANEL_PROXIES = 2
    assert source_ip(rf.get("/", **forged)) == "198.19.113.9"
    settings.VPANEL_PROXIES = 3  # fewer hops than proxies: the connection's own address
    assert source_ip(rf.get("/", **forged)) == "198.18.0.1"
    settings.VPANEL_PROXIES = 1
    assert source_ip(rf.get("/", HTTP_X_FORWARDED_FOR="not-an-ip", REMOTE_ADDR="x")) is None
