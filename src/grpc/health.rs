//! `grpc.health.v1.Health`, as tonic-health serves it, except that Watch
//! streams end when the server starts draining. tonic drains gracefully by
//! waiting for every open call, and a Watch stream never ends on its own: one
//! watching load balancer would hold a stopping replica up for its whole
//! `shutdown_grace`.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::{
    pb::{HealthCheckRequest, HealthCheckResponse, health_server::Health},
    server::HealthService,
};

pub struct Draining {
    inner: HealthService,
    /// Turns true once the last status (NOT_SERVING) has been handed out.
    closing: watch::Receiver<bool>,
}

impl Draining {
    pub fn new(inner: HealthService, closing: watch::Receiver<bool>) -> Self {
        Draining { inner, closing }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for Draining {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let mut closing = self.closing.clone();
        let closed = async move {
            // An error means the server is gone: close as well.
            let _ = closing.wait_for(|c| *c).await;
        };
        Ok(Response::new(Box::pin(statuses.take_until(closed))))
    }
}
