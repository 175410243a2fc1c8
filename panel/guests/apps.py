from django.apps import AppConfig


class GuestsConfig(AppConfig):
    name = "panel.guests"
    label = "guests"
    verbose_name = "Guests"

    def ready(self) -> None:
        from panel.guests import signals

        signals.connect()  # the live pages hear of logouts and access changes at once
