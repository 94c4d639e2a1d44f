//! Settings vocabulary for how a client authenticates to a provider's token
//! endpoint; `provider::client_auth` puts it to work.

use serde::{Deserialize, Serialize};

/// `token_auth` in config and in a spec's `[token]` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenAuth {
    ClientSecretBasic,
    ClientSecretPost,
    PrivateKeyJwt,
}

impl TokenAuth {
    /// The name discovery and config use for it.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenAuth::ClientSecretBasic => "client_secret_basic",
            TokenAuth::ClientSecretPost => "client_secret_post",
            TokenAuth::PrivateKeyJwt => "private_key_jwt",
        }
    }

    pub fn from_name(name: &str) -> Option<TokenAuth> {
        [
            TokenAuth::ClientSecretBasic,
            TokenAuth::ClientSecretPost,
            TokenAuth::PrivateKeyJwt,
        ]
        .into_iter()
        .find(|m| m.as_str() == name)
    }
}

/// Signing algorithms a client key may use for `private_key_jwt`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum KeyAlg {
    #[default]
    RS256,
    ES256,
}
