from django.apps import AppConfig


class HostingConfig(AppConfig):
    name = "panel.hosting"
    label = "hosting"
    verbose_name = "Hosting"
