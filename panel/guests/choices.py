"""Every status and kind of the guests app, with its badge colour (STYLE.md)."""

from __future__ import annotations

from django.db import models

from hostagent import wire

__all__ = [
    "DesiredStateChoices",
    "OperationKindChoices",
    "OperationStateChoices",
    "VServerStatusChoices",
]


class VServerStatusChoices(models.TextChoices):
    """What runs, as the agent last said (plus 'unknown' when its host is silent)."""

    STATUS_BUILDING = wire.STATE_BUILDING, "Building"
    STATUS_STOPPED = wire.STATE_STOPPED, "Stopped"
    STATUS_STARTING = wire.STATE_STARTING, "Starting"
    STATUS_RUNNING = wire.STATE_RUNNING, "Running"
    STATUS_STOPPING = wire.STATE_STOPPING, "Stopping"
    STATUS_RESTARTING = wire.STATE_RESTARTING, "Restarting"
    STATUS_DELETING = wire.STATE_DELETING, "Deleting"
    STATUS_UNKNOWN = wire.STATE_UNKNOWN, "Unknown"
    STATUS_ERROR = "error", "Error"


STATUS_COLOURS = {
    VServerStatusChoices.STATUS_BUILDING: "info",
    VServerStatusChoices.STATUS_STOPPED: "secondary",
    VServerStatusChoices.STATUS_STARTING: "info",
    VServerStatusChoices.STATUS_RUNNING: "success",
    VServerStatusChoices.STATUS_STOPPING: "warning",
    VServerStatusChoices.STATUS_RESTARTING: "info",
    VServerStatusChoices.STATUS_DELETING: "warning",
    VServerStatusChoices.STATUS_UNKNOWN: "dark",
    VServerStatusChoices.STATUS_ERROR: "danger",
}

# The states in which an operation is under way on the vserver.
BUSY_STATUSES = frozenset({
    VServerStatusChoices.STATUS_BUILDING, VServerStatusChoices.STATUS_STARTING,
    VServerStatusChoices.STATUS_STOPPING, VServerStatusChoices.STATUS_RESTARTING,
    VServerStatusChoices.STATUS_DELETING,
})


class DesiredStateChoices(models.TextChoices):
    DESIRED_RUNNING = "running", "Running"
    DESIRED_STOPPED = "stopped", "Stopped"


class OperationKindChoices(models.TextChoices):
    KIND_CREATE = "create", "Create"
    KIND_START = "start", "Start"
    KIND_STOP = "stop", "Stop"
    KIND_RESTART = "restart", "Restart"
    KIND_REINSTALL = "reinstall", "Reinstall"
    KIND_RESET = "reset", "Reset to template"
    KIND_DELETE = "delete", "Delete"
    KIND_SET_HOSTNAME = "set-hostname", "Change hostname"
    KIND_SET_LIMITS = "set-limits", "Change limits"
    KIND_RESET_PASSWORD = "reset-password", "Reset root password"
    KIND_SSH_KEYS = "ssh-keys", "Update SSH keys"


class OperationStateChoices(models.TextChoices):
    STATE_PENDING = wire.OP_PENDING, "Pending"
    STATE_RUNNING = wire.OP_RUNNING, "Running"
    STATE_SUCCESS = wire.OP_SUCCESS, "Success"
    STATE_FAILURE = wire.OP_FAILURE, "Failure"
    STATE_CANCELLED = wire.OP_CANCELLED, "Cancelled"


OPERATION_COLOURS = {
    OperationStateChoices.STATE_PENDING: "secondary",
    OperationStateChoices.STATE_RUNNING: "info",
    OperationStateChoices.STATE_SUCCESS: "success",
    OperationStateChoices.STATE_FAILURE: "danger",
    OperationStateChoices.STATE_CANCELLED: "dark",
}
