"""Forms of the classroom pages; each checks its input before an action sees it."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.auth import get_user_model

from panel.classroom import roster
from panel.classroom.models import ClassGroup, Classroom
from panel.guests.choices import VServerStatusChoices
from panel.hosting.models import Plan


class RosterForm(forms.Form):
    file = forms.FileField(label="Roster (CSV)", help_text=(
        "A header row with username, full name, email and optionally group and ssh key; "
        f"at most {roster.MAX_ROWS} students and {roster.MAX_BYTES // 1024} KiB."))

    def clean_file(self) -> bytes:
        f = self.cleaned_data["file"]
        if f.size > roster.MAX_BYTES:
            raise forms.ValidationError(f"the file is over {roster.MAX_BYTES // 1024} KiB")
        data: bytes = f.read()
        return data


class ClassroomForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Classroom
        fields = ["template", "seat_memory_mb", "seat_cpu_cores", "seat_processes",
                  "seat_disk_gb", "seat_ipv4", "hours", "idle_minutes", "idle_cpu_percent",
                  "idle_warning_minutes"]
        labels = {"seat_memory_mb": "Memory per student (MiB)",
                  "seat_cpu_cores": "CPU cores per student",
                  "seat_processes": "Processes per student",
                  "seat_disk_gb": "Disk per student (GiB)",
                  "seat_ipv4": "IPv4 addresses per student",
                  "idle_cpu_percent": "Idle below CPU %"}
        widgets = {"hours": forms.Textarea(attrs={"rows": 3})}

    def clean(self) -> dict[str, Any]:
        d: dict[str, Any] = super().clean() or {}
        plan = self.instance.customer.plan if self.instance.customer_id else None
        if plan is not None:
            if plan.templates and d.get("template") and d["template"] not in plan.templates:
                self.add_error("template", f"the plan offers {', '.join(plan.templates)}")
            for field, cap, what in (("seat_memory_mb", plan.memory_mb, "MiB of memory"),
                                     ("seat_cpu_cores", plan.cpu_cores, "CPU cores"),
                                     ("seat_disk_gb", plan.disk_gb, "GiB of disk")):
                if d.get(field) is not None and d[field] > cap:
                    self.add_error(field, f"the class's plan has {cap} {what} in all")
            if d.get("seat_processes") and d["seat_processes"] > plan.processes:
                self.add_error("seat_processes",
                               f"the plan allows {plan.processes} processes per server")
        return d


class NewClassForm(forms.Form):
    name = forms.CharField(max_length=100)
    slug = forms.SlugField(max_length=20, help_text="short name, the start of every server's name")
    plan = forms.ModelChoiceField(queryset=Plan.objects.all())
    template = forms.RegexField(regex=r"^[a-z][a-z0-9-]{0,30}\Z", max_length=31)
    teacher = forms.CharField(max_length=150, help_text="the teacher's panel username")

    def clean_teacher(self) -> Any:
        try:
            return get_user_model().objects.get(username=self.cleaned_data["teacher"])
        except get_user_model().DoesNotExist as e:
            raise forms.ValidationError("no such user") from e

    def clean_slug(self) -> str:
        from panel.hosting.models import Customer

        slug: str = self.cleaned_data["slug"].lower()
        if not slug[:1].isalpha():
            raise forms.ValidationError("start with a letter")
        if Customer.objects.filter(slug=slug).exists():
            raise forms.ValidationError("taken")
        return slug


class ConfirmTextForm(forms.Form):
    confirm = forms.CharField(max_length=100)


class ResetForm(forms.Form):
    keep_home = forms.BooleanField(required=False, initial=True, label="Keep /home")
    confirm = forms.CharField(max_length=31, label="Type the server's name to confirm")


BULK_ACTIONS = (("start", "Start"), ("stop", "Stop"), ("reset", "Reset to template"))


class BulkForm(forms.Form):
    action = forms.ChoiceField(choices=BULK_ACTIONS)
    seats = forms.TypedMultipleChoiceField(coerce=int, choices=())
    keep_home = forms.BooleanField(required=False, initial=True)
    confirm = forms.CharField(max_length=20, required=False,
                              help_text="type reset to reset the selected servers")

    def __init__(self, *args: Any, seat_ids: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["seats"].choices = [(i, str(i)) for i in seat_ids]

    def clean(self) -> dict[str, Any]:
        d: dict[str, Any] = super().clean() or {}
        if d.get("action") == "reset" and d.get("confirm") != "reset":
            self.add_error("confirm", "type reset to reset the selected servers")
        return d


class GridFilterForm(forms.Form):
    q = forms.CharField(required=False, max_length=64, label="Search")
    group = forms.ModelChoiceField(queryset=ClassGroup.objects.none(), required=False,
                                   empty_label="all groups")
    status = forms.ChoiceField(required=False,
                               choices=[("", "any status"), *VServerStatusChoices.choices])
    sort = forms.ChoiceField(required=False, choices=[
        ("username", "username"), ("-username", "username, Z-A"), ("group", "group"),
        ("status", "status"), ("-last_activity", "last activity")])

    def __init__(self, *args: Any, classroom: Classroom, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["group"].queryset = classroom.groups.all()  # type: ignore[attr-defined]
        for f in self.fields.values():
            f.widget.attrs["class"] = ("form-select form-select-sm"
                                       if isinstance(f.widget, forms.Select)
                                       else "form-control form-control-sm")


class CollectForm(forms.Form):
    path = forms.RegexField(regex=r"^/[^\x00\n]{0,1023}\Z", max_length=1024, initial="/home",
                            help_text="an absolute path inside every student's server")

    def clean_path(self) -> str:
        import posixpath

        p: str = self.cleaned_data["path"]
        if ".." in p.split("/"):
            raise forms.ValidationError("no '..' in the path")
        return posixpath.normpath(p)


class AssistantForm(forms.Form):
    username = forms.CharField(max_length=150, label="TA's panel username")
    groups = forms.ModelMultipleChoiceField(queryset=ClassGroup.objects.none(), required=False,
                                            widget=forms.CheckboxSelectMultiple)

    def __init__(self, *args: Any, classroom: Classroom, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["groups"].queryset = classroom.groups.all()  # type: ignore[attr-defined]

    def clean_username(self) -> Any:
        try:
            return get_user_model().objects.get(username=self.cleaned_data["username"])
        except get_user_model().DoesNotExist as e:
            raise forms.ValidationError("no such user") from e
