//! End to end: the built `authbroker` binary driven by real clients
//! (grpcurl, a Python grpcio client, the README's operator commands),
//! several replicas sharing one database, and the container image's build
//! replayed. One module per area; `support` is the shared harness.

mod support;

#[path = "e2e/docker_build.rs"]
mod docker_build;
#[path = "e2e/grpcurl.rs"]
mod grpcurl;
#[path = "e2e/ops.rs"]
mod ops;
#[path = "e2e/python.rs"]
mod python;
#[path = "e2e/replicas.rs"]
mod replicas;
#[path = "e2e/web_apps.rs"]
mod web_apps;
