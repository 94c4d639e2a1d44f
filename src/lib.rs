//! authbroker: a gRPC service that brokers third-party login (QQ, GitHub,
//! Qiita, AcWing, WeChat, Google …) for web backends in any language.
//!
//! A web backend calls `BeginLogin(provider)`, redirects the browser to the
//! returned authorize URL, and on the provider's callback calls
//! `CompleteLogin(code, state)`; authbroker checks the state, exchanges the
//! code, fetches the provider's stable user id and profile, and returns the
//! binding between that identity and a local user.
//!
//! Layout, one job per module:
//! - [`config`]: typed settings (TOML file + `AUTHBROKER__` env overrides) and
//!   `validate()`, which lists at once every problem config can judge alone;
//!   the vault's keys are read (inline, file or environment) and checked here
//!   too. It imports no other module of the crate: the bottom of the graph.
//! - [`check`]: `check::settings`, config's `validate()` plus the checks that
//!   need the modules using a setting (TLS PEM files, Postgres URL
//!   parameters, provider URLs in clear); what `serve`, `dev` and
//!   `check-config` run.
//! - [`telemetry`]: the tracing subscriber (text or JSON). Nothing secret is
//!   ever logged. `telemetry::trace`: OTLP span export, and the caller's W3C
//!   `traceparent` joined, so every log line of a call has its trace id.
//! - [`metrics`]: what is counted and timed (label values from bounded sets
//!   only) and `/metrics` on a listener of its own.
//! - [`app`]: `Application::build(settings)` wires everything onto a bound
//!   listener; `run_until_stopped(shutdown)` serves and drains.
//! - [`domain`]: value types (identity, binding, audit event) shared by the
//!   layers below; no protobuf, no SQL. `domain::binding` holds the binding
//!   policy's types — `BindPolicy`, the `Facts` a store reads, the
//!   `Decision` it applies — and `Decide`, the decision function's type.
//! - [`login`]: the use cases — begin and complete a login (resuming a
//!   retried one where it failed), link an identity with a link ticket — and
//!   the binding policy itself: `login::binding::decide`, a pure function
//!   from an identity, its provider's `BindPolicy` and the facts a store
//!   read to the user it binds to (existing, linked by union id or verified
//!   email, created, or link required) and the audit events to write. The
//!   login use case passes it to `BindingStore::bind_login`.
//! - [`tokens`]: provider tokens for the app — sealed at login, refreshed
//!   once per identity however many ask (single flight), revoked, and
//!   re-sealed under the newest key by `rotate-keys` (`tokens::rotation`).
//! - [`admin`]: the operator use cases behind `AdminService`, each audited.
//! - [`state`]: pending logins and link tickets between the calls that
//!   issue and redeem them: the `StateStore` seam (pending → claimed →
//!   finished), its backends — moka in this process (`state::memory`), a
//!   Postgres table (`state::postgres`) and Redis keys (`state::redis`) that
//!   replicas share — what the shared ones write (`state::seal`: keys hashed,
//!   values sealed under the token), their conformance suite
//!   (`state::conformance`), and the pool of OS randomness that states, PKCE
//!   verifiers and nonces are drawn from (`state::entropy`).
//! - [`provider`]: the `Provider` seam, the spec-driven OAuth2 engine
//!   (`provider::spec` is the data schema, `provider::engine` runs it), the
//!   built-in presets (data files under `providers/`, `provider::presets`),
//!   OpenID Connect discovery and ID-token checks (`provider::oidc`), and the
//!   registry that builds providers from config. Each preset's wire format is
//!   in `docs/providers.md`.
//! - [`sandbox`]: the development OAuth2 server that `authbroker dev` runs
//!   in-process (authorize page, token, userinfo); to `provider` it is just
//!   the `sandbox` preset pointed at its address.
//! - [`store`]: persistence behind one seam per capability —
//!   `BindingStore` (logins and links), `TokenStore` (sealed provider
//!   tokens), `AuditLog`, `UserDirectory` (operators' users), `Database`
//!   (migrate, ping) — summed up by `Store`; Postgres and SQLite implement
//!   them all. `bind_login` is handed the decision function (a
//!   `domain::binding::Decide`, dex's updater functions): it gathers the
//!   facts under the backend's locks, calls it and applies its decision in
//!   the same transaction, so `store` imports `domain`, never `login`.
//!   On Postgres the common logins take one statement each
//!   (`store::postgres::one_statement`: a returning login in one round
//!   trip, a new user in two).
//!   Both pass one conformance suite (`store::conformance`, a
//!   file per capability plus `concurrency`); `store::interposed` is a
//!   forwarding store that tests use to inject faults around the real one.
//!   `store::postgres::tls` reads a Postgres URL's `sslmode` and
//!   `sslrootcert` for both Postgres pools (the store's, the state backend's).
//! - [`grpc`]: the only place that knows protobuf — thin service impls,
//!   proto/domain conversion, caller authentication by API key or client
//!   certificate with per-caller rates (`grpc::auth`), error-to-status
//!   mapping, each call's span, count and timing (`grpc::observe`), the
//!   global bound and time limit on calls (`grpc::limits`),
//!   health whose Watch streams close on shutdown (`grpc::health`), and
//!   accepted connections: TLS handshake, connection slots, write tuning
//!   (`grpc::socket`).
//! - [`tls`]: the listener's TLS configuration from PEM files, re-read when
//!   they change; client certificate names; the healthcheck's TLS client.
//! - [`http`]: the one outbound HTTP client (timeouts, body cap, no redirects,
//!   trusted roots; certificate failures told apart from outages).
//! - [`vault`]: the key ring and AEAD that seal provider tokens; the store
//!   only ever sees ciphertext, and the vault never sees the store. Its keys
//!   come decoded from `config`.
//! - [`reason`]: the `Reason` enum, every stable `ErrorInfo.reason` the
//!   service sends, with its wire string and whether a retry can help;
//!   `grpc::status` gives each its gRPC code, and a test holds the README's
//!   error table to both.
//!
//! Outside `src/`: the preset data files (`providers/`), their wire formats
//! and sources (`docs/providers.md`), the migrations of each store, and
//! three test binaries — `tests/service.rs` (the product over real gRPC),
//! `tests/providers.rs` (emulators of each provider's wire format and the
//! provider conformance suite) and `tests/e2e.rs` (grpcurl, Python, the
//! example web apps in Chromium, replicas, the container build) — sharing
//! one harness, `tests/support`.

pub mod admin;
pub mod app;
pub mod check;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod http;
pub mod login;
pub mod metrics;
pub mod provider;
pub mod reason;
pub mod sandbox;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod tokens;
pub mod vault;
