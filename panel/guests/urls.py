"""Page routes (panel/guests): the dashboard, vserver lists, a vserver's page and actions.

Every action URL takes a POST only (with Django's CSRF token) and answers 404
for a vserver the user may not see.
"""

from __future__ import annotations

from django.urls import path

from panel.guests import views

urlpatterns = [
    path("dashboard/", views.dashboard, name="dashboard"),
    path("vservers/", views.vserver_list, name="vserver_list"),
    path("vservers/new/", views.vserver_create, name="vserver_create"),
    path("vservers/<int:pk>/", views.vserver_detail, name="vserver_detail"),
    path("vservers/<int:pk>/console/", views.vserver_console, name="vserver_console"),
    path("vservers/<int:pk>/start/", views.vserver_start, name="vserver_start"),
    path("vservers/<int:pk>/stop/", views.vserver_stop, name="vserver_stop"),
    path("vservers/<int:pk>/restart/", views.vserver_restart, name="vserver_restart"),
    path("vservers/<int:pk>/reinstall/", views.vserver_reinstall, name="vserver_reinstall"),
    path("vservers/<int:pk>/delete/", views.vserver_delete, name="vserver_delete"),
    path("vservers/<int:pk>/password/", views.vserver_reset_password,
         name="vserver_reset_password"),
    path("vservers/<int:pk>/hostname/", views.vserver_hostname, name="vserver_hostname"),
    path("vservers/<int:pk>/limits/", views.vserver_limits, name="vserver_limits"),
    path("vservers/<int:pk>/keys/", views.vserver_key_add, name="vserver_key_add"),
    path("vservers/<int:pk>/keys/<int:key_pk>/remove/", views.vserver_key_remove,
         name="vserver_key_remove"),
    path("staff/vservers/", views.staff_vserver_list, name="staff_vserver_list"),
]
