"""Viewsets of the guests app's API.

Views declare, actions act: every change below is one call into
panel/guests/actions.py, which checks the role and the plan, writes the audit
row and records the operation; the agent's work starts once the transaction
commits. Objects come through `VServer.objects.visible_to(user)` (and its
kin), so another tenant's vserver, its actions and its keys answer 404.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import Prefetch, QuerySet
from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import status
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from panel.guests import actions, filtersets
from panel.guests.api import serializers as s
from panel.guests.models import Operation, SSHKey, VServer
from panel.hosting.api.base import VPanelModelViewSet, VPanelReadOnlyModelViewSet
from panel.hosting.models import IPAddress

__all__ = ["OperationViewSet", "SSHKeyViewSet", "VServerViewSet"]

def _vservers(user: Any) -> QuerySet[VServer]:
    """The vservers USER may see, with what their representation needs in two queries."""
    return VServer.objects.visible_to(user).select_related("customer", "host").prefetch_related(
        Prefetch("ips", queryset=IPAddress.objects.select_related("pool")
                 .order_by("pool__family", "id")))


_ACCEPTED = {202: s.VServerOperationSerializer}


@extend_schema_view(
    create=extend_schema(request=s.VServerCreateSerializer, responses=_ACCEPTED,
                         description="Build a new vserver (an operation): answers 202."),
    partial_update=extend_schema(
        request=s.VServerUpdateSerializer,
        responses={200: s.VServerOperationsSerializer, 202: s.VServerOperationsSerializer},
        description="Change the hostname and the limits (within the plan). Other fields "
                    "are read-only and ignored."),
    destroy=extend_schema(
        request=s.ConfirmSerializer, responses=_ACCEPTED,
        parameters=[OpenApiParameter("confirm", OpenApiTypes.STR,
                                     description="the vserver's name (or {\"confirm\": name} "
                                                 "in the body)")],
        description="Delete the vserver (an operation): answers 202."),
)
class VServerViewSet(VPanelModelViewSet):
    serializer_class = s.VServerSerializer
    filterset_class = filtersets.VServerFilterSet
    ordering_fields = ["id", "name", "hostname", "status", "created", "memory_mb", "cpu_cores",
                       "disk_gb", "customer__name", "host__name"]
    search_fields = ["name", "hostname", "description", "ips__address"]

    def get_queryset(self) -> QuerySet[VServer]:
        return _vservers(self.request.user)

    def _fresh(self, vs: VServer) -> VServer:
        # A delete may be done by now (inline operations, a quick agent): the row is gone.
        return _vservers(self.request.user).filter(pk=vs.pk).first() or vs

    def _accepted(self, vs: VServer, op: Operation, **extra: Any) -> Response:
        body = {"vserver": s.VServerSerializer(self._fresh(vs)).data,
                "operation": s.OperationSerializer(op).data, **extra}
        return Response(body, status=status.HTTP_202_ACCEPTED)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = s.VServerCreateSerializer(data=request.data,
                                         context=self.get_serializer_context())
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        customer = fields.pop("customer")
        vs, op = actions.create_vserver(customer, actor=self.actor(), **fields)
        response = self._accepted(vs, op)
        response["Location"] = reverse("vserver-detail", args=[vs.pk])
        return response

    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        vs = self.get_object()
        data = s.VServerUpdateSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        wanted = data.validated_data
        ops = []
        with transaction.atomic():  # both changes or neither
            if "hostname" in wanted and wanted["hostname"] != vs.hostname:
                ops.append(actions.set_hostname(vs, actor=self.actor(),
                                                hostname=wanted["hostname"]))
            limits = {k: wanted[k] for k in s.LIMIT_FIELDS
                      if k in wanted and wanted[k] != getattr(vs, k)}
            if limits:
                ops.append(actions.set_limits(vs, actor=self.actor(), **limits))
        body = {"vserver": s.VServerSerializer(self._fresh(vs)).data,
                "operations": s.OperationSerializer(ops, many=True).data}
        return Response(body, status=status.HTTP_202_ACCEPTED if ops else status.HTTP_200_OK)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        vs = self.get_object()
        confirm = request.query_params.get("confirm")
        if confirm is None and hasattr(request.data, "get"):
            confirm = request.data.get("confirm")
        op = actions.delete_vserver(vs, actor=self.actor(), confirm=str(confirm or ""))
        return self._accepted(vs, op)

    @extend_schema(request=None, responses=_ACCEPTED)
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str | None = None) -> Response:
        vs = self.get_object()
        return self._accepted(vs, actions.start_vserver(vs, actor=self.actor()))

    @extend_schema(request=s.StopSerializer, responses=_ACCEPTED)
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        vs = self.get_object()
        data = s.StopSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        op = actions.stop_vserver(vs, actor=self.actor(), force=data.validated_data["force"])
        return self._accepted(vs, op)

    @extend_schema(request=None, responses=_ACCEPTED)
    @action(detail=True, methods=["post"])
    def restart(self, request: Request, pk: str | None = None) -> Response:
        vs = self.get_object()
        return self._accepted(vs, actions.restart_vserver(vs, actor=self.actor()))

    @extend_schema(request=s.ReinstallSerializer, responses=_ACCEPTED)
    @action(detail=True, methods=["post"])
    def reinstall(self, request: Request, pk: str | None = None) -> Response:
        vs = self.get_object()
        data = s.ReinstallSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        op = actions.reinstall_vserver(vs, actor=self.actor(),
                                       confirm=data.validated_data["confirm"],
                                       template=data.validated_data.get("template"))
        return self._accepted(vs, op)

    @extend_schema(request=None, responses={202: s.PasswordResetSerializer},
                   description="A new random root password, in this answer only.")
    @action(detail=True, methods=["post"], url_path="reset-password")
    def reset_password(self, request: Request, pk: str | None = None) -> Response:
        vs = self.get_object()
        op, password = actions.reset_root_password(vs, actor=self.actor())
        response = self._accepted(vs, op, password=password)
        response["Cache-Control"] = "no-store"
        return response


class SSHKeyViewSet(VPanelModelViewSet):
    """The SSH keys of one vserver: /vservers/{vserver_id}/ssh-keys/."""

    serializer_class = s.SSHKeySerializer
    filterset_class = filtersets.SSHKeyFilterSet
    http_method_names = ["get", "post", "delete", "head", "options"]
    ordering_fields = ["id", "name", "created"]
    search_fields = ["name", "key"]

    def vserver(self) -> VServer:
        """The vserver in the URL, if the user may see it; else 404 like a missing one."""
        if not hasattr(self, "_vserver"):
            self._vserver = get_object_or_404(VServer.objects.visible_to(self.request.user),
                                              pk=self.kwargs["vserver_id"])
        return self._vserver

    def get_queryset(self) -> QuerySet[SSHKey]:
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular's schema run
            return SSHKey.objects.none()
        return SSHKey.objects.filter(vserver=self.vserver())

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        if not getattr(self, "swagger_fake_view", False):
            self.vserver()  # 404 before anything else, a list included

    @extend_schema(request=s.SSHKeyCreateSerializer, responses={201: s.SSHKeySerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = s.SSHKeyCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key = actions.add_ssh_key(self.vserver(), actor=self.actor(), **data.validated_data)
        return Response(s.SSHKeySerializer(key).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: SSHKey) -> None:
        actions.remove_ssh_key(instance, actor=self.actor())


class OperationViewSet(VPanelReadOnlyModelViewSet):
    """What was asked of which vserver, and how far it got (read-only)."""

    serializer_class = s.OperationSerializer
    filterset_class = filtersets.OperationFilterSet
    ordering_fields = ["id", "created", "updated", "kind", "state"]
    search_fields = ["vserver_name", "message"]

    def get_queryset(self) -> QuerySet[Operation]:
        return Operation.objects.visible_to(self.request.user).select_related("created_by")
