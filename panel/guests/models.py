"""Models of the guests app.

The vserver model will live here: owner, host, plan, addresses and desired
state, with its status choices in choices.py; lifecycle changes go through
actions.py. The host agent stays the truth about what actually runs.
"""

__all__: list[str] = []
