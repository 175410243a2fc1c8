"""Websocket routes of the classroom (/ws/classes/...): the teacher's live grid."""

from __future__ import annotations

from django.urls import path

from panel.classroom import consumers

websocket_urlpatterns = [
    # A class's grid: its students' servers' status, and their usage while watched.
    path("ws/classes/<slug:slug>/", consumers.ClassConsumer.as_asgi()),
]
