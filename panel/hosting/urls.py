"""Page routes (panel/hosting): logging in, the account, the staff pages."""

from __future__ import annotations

from django.urls import path

from panel.hosting import views

urlpatterns = [
    path("login/", views.LoginView.as_view(), name="login"),
    path("login/code/", views.otp_verify, name="otp_verify"),
    path("logout/", views.LogoutView.as_view(), name="logout"),
    path("account/", views.account, name="account"),
    path("account/two-factor/", views.totp_enrol, name="totp_enrol"),
    path("account/two-factor/remove/", views.totp_remove, name="totp_remove"),
    path("account/tokens/new/", views.token_create, name="token_create"),
    path("account/tokens/<int:pk>/revoke/", views.token_revoke, name="token_revoke"),
    path("staff/customers/", views.customer_list, name="customer_list"),
    path("staff/customers/new/", views.customer_edit, name="customer_create"),
    path("staff/customers/<int:pk>/", views.customer_edit, name="customer_edit"),
    path("staff/customers/<int:pk>/members/", views.member_add, name="member_add"),
    path("staff/customers/<int:pk>/members/<int:member_pk>/remove/", views.member_remove,
         name="member_remove"),
    path("staff/plans/", views.plan_list, name="plan_list"),
    path("staff/plans/new/", views.plan_edit, name="plan_create"),
    path("staff/plans/<int:pk>/", views.plan_edit, name="plan_edit"),
    path("staff/hosts/", views.host_list, name="host_list"),
    path("staff/hosts/new/", views.host_edit, name="host_create"),
    path("staff/hosts/<int:pk>/", views.host_edit, name="host_edit"),
    path("staff/pools/", views.pool_list, name="pool_list"),
    path("staff/pools/new/", views.pool_edit, name="pool_create"),
    path("staff/pools/<int:pk>/", views.pool_edit, name="pool_edit"),
    path("staff/audit/", views.audit_log, name="audit_log"),
]
