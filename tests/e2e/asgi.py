"""The panel's ASGI application for the browser test: panel.asgi, plus its static files.

Daphne serves no static files itself and the test runs without a collectstatic,
so HTTP goes through Django's ASGIStaticFilesHandler (the finders, straight
from static/, as runserver does); websockets are panel.asgi's, unchanged.
"""

from __future__ import annotations

from channels.routing import ProtocolTypeRouter
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

from panel.asgi import application as panel_application
from panel.asgi import django_asgi

application = ProtocolTypeRouter({
    "http": ASGIStaticFilesHandler(django_asgi),
    "websocket": panel_application.application_mapping["websocket"],
})
