"""URL routes of the panel: pages, the API under /api/v1/, its schema, the admin."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from panel import views

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("admin/", admin.site.urls),
    # Pages (panel/hosting/urls.py: login, account, staff pages;
    # panel/guests/urls.py: dashboard, vserver pages).
    path("", include("panel.hosting.urls")),
    path("", include("panel.guests.urls")),
    path("", include("panel.classroom.urls")),
    # The REST API (panel/*/api/urls.py) and its OpenAPI schema.
    path("api/v1/", include("panel.hosting.api.urls")),
    path("api/v1/", include("panel.guests.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]
