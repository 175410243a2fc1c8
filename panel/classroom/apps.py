from django.apps import AppConfig


class ClassroomConfig(AppConfig):
    name = "panel.classroom"
    label = "classroom"
    verbose_name = "Classroom"

    def ready(self) -> None:
        from panel.classroom import signals

        signals.connect()  # a teacher's start outside the hours exempts it from them
