//! The gRPC listener itself, over real sockets: TLS and mTLS with
//! certificates made at test time (client certificates as callers,
//! renewal without restart, the healthcheck over TLS), and the limits every
//! connection and call meets (streams per connection, calls in progress,
//! request time, per-key rates).

#[path = "transport/limits.rs"]
mod limits;
#[path = "transport/pki.rs"]
mod pki;
#[path = "transport/tls.rs"]
mod tls;
