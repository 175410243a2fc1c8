"""Websocket routes (/ws/...): live status, process lists and the console."""

from __future__ import annotations

from django.urls import path

from panel.guests import console, consumers

websocket_urlpatterns = [
    # Every vserver the user may see: status badges, operations, usage.
    path("ws/vservers/", consumers.DashboardConsumer.as_asgi()),
    # One vserver: its status, operations and, on request, its process list.
    path("ws/vservers/<int:pk>/", consumers.VServerConsumer.as_asgi()),
    # A terminal on a shell inside the vserver.
    path("ws/vservers/<int:pk>/console/", console.ConsoleConsumer.as_asgi()),
]
