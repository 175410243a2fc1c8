"""Pages of a class: the teacher's grid, the roster import, credentials shown
once, the class's settings and its end; and a student's own server.

A class is found by its customer's slug among the classes the user teaches
or assists in (staff: every class); any other answers 404. A student's page
shows their own seat only. Every change is one call into
panel/classroom/actions.py (or panel/guests/actions.py for start, stop and
restart), whose ActionError is shown to the user.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import time
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import QuerySet
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_POST

from panel.classroom import actions, roster
from panel.classroom.forms import (
    AssistantForm,
    BulkForm,
    ClassroomForm,
    CollectForm,
    ConfirmTextForm,
    GridFilterForm,
    NewClassForm,
    ResetForm,
    RosterForm,
)
from panel.classroom.models import Classroom, Seat
from panel.classroom.sampler import activity_text
from panel.guests import actions as gactions
from panel.guests.models import VServer
from panel.hosting.choices import RoleChoices
from panel.hosting.views import actor_of, staff_required

__all__ = [
    "class_assistants",
    "class_bulk",
    "class_collect",
    "class_credentials",
    "class_delete",
    "class_detail",
    "class_list",
    "class_new",
    "class_roster",
    "class_settings",
    "seat_credentials",
    "student_home",
]

# How long a batch of credentials waits in the teacher's session to be copied.
CREDENTIALS_TTL = 3600


def classes_of(user: Any) -> QuerySet[Classroom]:
    """The classes USER teaches or assists in (staff: all)."""
    qs = Classroom.objects.select_related("customer", "customer__plan")
    if user.is_staff:
        return qs
    return qs.filter(customer__memberships__user=user, customer__memberships__role__in=(
        RoleChoices.ROLE_TEACHER, RoleChoices.ROLE_TA, RoleChoices.ROLE_OWNER,
        RoleChoices.ROLE_ADMIN)).distinct()


def _class(request: HttpRequest, slug: str, *, teacher: bool = False) -> Classroom:
    classroom = get_object_or_404(classes_of(request.user), customer__slug=slug)
    if teacher and actions.class_role(request.user, classroom) != RoleChoices.ROLE_TEACHER:
        raise Http404("no such class")  # a TA's view has no teacher's pages
    return classroom


def seats_visible(user: Any, classroom: Classroom) -> QuerySet[Seat]:
    """The class's seats whose servers USER may see (a TA: their groups')."""
    seats = Seat.objects.filter(classroom=classroom).select_related("user", "group", "vserver")
    if actions.class_role(user, classroom) == RoleChoices.ROLE_TEACHER:
        return seats
    return seats.filter(group__assistants__membership__user=user).distinct()


# --- lists -------------------------------------------------------------------------

@login_required
def class_list(request: HttpRequest) -> HttpResponse:
    if hasattr(request.user, "seat") and not request.user.is_staff:
        return redirect("student_home")
    rows = [{"classroom": c, "role": actions.class_role(request.user, c),
             "students": c.seats.count()} for c in classes_of(request.user)]
    return render(request, "classroom/class_list.html", {"rows": rows})


@staff_required
def class_new(request: HttpRequest) -> HttpResponse:
    form = NewClassForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        d = form.cleaned_data
        try:
            c = actions.create_class(actor=actor_of(request), name=d["name"], slug=d["slug"],
                                     plan=d["plan"], template=d["template"],
                                     teacher=d["teacher"])
        except gactions.ActionError as e:
            form.add_error(e.field if e.field in form.fields else None, e.message)
        else:
            messages.success(request, f"Class {c} created: import its roster next.")
            return redirect("class_detail", slug=c.customer.slug)
    return render(request, "classroom/class_new.html", {"form": form})


# --- the teacher's grid ------------------------------------------------------------

@login_required
def class_detail(request: HttpRequest, slug: str) -> HttpResponse:
    classroom = _class(request, slug)
    role = actions.class_role(request.user, classroom)
    seats = seats_visible(request.user, classroom)
    filters = GridFilterForm(request.GET or None, classroom=classroom)
    if filters.is_valid():
        d = filters.cleaned_data
        if d["q"]:
            seats = seats.filter(user__username__icontains=d["q"]) | seats.filter(
                full_name__icontains=d["q"])
        if d["group"] is not None:
            seats = seats.filter(group=d["group"])
        if d["status"]:
            seats = seats.filter(vserver__status=d["status"])
        order = {"username": "user__username", "-username": "-user__username",
                 "group": "group__name", "status": "vserver__status",
                 "-last_activity": "-last_activity"}.get(d["sort"] or "username")
        seats = seats.order_by(order, "user__username")
    bulk = BulkForm(seat_ids=[])
    seats = list(seats)
    now = timezone.now()
    for seat in seats:  # as the live grid's `usage` messages say it (sampler.activity_text)
        seat.activity = activity_text(seat.last_activity, now)
    return render(request, "classroom/class_detail.html", {
        "classroom": classroom, "role": role, "seats": seats, "filters": filters,
        "bulk": bulk, "is_teacher": role == RoleChoices.ROLE_TEACHER,
    })


@login_required
@require_POST
def class_bulk(request: HttpRequest, slug: str) -> HttpResponse:
    """Start, stop or reset the selected students' servers, each on its own:
    one refusal (a busy server) does not stop the others."""
    classroom = _class(request, slug)
    visible = {s.pk: s for s in seats_visible(request.user, classroom)}
    form = BulkForm(request.POST, seat_ids=list(visible))
    if not form.is_valid():
        for field, errors in form.errors.items():
            messages.error(request, f"{field}: {' '.join(errors)}")
        return redirect("class_detail", slug=slug)
    d = form.cleaned_data
    actor = actor_of(request)
    done, failed = 0, []
    for pk in d["seats"]:
        seat = visible[pk]
        vs = seat.vserver
        if vs is None:
            continue
        try:
            if d["action"] == "start":
                gactions.start_vserver(vs, actor=actor)
            elif d["action"] == "stop":
                gactions.stop_vserver(vs, actor=actor)
            else:
                actions.reset_seat(seat, actor=actor, keep_home=d["keep_home"], confirm=vs.name)
            done += 1
        except gactions.ActionError as e:
            failed.append(f"{seat.username}: {e.message}")
    if done:
        messages.success(request, f"{d['action'].capitalize()}: {done} server(s) under way.")
    for f in failed:
        messages.warning(request, f)
    return redirect("class_detail", slug=slug)


@login_required
def class_collect(request: HttpRequest, slug: str) -> HttpResponse:
    """A path from every (visible) student's server, in one zip, with a report."""
    from panel.classroom import collect

    classroom = _class(request, slug)
    form = CollectForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        path = form.cleaned_data["path"]
        seats = seats_visible(request.user, classroom).select_related("vserver__host")
        f, outcomes = collect.collect(seats, path)
        gactions.audit(actor_of(request), classroom.customer, classroom.customer,
                       "collect-files", path=path, servers=len(outcomes),
                       files=sum(o.files for o in outcomes))
        stem = path.strip("/").replace("/", "-") or "root"
        return FileResponse(f, as_attachment=True, content_type="application/zip",
                            filename=f"{classroom.customer.slug}-{stem}.zip")
    return render(request, "classroom/class_collect.html",
                  {"classroom": classroom, "form": form}, status=400 if form.errors else 200)


