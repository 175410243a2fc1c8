"""Tenants and what they may use: customers, memberships and roles, plans and
quotas, hosts (nodes), IP pools and the audit log."""
