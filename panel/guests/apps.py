from django.apps import AppConfig


class GuestsConfig(AppConfig):
    name = "panel.guests"
    label = "guests"
    verbose_name = "Guests"