# --- the roster --------------------------------------------------------------------

def _roster_key(classroom: Classroom) -> str:
    return f"classroom-roster-{classroom.pk}"


def _creds_key(classroom: Classroom) -> str:
    return f"classroom-credentials-{classroom.pk}"


def _keep_credentials(request: HttpRequest, classroom: Classroom,
                      creds: list[actions.Credential]) -> None:
    """Hold a new batch in the session until the teacher has copied it; the
    passwords are in no other place in the clear."""
    key = _creds_key(classroom)
    old = request.session.get(key) or {}
    batch = [c.to_json() for c in creds]
    if old and time.time() - old.get("at", 0) < CREDENTIALS_TTL:
        batch = old["rows"] + batch
    request.session[key] = {"at": time.time(), "rows": batch}


@login_required
def class_roster(request: HttpRequest, slug: str) -> HttpResponse:
    """Upload → preview (nothing changed) → apply, or remove missing students."""
    classroom = _class(request, slug, teacher=True)
    key = _roster_key(classroom)
    form = RosterForm()
    preview = None
    if request.method == "POST" and "file" in request.FILES:
        form = RosterForm(request.POST, request.FILES)
        if form.is_valid():
            data = form.cleaned_data["file"]
            try:
                preview = roster.preview(classroom, data)
            except roster.RosterError as e:
                form.add_error("file", str(e))
            else:
                request.session[key] = base64.b64encode(data).decode()
    elif request.method == "POST" and request.POST.get("step") == "apply":
        stored = request.session.get(key)
        if not stored:
            messages.error(request, "Upload the roster again: the preview has expired.")
            return redirect("class_roster", slug=slug)
        try:
            result, made = actions.apply_roster(classroom, base64.b64decode(stored),
                                                actor=actor_of(request))
        except (gactions.ActionError, roster.RosterError) as e:
            messages.error(request, getattr(e, "message", str(e)))
            return redirect("class_roster", slug=slug)
        del request.session[key]
        failed = [r for r in result.rows if r.errors]
        messages.success(request, f"{len(made)} student(s) added, {result.count('update')} "
                                  f"updated, {len(failed)} row(s) not applied.")
        if made:
            _keep_credentials(request, classroom, made)
            return redirect("class_credentials", slug=slug)
        return redirect("class_detail", slug=slug)
    elif request.method == "POST" and request.POST.get("step") == "remove":
        confirm = ConfirmTextForm(request.POST)
        names = request.POST.getlist("remove")
        if confirm.is_valid() and names:
            try:
                n = actions.remove_students(classroom, names, actor=actor_of(request),
                                            confirm=confirm.cleaned_data["confirm"])
            except gactions.ActionError as e:
                messages.error(request, e.message)
            else:
                messages.success(request, f"{n} student(s) removed; their servers are "
                                          "being deleted.")
        else:
            messages.error(request, "Tick the students to remove and type remove to confirm.")
        return redirect("class_detail", slug=slug)
    response = render(request, "classroom/class_roster.html", {
        "classroom": classroom, "form": form, "preview": preview,
    }, status=400 if form.errors else 200)
    return response


