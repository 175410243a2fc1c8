"""Guests (vservers): their model, lifecycle and operations, the agent client,
websocket consumers and views."""
