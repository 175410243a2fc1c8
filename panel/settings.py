"""Settings of the vpanel panel.

Everything a deployment changes comes from the environment:

  VPANEL_SECRET_KEY   the signing key; when unset, one is generated once and
                      kept in VAR_DIR/secret_key (mode 0600)
  VPANEL_DEBUG        1/true/yes/on to turn Django's debug mode on (default off)
  VPANEL_ALLOWED_HOSTS  comma-separated host names served besides the loopback ones
  VPANEL_HTTPS        1 when the panel is only reached over HTTPS: cookies become Secure,
                      plain-HTTP requests are redirected and HSTS is sent (one year)
  VPANEL_STAFF_2FA    1 to make staff users enrol a TOTP device before they may use
                      any page (default off; users with a device are always asked
                      for its code at login, staff or not)
  VPANEL_PROXIES      how many reverse proxies of yours stand in front of the panel
                      (default 0). With N > 0 the panel believes the scheme in
                      X-Forwarded-Proto and takes the client's address from the
                      Nth address from the right of X-Forwarded-For (what your
                      own proxies appended), for the audit log and login throttling
  VPANEL_API_RATE     requests a user (or token) may make to the REST API (default
                      1200/min); VPANEL_API_ANON_RATE the same without a login (60/min)
  VPANEL_VAR_DIR      state directory (default var/ in the source tree): the
                      secret key and the SQLite database
  DATABASE_URL        postgres://USER:PASS@HOST/DB for PostgreSQL (default SQLite)
  REDIS_URL           redis://HOST:PORT for the channel layer (default in memory)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import secrets
import tempfile
import tomllib
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _env_bool(name: str, default: bool) -> bool:
    """Read a yes/no environment variable; anything unrecognised is an error, not "no"."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r}: use 1/true/yes/on or 0/false/no/off")


def _read_secret_key(path: Path) -> str:
    with path.open(encoding="ascii") as f:
        # fstat the descriptor we read from, so the mode checked is that of this file.
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise ImproperlyConfigured(
                f"{path} is readable by other users (mode {mode & 0o777:o}): "
                "chmod 600 it, or delete it and let the panel generate a new key"
            )
        key = f.read().strip()
    if not key:
        raise ImproperlyConfigured(f"{path} is empty: delete it to generate a new key")
    return key


def _secret_key(var_dir: Path) -> str:
    from_env = os.environ.get("VPANEL_SECRET_KEY", "").strip()
    if from_env:
        return from_env
    path = var_dir / "secret_key"
    with contextlib.suppress(FileNotFoundError):
        return _read_secret_key(path)
    # Write the key to a private temporary file (mkstemp creates it 0600), then
    # hard-link it into place: link() fails when another process (a second
    # pytest-xdist worker, a manage.py started alongside) got there first, so
    # every process ends up reading the same, completely written key.
    fd, tmp = tempfile.mkstemp(dir=var_dir, prefix=".secret_key.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_urlsafe(50) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return _read_secret_key(path)


def _version() -> str:
    """The version in pyproject.toml in a source tree, else that of the installed package."""
    pyproject = BASE_DIR / "pyproject.toml"
    if pyproject.is_file():
        with pyproject.open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    try:
        return importlib.metadata.version("vpanel")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VPANEL_VERSION = _version()

VAR_DIR = Path(os.environ.get("VPANEL_VAR_DIR") or BASE_DIR / "var")
VAR_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)

SECRET_KEY = _secret_key(VAR_DIR)

DEBUG = _env_bool("VPANEL_DEBUG", False)

ALLOWED_HOSTS = [
    "127.0.0.1",
    "localhost",
    "[::1]",
    *(h.strip() for h in os.environ.get("VPANEL_ALLOWED_HOSTS", "").split(",") if h.strip()),
]

INSTALLED_APPS = [
    # First, so that its runserver replaces Django's: `manage.py runserver`
    # then serves the ASGI application (websockets too) through Daphne, and
    # still serves static files under DEBUG or with --insecure.
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files for /api/docs/, served here, not from a CDN
    "django_otp",
    "django_otp.plugins.otp_totp",
    "axes",
    "channels",
    "panel.hosting",
    "panel.guests",
    "panel.classroom",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # CommonMiddleware calls request.get_host(), which refuses hosts not in ALLOWED_HOSTS.
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # After OTPMiddleware: sends a session whose user has a TOTP device but has not
    # given its code (or staff without a device, under VPANEL_STAFF_2FA) to that step.
    "panel.hosting.middleware.TwoFactorMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into its answer.
    "axes.middleware.AxesMiddleware",
]

AUTHENTICATION_BACKENDS = [
    # First: refuses logins from a user and address over the failure limit.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

# Login throttling (django-axes): after 5 failures for one user name from one
# address, that pair is locked out for 15 minutes.
AXES_FAILURE_LIMIT = 5
AXES_COOLOFF_TIME = 0.25  # hours
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"

# Two-factor logins (django-otp, TOTP): see panel/hosting/middleware.py.
VPANEL_STAFF_2FA = _env_bool("VPANEL_STAFF_2FA", False)
OTP_TOTP_ISSUER = "vpanel"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "panel.hosting.api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
        "rest_framework.filters.SearchFilter",
    ],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_CLASSES": [
        "panel.hosting.api.throttles.UserThrottle",
        "panel.hosting.api.throttles.AnonThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": os.environ.get("VPANEL_API_ANON_RATE", "60/min"),
        "user": os.environ.get("VPANEL_API_RATE", "1200/min"),
    },
}