@login_required
def class_credentials(request: HttpRequest, slug: str) -> HttpResponse:
    """The batch of new credentials, once; as CSV with ?format=csv; POST forgets it."""
    classroom = _class(request, slug)
    key = _creds_key(classroom)
    batch = request.session.get(key) or {}
    if batch and time.time() - batch.get("at", 0) > CREDENTIALS_TTL:
        batch = {}
        request.session.pop(key, None)
    if request.method == "POST":
        request.session.pop(key, None)
        messages.info(request, "The passwords are gone from the panel.")
        return redirect("class_detail", slug=slug)
    rows = [actions.Credential.from_json(r) for r in batch.get("rows", [])]
    if request.GET.get("format") == "csv" and rows:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(actions.Credential.CSV_HEADER)
        for c in rows:
            w.writerow(c.row())
        response = HttpResponse(buf.getvalue(), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = (
            f'attachment; filename="{classroom.customer.slug}-credentials.csv"')
    else:
        response = render(request, "classroom/credentials.html",
                          {"classroom": classroom, "rows": rows})
    add_never_cache_headers(response)
    return response


@login_required
@require_POST
def seat_credentials(request: HttpRequest, slug: str, username: str) -> HttpResponse:
    classroom = _class(request, slug)
    seat = get_object_or_404(seats_visible(request.user, classroom), user__username=username)
    try:
        cred = actions.reset_credentials(seat, actor=actor_of(request),
                                         panel="panel" in request.POST.getlist("which"),
                                         root="root" in request.POST.getlist("which"))
    except gactions.ActionError as e:
        messages.error(request, e.message)
        return redirect("class_detail", slug=slug)
    _keep_credentials(request, classroom, [cred])
    return redirect("class_credentials", slug=slug)


# --- settings and the end of term ---------------------------------------------------

@login_required
def class_settings(request: HttpRequest, slug: str) -> HttpResponse:
    classroom = _class(request, slug, teacher=True)
    form = ClassroomForm(request.POST or None, instance=classroom)
    if request.method == "POST" and form.is_valid():
        form.save()
        gactions.audit(actor_of(request), classroom.customer, classroom.customer,
                       "class-settings", **{k: str(v) for k, v in form.cleaned_data.items()})
        messages.success(request, "Saved. New and reset servers get the new settings.")
        return redirect("class_detail", slug=slug)
    return render(request, "classroom/class_settings.html",
                  {"classroom": classroom, "form": form}, status=400 if form.errors else 200)


@login_required
def class_assistants(request: HttpRequest, slug: str) -> HttpResponse:
    """The class's TAs and their groups: add (or change) one, remove one."""
    from panel.classroom.models import TeachingAssistant
    from panel.hosting.models import Membership

    classroom = _class(request, slug, teacher=True)
    form = AssistantForm(request.POST or None, classroom=classroom)
    if request.method == "POST" and request.POST.get("remove"):
        ta = get_object_or_404(Membership, customer=classroom.customer,
                               role=RoleChoices.ROLE_TA, user__username=request.POST["remove"])
        actions.remove_ta(classroom, actor=actor_of(request), user=ta.user)
        messages.success(request, f"{ta.user} is no TA of this class any more.")
        return redirect("class_assistants", slug=slug)
    if request.method == "POST" and form.is_valid():
        d = form.cleaned_data
        try:
            actions.assign_ta(classroom, actor=actor_of(request), user=d["username"],
                              groups=list(d["groups"]))
        except gactions.ActionError as e:
            form.add_error("username" if e.field == "user" else None, e.message)
        else:
            messages.success(request, f"{d['username']} assists with "
                                      f"{', '.join(g.name for g in d['groups']) or 'no group'}.")
            return redirect("class_assistants", slug=slug)
    tas = [(m, [t.group for t in TeachingAssistant.objects.filter(membership=m)
                .select_related("group")])
           for m in Membership.objects.filter(customer=classroom.customer,
                                              role=RoleChoices.ROLE_TA).select_related("user")]
    return render(request, "classroom/class_assistants.html",
                  {"classroom": classroom, "form": form, "tas": tas},
                  status=400 if form.errors else 200)


@login_required
def class_delete(request: HttpRequest, slug: str) -> HttpResponse:
    classroom = _class(request, slug, teacher=True)
    form = ConfirmTextForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            n = actions.delete_class(classroom, actor=actor_of(request),
                                     confirm=form.cleaned_data["confirm"])
        except gactions.ActionError as e:
            form.add_error("confirm", e.message)
        else:
            messages.success(request, f"Class {classroom} ended: {n} server(s) being deleted.")
            return redirect("class_list")
    return render(request, "classroom/class_delete.html", {
        "classroom": classroom, "form": form, "students": classroom.seats.count(),
        "servers": VServer.objects.filter(customer=classroom.customer).count(),
    }, status=400 if form.errors else 200)


# --- a student's own server ----------------------------------------------------------

def _own_seat(request: HttpRequest) -> Seat:
    try:
        return Seat.objects.select_related("classroom__customer", "vserver", "group").get(
            user=request.user)
    except Seat.DoesNotExist as e:
        raise Http404("you have no seat in a class") from e


@login_required
def student_home(request: HttpRequest) -> HttpResponse:
    seat = _own_seat(request)
    reset = ResetForm(prefix="reset")
    if request.method == "POST":
        actor = actor_of(request)
        what = request.POST.get("do")
        vs = seat.vserver
        try:
            if vs is None:
                raise gactions.ActionError("your server is not there yet: ask your teacher")
            if what == "start":
                gactions.start_vserver(vs, actor=actor)
                messages.success(request, "Your server is starting.")
            elif what == "stop":
                gactions.stop_vserver(vs, actor=actor)
                messages.success(request, "Your server is stopping.")
            elif what == "restart":
                gactions.restart_vserver(vs, actor=actor)
                messages.success(request, "Your server is restarting.")
            elif what == "reset":
                reset = ResetForm(request.POST, prefix="reset")
                if reset.is_valid():
                    actions.reset_seat(seat, actor=actor, keep_home=reset.cleaned_data[
                        "keep_home"], confirm=reset.cleaned_data["confirm"])
                    messages.success(request, "Your server is being reset to the template.")
                    return redirect("student_home")
            elif what == "credentials":
                cred = actions.reset_credentials(seat, actor=actor, panel=False, root=True)
                response = render(request, "classroom/student_password.html",
                                  {"seat": seat, "cred": cred})
                add_never_cache_headers(response)
                return response
            else:
                raise gactions.ActionError("unknown action")
            if what != "reset":
                return redirect("student_home")
        except gactions.ActionError as e:
            if what == "reset" and e.field == "confirm":
                reset.add_error("confirm", e.message)
            else:
                messages.error(request, e.message)
                return redirect("student_home")
    stop_at = None
    if seat.idle_warned and seat.idle_since and seat.classroom.idle_minutes:
        stop_at = seat.idle_since + dt.timedelta(minutes=seat.classroom.idle_minutes)
    return render(request, "classroom/student_home.html", {
        "seat": seat, "vs": seat.vserver, "reset": reset, "stop_at": stop_at,
    }, status=400 if reset.errors else 200)
