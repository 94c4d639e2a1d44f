//! `authbroker.v1.AdminService`: translate, call the use case, translate back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    auth::Caller,
    convert,
    pb::{self, admin_service_server},
    status::admin_error,
};
use crate::admin::{Actor, AdminService, AuditFilter, UserFilter};

pub struct AdminApi {
    admin: Arc<AdminService>,
}

impl AdminApi {
    pub fn new(admin: Arc<AdminService>) -> Self {
        AdminApi { admin }
    }
}

fn caller<T>(request: &Request<T>) -> Option<Arc<str>> {
    request
        .extensions()
        .get::<Caller>()
        .and_then(|c| c.name.clone())
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Negative page sizes are nonsense; send them to the range check.
fn page_size(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl admin_service_server::AdminService for AdminApi {
    async fn list_providers(
        &self,
        request: Request<pb::ListProvidersRequest>,
    ) -> Result<Response<pb::ListProvidersResponse>, Status> {
        let actor = caller(&request);
        let providers = self.admin.list_providers(Actor(actor.as_deref())).await;
        Ok(Response::new(pb::ListProvidersResponse {
            providers: providers.into_iter().map(convert::provider_info).collect(),
        }))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let actor = caller(&request);
        let r = request.into_inner();
        let user = self
            .admin
            .get_user(Actor(actor.as_deref()), &r.user_id)
            .await
            .map_err(admin_error)?;
        Ok(Response::new(convert::user(user)))
    }

    async fn find_user_by_identity(
        &self,
        request: Request<pb::FindUserByIdentityRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let actor = caller(&request);
        let r = request.into_inner();
        let user = self
            .admin
            .find_user_by_identity(Actor(actor.as_deref()), &r.provider, &r.subject)
            .await
            .map_err(admin_error)?;
        Ok(Response::new(convert::user(user)))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let actor = caller(&request);
        let r = request.into_inner();
        let page = self
            .admin
            .list_users(
                Actor(actor.as_deref()),
                UserFilter {
                    provider: non_empty(r.provider),
                    created_after: convert::moment(r.created_after),
                    created_before: convert::moment(r.created_before),
                    page_size: page_size(r.page_size),
                    page_token: r.page_token,
                },
            )
            .await
            .map_err(admin_error)?;
        Ok(Response::new(pb::ListUsersResponse {
            users: page.items.into_iter().map(convert::user).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn unlink_identity(
        &self,
        request: Request<pb::UnlinkIdentityRequest>,
    ) -> Result<Response<pb::UnlinkIdentityResponse>, Status> {
        let actor = caller(&request);
        let r = request.into_inner();
        let user = self
            .admin
            .unlink_identity(Actor(actor.as_deref()), &r.user_id, &r.provider, r.force)
            .await
            .map_err(admin_error)?;
        Ok(Response::new(pb::UnlinkIdentityResponse {
            user: Some(convert::user(user)),
        }))
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let actor = caller(&request);
        let r = request.into_inner();
        let deleted = self
            .admin
            .delete_user(Actor(actor.as_deref()), &r.user_id)
            .await
            .map_err(admin_error)?;
        Ok(Response::new(pb::DeleteUserResponse {
            revoked_at: deleted.revoked_at,
            revocation_failed_at: deleted.revocation_failed_at,
        }))
    }

    async fn get_provider_token(
        &self,
        request: Request<pb::GetProviderTokenRequest>,
    ) -> Result<Response<pb::ProviderToken>, Status> {
        let actor = caller(&request);
        let r = request.into_inner();
        let token = self
            .admin
            .get_provider_token(Actor(actor.as_deref()), &r.user_id, &r.provider)
            .await
            .map_err(admin_error)?;
        Ok(Response::new(convert::provider_token(token)))
    }

    async fn revoke_provider_token(
        &self,
        request: Request<pb::RevokeProviderTokenRequest>,
    ) -> Result<Response<pb::RevokeProviderTokenResponse>, Status> {
        let actor = caller(&request);
        let r = request.into_inner();
        let revoked_at_provider = self
            .admin
            .revoke_provider_token(Actor(actor.as_deref()), &r.user_id, &r.provider)
            .await
            .map_err(admin_error)?;
        Ok(Response::new(pb::RevokeProviderTokenResponse {
            revoked_at_provider,
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let actor = caller(&request);
        let r = request.into_inner();
        let page = self
            .admin
            .list_audit_events(
                Actor(actor.as_deref()),
                AuditFilter {
                    user_id: non_empty(r.user_id),
                    provider: non_empty(r.provider),
                    kind: non_empty(r.kind),
                    after: convert::moment(r.after),
                    before: convert::moment(r.before),
                    page_size: page_size(r.page_size),
                    page_token: r.page_token,
                },
            )
            .await
            .map_err(admin_error)?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: page.items.into_iter().map(convert::audit_event).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn cancel_login(
        &self,
        request: Request<pb::CancelLoginRequest>,
    ) -> Result<Response<pb::CancelLoginResponse>, Status> {
        let actor = caller(&request);
        let r = request.into_inner();
        self.admin
            .cancel_login(Actor(actor.as_deref()), &r.state)
            .await
            .map_err(admin_error)?;
        Ok(Response::new(pb::CancelLoginResponse {}))
    }
}
