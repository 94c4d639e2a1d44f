//! The product, black box: an in-process authbroker on port 0 against a
//! fresh database, driven over real gRPC, plus the `authbroker` binary's
//! commands. One module per area; `support` is the shared harness.

mod support;

#[path = "service/admin.rs"]
mod admin;
#[path = "service/cli.rs"]
mod cli;
#[path = "service/harness.rs"]
mod harness;
#[path = "service/login_flow.rs"]
mod login_flow;
#[path = "service/observability.rs"]
mod observability;
#[path = "service/policies.rs"]
mod policies;
#[path = "service/properties.rs"]
mod properties;
#[path = "service/provider_config.rs"]
mod provider_config;
#[path = "service/state.rs"]
mod state;
#[path = "service/store.rs"]
mod store;
#[path = "service/transport.rs"]
mod transport;
