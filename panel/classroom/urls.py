"""Page routes of the classroom (panel/classroom/views.py)."""

from __future__ import annotations

from django.urls import path

from panel.classroom import views

urlpatterns = [
    path("classes/", views.class_list, name="class_list"),
    path("classes/new/", views.class_new, name="class_new"),
    path("classes/<slug:slug>/", views.class_detail, name="class_detail"),
    path("classes/<slug:slug>/bulk/", views.class_bulk, name="class_bulk"),
    path("classes/<slug:slug>/collect/", views.class_collect, name="class_collect"),
    path("classes/<slug:slug>/roster/", views.class_roster, name="class_roster"),
    path("classes/<slug:slug>/credentials/", views.class_credentials, name="class_credentials"),
    path("classes/<slug:slug>/students/<str:username>/credentials/", views.seat_credentials,
         name="seat_credentials"),
    path("classes/<slug:slug>/assistants/", views.class_assistants, name="class_assistants"),
    path("classes/<slug:slug>/settings/", views.class_settings, name="class_settings"),
    path("classes/<slug:slug>/delete/", views.class_delete, name="class_delete"),
    path("my-server/", views.student_home, name="student_home"),
]
