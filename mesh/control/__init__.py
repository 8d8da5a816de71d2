"""The one controller loop shared by everything that turns the registry into routing: the Envoy
gateway, mesh-sync, and the rollout controller to come (see :mod:`mesh.control.loop`)."""

from mesh.control.loop import Changes, ControlLoop, Reconcile
from mesh.control.status import StatusWriter, status_changed

__all__ = ["Changes", "ControlLoop", "Reconcile", "StatusWriter", "status_changed"]