SPECTACULAR_SETTINGS = {
    "TITLE": "vpanel API",
    "DESCRIPTION": "Customers, plans, hosts, IP pools and vservers.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Separate request and response components: read-only fields (owner, host,
    # IPs, status) do not appear in what a client may send.
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # One name per choice set used by more than one field.
    "ENUM_NAME_OVERRIDES": {"RoleEnum": "panel.hosting.choices.RoleChoices"},
}

# Channels: in memory unless REDIS_URL names a redis (then channels-redis).
if os.environ.get("REDIS_URL"):
    # redis-py's pool refuses its 101st connection outright (MaxConnectionsError), and
    # channels-redis takes one per group_add/send in flight: 200 pages connecting at
    # once passed that (bench/ws_fanout.py). The server allows 10,000 clients.
    CHANNEL_LAYERS = {"default": {"BACKEND": "panel.layers.RedisChannelLayer",
                                  "CONFIG": {"hosts": [{"address": os.environ["REDIS_URL"],
                                                        "max_connections": 1000}]}}}
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

ROOT_URLCONF = "panel.urls"
WSGI_APPLICATION = "panel.wsgi.application"
ASGI_APPLICATION = "panel.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "panel.views.vpanel_context",
            ],
        },
    },
]

_SQLITE = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": VAR_DIR / "db.sqlite3",
        "OPTIONS": {
            # Web requests, websocket consumers and manage.py share one file:
            # WAL lets readers run beside a writer, and IMMEDIATE transactions
            # take the write lock up front instead of failing with "database is
            # locked" when a read transaction later tries to write.
            "init_command": "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        },
        # Kept open between uses: every websocket event a consumer checks runs a
        # query through channels' database_sync_to_async, which would otherwise
        # close the connection after each and open it again (five times the cost
        # of the query itself: bench/ws_fanout.py).
        "CONN_MAX_AGE": 600,
        "CONN_HEALTH_CHECKS": True,
        # Tests: a file, not SQLite's in-memory database, whose shared cache
        # fails concurrent writers with "database table is locked" instead of
        # letting them wait (tests/panel/api/test_concurrency.py runs threads).
        # One per process, so that test runs side by side never share one.
        "TEST": {"NAME": str(Path(tempfile.gettempdir()) / f"vpanel-test-{os.getpid()}.sqlite3")},
    },
}

# DATABASE_URL (postgres://user:pass@host/db) selects PostgreSQL; unset, SQLite.
if os.environ.get("DATABASE_URL"):
    import dj_database_url

    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"],
                                                  conn_max_age=60, conn_health_checks=True)}
else:
    DATABASES = _SQLITE

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The default first (every password people choose); the second only for
# passwords the panel generates (panel/classroom/hashers.py says why).
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    "panel.classroom.hashers.GeneratedPasswordHasher",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 12},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"

# Cookies. Named after the panel so that another Django site on the same host
# (cookies ignore the port) neither reads nor overwrites them. The CSRF cookie
# stays readable by scripts (Django's default), which forms and fetch() need.
SESSION_COOKIE_NAME = "vpanel_session"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_AGE = 12 * 60 * 60
CSRF_COOKIE_NAME = "vpanel_csrftoken"
CSRF_COOKIE_SAMESITE = "Lax"
# Secure cookies are never sent over plain http://, which would lock people out
# of a panel tried on http://127.0.0.1, so they follow VPANEL_HTTPS.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = _env_bool("VPANEL_HTTPS", False)
# Under VPANEL_HTTPS, plain http:// is redirected and browsers are told to keep to
# HTTPS for a year, for the panel's host name and the names below it (HSTS covers
# the sending host and its subdomains only, never its siblings or parent).
# Preloading is not asked for: a preload-list entry is for the owner of the whole
# domain to request, and cannot quickly be undone, so its check (W021) is silenced.
if SESSION_COOKIE_SECURE:
    SECURE_SSL_REDIRECT = True
    SECURE_HSTS_SECONDS = 365 * 24 * 60 * 60
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    # Supervisors and load balancers may probe over plain HTTP on the loopback.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SILENCED_SYSTEM_CHECKS = ["security.W021"]

# Response headers.
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"

# Behind reverse proxies of the provider's own (VPANEL_PROXIES): the scheme they
# saw, and the client's address they appended (panel/hosting/views.source_ip).
VPANEL_PROXIES = int(os.environ.get("VPANEL_PROXIES", "0") or 0)
if VPANEL_PROXIES < 0:
    raise ImproperlyConfigured("VPANEL_PROXIES must be 0 or more")
if VPANEL_PROXIES:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    AXES_IPWARE_PROXY_COUNT = VPANEL_PROXIES
    AXES_IPWARE_META_PRECEDENCE_ORDER = ("HTTP_X_FORWARDED_FOR", "REMOTE_ADDR")

# Request bodies: the panel takes forms and small JSON documents; the one
# upload, a class roster, is at most 1 MiB (panel/classroom/forms.py).
DATA_UPLOAD_MAX_MEMORY_SIZE = 256 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 256 * 1024

# Django's default logging sends errors to ADMINS by mail when DEBUG is off,
# which without ADMINS means nowhere; send them to stderr instead.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "plain"},
        # A logger with no handler at all falls back to logging.lastResort.
        "discard": {"class": "logging.NullHandler"},
    },
    "root": {"handlers": ["stderr"], "level": "WARNING"},
    "loggers": {
        "django": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        # Scanners send stray Host headers all day; each is refused with a 400,
        # which the request log already shows. A traceback apiece adds nothing.
        "django.security.DisallowedHost": {"handlers": ["discard"], "propagate": False},
    },
}
