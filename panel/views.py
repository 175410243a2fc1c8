"""Project-wide pages: the home page and the health check."""

from __future__ import annotations

from typing import Any, NamedTuple

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

__all__ = ["SEED_TOOLS", "SeedTool", "healthz", "home", "vpanel_context"]


class SeedTool(NamedTuple):
    name: str
    purpose: str


# The command-line tools of the seed paper (vserver-paper.txt, "The vserver
# package"), which vpanel rebuilds under hostagent/cli.
SEED_TOOLS: tuple[SeedTool, ...] = (
    SeedTool("vserver", "build, start, stop, restart, enter and run commands in a guest"),
    SeedTool("chcontext", "run a command in a new or a given security context"),
    SeedTool("chbind", "lock a command and its children to one IP address"),
    SeedTool("reducecap", "lower the capability ceiling of a command and its children"),
    SeedTool("vps, vpstree, vtop", "process views across all guests, with context and name"),
    SeedTool("vkill", "find the context of a process and signal it there"),
    SeedTool("vserver-stat", "processes, memory and uptime of each running context"),
    SeedTool("vdu", "disk space a guest uses on its own"),
    SeedTool("vunify", "share the identical files of guests on disk and in memory"),
    SeedTool("vpkg", "run a package manager command in several or all guests (the seed's vrpm)"),
    SeedTool("vreboot, vhalt", "restart or stop a guest from inside it, through rebootmgr"),
)


def vpanel_context(request: HttpRequest) -> dict[str, Any]:
    """Template context processor: what every page's layout needs (its menu
    names a student's own server, or the classes a teacher or TA takes)."""
    from panel.hosting.choices import RoleChoices

    user = getattr(request, "user", None)
    is_student = teaches = False
    if user is not None and user.is_authenticated:
        roles = set(user.memberships.values_list("role", flat=True))
        is_student = RoleChoices.ROLE_STUDENT in roles
        teaches = user.is_staff or bool(roles & {RoleChoices.ROLE_TEACHER, RoleChoices.ROLE_TA})
    return {"vpanel_version": settings.VPANEL_VERSION, "menu_student": is_student,
            "menu_classes": teaches}


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    """What vpanel is, for visitors; a logged-in user's home is their dashboard."""
    if request.user.is_authenticated:
        if hasattr(request.user, "seat"):
            return redirect("student_home")  # a student's home is their own server
        return redirect("dashboard")
    return render(request, "home.html", {"seed_tools": SEED_TOOLS})


@never_cache
@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness for load balancers and supervisors: the process answers requests."""
    return JsonResponse({"status": "ok"})
