"""vpanel's web side: the multi-tenant Django panel over the host agents.

The panel runs unprivileged and never touches the kernel itself: it stores
ownership, plans and desired state, and asks each host's agent (hostagent/)
to act.
"""
