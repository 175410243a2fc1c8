"""Models of the hosting app.

Customers (tenants), their memberships and roles, plans and quotas, the hosts
(nodes) that run guests, IP pools and the audit log will live here; every
tenant-owned model gets one tenant gate, `objects.visible_to(user)`.
"""

__all__: list[str] = []
