//! `authbroker.v1.LoginService`: translate, call the use case, translate back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    auth::Caller,
    pb::{self, login_service_server},
    status::login_error,
};
use crate::login::LoginService;

pub struct LoginApi {
    login: Arc<LoginService>,
}

impl LoginApi {
    pub fn new(login: Arc<LoginService>) -> Self {
        LoginApi { login }
    }
}

/// The calling API key's name: whose logins these are.
fn caller<T>(request: &Request<T>) -> Option<Arc<str>> {
    request
        .extensions()
        .get::<Caller>()
        .and_then(|c| c.name.clone())
}

#[tonic::async_trait]
impl login_service_server::LoginService for LoginApi {
    async fn begin_login(
        &self,
        request: Request<pb::BeginLoginRequest>,
    ) -> Result<Response<pb::BeginLoginResponse>, Status> {
        let actor = caller(&request);
        let begun = self
            .login
            .begin(request.into_inner().into(), actor.as_deref())
            .await
            .map_err(login_error)?;
        Ok(Response::new(begun.into()))
    }

    async fn complete_login(
        &self,
        request: Request<pb::CompleteLoginRequest>,
    ) -> Result<Response<pb::CompleteLoginResponse>, Status> {
        let actor = caller(&request);
        let done = self
            .login
            .complete(request.into_inner().into(), actor.as_deref())
            .await
            .map_err(login_error)?;
        Ok(Response::new(done.into()))
    }

    async fn link_identity(
        &self,
        request: Request<pb::LinkIdentityRequest>,
    ) -> Result<Response<pb::LinkIdentityResponse>, Status> {
        let actor = caller(&request);
        let linked = self
            .login
            .link(request.into_inner().into(), actor.as_deref())
            .await
            .map_err(login_error)?;
        Ok(Response::new(linked.into()))
    }
}
