"""ASGI entry point of the panel (`daphne panel.asgi:application`): pages and /ws/.

Websockets are authenticated by the session (AuthMiddlewareStack) and refused
from any origin not in ALLOWED_HOSTS (AllowedHostsOriginValidator); each
consumer then checks the tenant itself, at connect and on every message.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "panel.settings")

# Django first: the routing below imports models.
django_asgi = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from panel.classroom.routing import websocket_urlpatterns as classroom_routes  # noqa: E402
from panel.guests.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter({
    "http": django_asgi,
    "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(
        [*websocket_urlpatterns, *classroom_routes]))),
})
