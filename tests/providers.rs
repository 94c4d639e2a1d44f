//! Providers, over real HTTP: the emulators themselves (each checked
//! against its provider's wire format), the presets against them, OIDC's
//! specifics, and the conformance suite every preset runs. One module per
//! area; `support` is the shared harness and holds the emulators.

mod support;

#[path = "providers/conformance.rs"]
mod conformance;
#[path = "providers/emulators/mod.rs"]
mod emulators;
#[path = "providers/github.rs"]
mod github;
#[path = "providers/microsoft_apple.rs"]
mod microsoft_apple;
#[path = "providers/oidc.rs"]
mod oidc;
#[path = "providers/presets.rs"]
mod presets;
#[path = "providers/real_idp.rs"]
mod real_idp;
