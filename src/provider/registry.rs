//! Builds the configured providers from presets plus `[providers.NAME]`
//! settings, reporting every configuration problem at once.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use secrecy::{ExposeSecret, SecretString};
use url::Url;

use serde::Deserialize;

use super::{
    Provider, ProviderInfo,
    client_auth::{ClientKey, TokenAuth},
    engine::{SpecParts, SpecProvider},
    oidc::{self, OidcConfig, OidcProvider},
    preset_options, presets,
    signed_secret::{SignedSecret, SignedSecretSpec},
    signing::{KeyError, Signer},
    spec::ProviderSpec,
};
use crate::{config::ProviderConfig, http::HttpClient};

/// The sandbox needs no real credentials; these fill in when config leaves them out.
const SANDBOX_CLIENT_ID: &str = "sandbox";
const SANDBOX_CLIENT_SECRET: &str = "sandbox-secret";

#[derive(Clone, Default)]
pub struct Registry {
    providers: HashMap<String, Arc<dyn Provider>>,
    disabled: Vec<String>,
}

/// Why a provider name cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Unknown,
    Disabled,
}

impl Registry {
    /// `sandbox_base` is where the in-process sandbox listens; sandbox
    /// endpoints are rebased onto it.
    pub fn build(
        configs: &BTreeMap<String, ProviderConfig>,
        http: &HttpClient,
        sandbox_base: Option<&Url>,
    ) -> Result<Registry, Vec<String>> {
        let mut registry = Registry::default();
        let mut problems = Vec::new();
        for (name, cfg) in configs {
            match build_one(name, cfg, http, sandbox_base) {
                Ok(p) if cfg.enabled => {
                    registry.providers.insert(name.clone(), p);
                }
                Ok(_) => registry.disabled.push(name.clone()),
                Err(mut errs) => problems.append(&mut errs),
            }
        }
        if problems.is_empty() {
            Ok(registry)
        } else {
            Err(problems)
        }
    }

    pub fn get(&self, name: &str) -> Result<&Arc<dyn Provider>, Lookup> {
        match self.providers.get(name) {
            Some(p) => Ok(p),
            None if self.disabled.iter().any(|d| d == name) => Err(Lookup::Disabled),
            None => Err(Lookup::Unknown),
        }
    }

    /// Every enabled provider.
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Provider>> {
        self.providers.values()
    }

    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.providers.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn uses_sandbox(configs: &BTreeMap<String, ProviderConfig>) -> bool {
        configs.values().any(|c| c.enabled && c.kind == "sandbox")
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn parse_http_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{s:?} must be an http(s) URL with a host"));
    }
    Ok(url)
}

fn build_one(
    name: &str,
    cfg: &ProviderConfig,
    http: &HttpClient,
    sandbox_base: Option<&Url>,
) -> Result<Arc<dyn Provider>, Vec<String>> {
    let at = format!("providers.{name}");
    let mut problems = Vec::new();
    if !valid_name(name) {
        problems.push(format!(
            "{at}: provider names are 1-64 characters of a-z, 0-9, '_' and '-'"
        ));
    }
    let credentials = credentials(&at, cfg, &mut problems);
    check_redirect_uris(&at, cfg, &mut problems);
    if cfg.allow_sandbox && cfg.kind != "sandbox" {
        problems.push(format!(
            "{at}.allow_sandbox: only kind = \"sandbox\" takes this option"
        ));
    }
    let is_oidc = cfg.kind == "oidc" || presets::oidc_preset(&cfg.kind).is_some();
    check_authorize_params(&at, cfg, &mut problems);
    if cfg.issuer.is_some() && !is_oidc {
        problems.push(format!(
            "{at}.issuer: only OIDC providers (kind = \"oidc\" or an OIDC preset) have an issuer; \
             {:?} is configured with endpoints",
            cfg.kind
        ));
    }
    let built = if is_oidc {
        build_oidc(&at, name, cfg, http, &mut problems)
    } else {
        build_oauth2(&at, name, cfg, http, sandbox_base, &mut problems)
    };
    match (built, credentials, problems.is_empty()) {
        (Some(make), Some((client_id, secret)), true) => Ok(make(client_id, secret)),
        _ => Err(problems),
    }
}

/// A provider, once the client credentials are known to be valid.
type Make = Box<dyn FnOnce(String, SecretString) -> Arc<dyn Provider>>;

/// Authorize parameters every login sends itself; a fixed value for one
/// would break or weaken the login.
const RESERVED_AUTHORIZE_PARAMS: &[&str] = &[
    "state",
    "client_id",
    "redirect_uri",
    "response_type",
    "scope",
    "code_challenge",
    "code_challenge_method",
    "nonce",
];

fn check_authorize_params(at: &str, cfg: &ProviderConfig, problems: &mut Vec<String>) {
    for key in cfg.authorize_params.keys() {
        if RESERVED_AUTHORIZE_PARAMS.contains(&key.as_str()) {
            problems.push(format!(
                "{at}.authorize_params.{key}: set by authbroker for every login and cannot be \
                 fixed in config (scopes go in scopes, redirect URIs in redirect_uris)"
            ));
        }
    }
}

/// The private key `private_key_jwt` signs with, when one is configured.
fn client_key(at: &str, cfg: &ProviderConfig, problems: &mut Vec<String>) -> Option<ClientKey> {
    let path = cfg.private_key_file.as_ref()?;
    let pem = std::fs::read(path)
        .map_err(|e| {
            problems.push(format!(
                "{at}.private_key_file: cannot read {}: {e}",
                path.display()
            ))
        })
        .ok()?;
    ClientKey::from_pem(&pem, cfg.private_key_alg, cfg.private_key_id.clone())
        .map_err(|e| problems.push(format!("{at}.private_key_file: {}: {e}", path.display())))
        .ok()
}

/// What a preset that mints its client secret signs it with: the spec,
/// the key from `private_key_file` (of the spec's type, known by
/// `private_key_id`) and the issuer from the spec's option.
fn secret_signer(
    at: &str,
    cfg: &ProviderConfig,
    spec: &SignedSecretSpec,
    options: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) -> Option<(SignedSecretSpec, ClientKey, String)> {
    problems.extend(
        spec.check()
            .into_iter()
            .map(|p| format!("{at}: preset {p}")),
    );
    if cfg.client_secret.is_some() || cfg.client_secret_file.is_some() {
        problems.push(format!(
            "{at}.client_secret: {:?} signs its own client secret with private_key_file; \
             leave client_secret out",
            cfg.kind
        ));
    }
    if cfg.token_auth == Some(TokenAuth::PrivateKeyJwt) {
        problems.push(format!(
            "{at}.token_auth: {:?} sends its signed secret as a client secret, not private_key_jwt",
            cfg.kind
        ));
    }
    let Some(path) = &cfg.private_key_file else {
        problems.push(format!(
            "{at}.private_key_file: {:?} signs its client secret with the key the provider issued; \
             set private_key_file and private_key_id",
            cfg.kind
        ));
        return None;
    };
    let Some(kid) = cfg.private_key_id.clone().filter(|k| !k.trim().is_empty()) else {
        problems.push(format!(
            "{at}.private_key_id: required (the key's id, as the provider shows it)"
        ));
        return None;
    };
    let pem = std::fs::read(path)
        .map_err(|e| {
            problems.push(format!(
                "{at}.private_key_file: cannot read {}: {e}",
                path.display()
            ))
        })
        .ok()?;
    let key = ClientKey::from_pem(&pem, spec.alg, Some(kid))
        .map_err(|e| problems.push(format!("{at}.private_key_file: {}: {e}", path.display())))
        .ok()?;
    // resolve() has reported a missing option already.
    let issuer = options.get(&spec.issuer_option)?.clone();
    Some((spec.clone(), key, issuer))
}

/// Whether `kind` is a preset that signs its own client secret.
fn mints_secret(kind: &str) -> bool {
    matches!(presets::oidc_preset(kind), Some(Ok(p)) if p.client_secret_jwt.is_some())
}

fn info_for(
    name: &str,
    cfg: &ProviderConfig,
    display_name: &str,
    default_scopes: &[String],
) -> ProviderInfo {
    ProviderInfo {
        name: Arc::from(name),
        kind: cfg.kind.clone(),
        display_name: display_name.to_string(),
        redirect_uris: cfg
            .redirect_uris
            .iter()
            .map(|u| Arc::from(u.as_str()))
            .collect(),
        scopes: Arc::from(
            cfg.scopes
                .clone()
                .unwrap_or_else(|| default_scopes.to_vec()),
        ),
        allowed_scopes: cfg.allowed_scopes.clone(),
        pkce: false,
        nonce: false,
        denied: vec!["access_denied".into()],
        refresh_token_single_use: false,
    }
}

fn build_oauth2(
    at: &str,
    name: &str,
    cfg: &ProviderConfig,
    http: &HttpClient,
    sandbox_base: Option<&Url>,
    problems: &mut Vec<String>,
) -> Option<Make> {
    let is_sandbox = cfg.kind == "sandbox";
    let spec = spec_for(at, cfg, problems)?;
    if cfg.union_id && spec.identity.union_id.0.is_empty() {
        problems.push(format!(
            "{at}.union_id: {:?} has no union id to ask for",
            cfg.kind
        ));
    }
    if cfg.fetch_userinfo {
        problems.push(format!(
            "{at}.fetch_userinfo: only OIDC providers take this option"
        ));
    }
    let mut endpoints = BTreeMap::new();
    for (key, value) in &spec.endpoints {
        let chosen = cfg.endpoints.get(key).unwrap_or(value);
        match parse_http_url(chosen) {
            Ok(mut url) => {
                if is_sandbox
                    && !cfg.endpoints.contains_key(key)
                    && let Some(base) = sandbox_base
                {
                    let path = url.path().to_string();
                    url = base.clone();
                    url.set_path(&path);
                }
                endpoints.insert(key.clone(), url);
            }
            Err(e) => problems.push(format!("{at}.endpoints.{key}: {e}")),
        }
    }
    let known: Vec<&str> = spec.endpoints.keys().map(String::as_str).collect();
    unknown_endpoint_keys(at, cfg, &known, problems);
    let mut spec = spec;
    if cfg
        .authorize_params
        .contains_key(&spec.authorize.client_id_param)
    {
        problems.push(format!(
            "{at}.authorize_params.{}: the client id is set from client_id",
            spec.authorize.client_id_param
        ));
    }
    spec.authorize.params.extend(cfg.authorize_params.clone());
    choose_subject(at, cfg, &mut spec, problems);
    let signer = signer_for(at, cfg, &spec, problems);
    let client_key = client_key(at, cfg, problems);
    match (cfg.token_auth, &client_key) {
        (Some(TokenAuth::PrivateKeyJwt), None) => problems.push(format!(
            "{at}.token_auth: private_key_jwt needs private_key_file"
        )),
        (Some(TokenAuth::PrivateKeyJwt), Some(_))
            if spec.token.method != super::spec::TokenMethod::PostForm =>
        {
            problems.push(format!(
                "{at}.token_auth: private_key_jwt needs a form-encoded token request; {:?} sends another",
                cfg.kind
            ))
        }
        (Some(TokenAuth::PrivateKeyJwt), Some(_)) => {}
        (_, Some(_)) => problems.push(format!(
            "{at}.private_key_file: only used with token_auth = \"private_key_jwt\""
        )),
        (_, None) => {}
    }
    let token_auth = cfg.token_auth;

    let mut info = info_for(name, cfg, &spec.display_name, &spec.default_scopes);
    info.pkce = spec.pkce;
    info.denied = spec.authorize.denied.clone();
    info.refresh_token_single_use = spec.refresh_token_single_use;
    let options = cfg
        .union_id
        .then(|| "union_id".to_string())
        .into_iter()
        .collect();
    let http = http.clone();
    Some(Box::new(move |client_id, client_secret| {
        Arc::new(
            SpecProvider::new(SpecParts {
                info,
                spec,
                endpoints,
                client_id,
                client_secret,
                token_auth,
                client_key,
                options,
                http,
            })
            .with_signer(signer),
        ) as Arc<dyn Provider>
    }))
}

/// The subject the preset's `subject` option picks, where it has one
/// (Alipay's `user_id` or `open_id`); other options are refused here.
fn choose_subject(
    at: &str,
    cfg: &ProviderConfig,
    spec: &mut ProviderSpec,
    problems: &mut Vec<String>,
) {
    let options = match preset_options::resolve(at, &spec.options, &cfg.options) {
        Ok(options) => options,
        Err(mut found) => return problems.append(&mut found),
    };
    let Some(choice) = options.get("subject") else {
        return;
    };
    match spec.identity.subject_by_option.get(choice) {
        Some(paths) => spec.identity.subject = paths.clone(),
        None => problems.push(format!(
            "{at}.options.subject: {choice:?} is not one of {}",
            spec.identity
                .subject_by_option
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// For a spec that signs its calls: the client secret is the app's RSA
/// private key, and the provider's public key checks the answers.
fn signer_for(
    at: &str,
    cfg: &ProviderConfig,
    spec: &ProviderSpec,
    problems: &mut Vec<String>,
) -> Option<Signer> {
    let public = match (&cfg.provider_public_key, &cfg.provider_public_key_file) {
        (Some(_), Some(_)) => {
            problems.push(format!(
                "{at}: set provider_public_key or provider_public_key_file, not both"
            ));
            return None;
        }
        (Some(key), None) => Some(key.clone()),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(key) => Some(key),
            Err(e) => {
                problems.push(format!(
                    "{at}.provider_public_key_file: cannot read {}: {e}",
                    path.display()
                ));
                return None;
            }
        },
        (None, None) => None,
    };
    let Some(signing) = &spec.signing else {
        if public.is_some() {
            problems.push(format!(
                "{at}.provider_public_key: only for providers that sign their answers"
            ));
        }
        return None;
    };
    // A missing secret is reported by `credentials` already.
    let (_, private) = credentials(at, cfg, &mut Vec::new())?;
    Signer::new(signing.clone(), &private, public.as_deref())
        .map_err(|e| {
            let field = match e {
                KeyError::Private => "client_secret (the app's private key)",
                KeyError::Public | KeyError::PublicMissing => "provider_public_key",
                KeyError::Spec(_) => "kind",
            };
            problems.push(format!("{at}.{field}: {e}"));
        })
        .ok()
}

fn build_oidc(
    at: &str,
    name: &str,
    cfg: &ProviderConfig,
    http: &HttpClient,
    problems: &mut Vec<String>,
) -> Option<Make> {
    let preset = match presets::oidc_preset(&cfg.kind) {
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => {
            problems.push(format!(
                "{at}.kind: built-in preset {:?} is broken: {e}",
                cfg.kind
            ));
            return None;
        }
        None => None,
    };
    if cfg.spec.is_some() {
        problems.push(format!(
            "{at}.spec: only kind = \"oauth2\" takes a spec; OIDC providers use discovery"
        ));
    }
    if cfg.union_id {
        problems.push(format!("{at}.union_id: OIDC providers have no union id"));
    }
    unknown_endpoint_keys(at, cfg, oidc::ENDPOINT_KEYS, problems);
    let mut overrides = BTreeMap::new();
    for (key, value) in &cfg.endpoints {
        match parse_http_url(value) {
            Ok(url) => {
                overrides.insert(key.clone(), url);
            }
            Err(e) => problems.push(format!("{at}.endpoints.{key}: {e}")),
        }
    }
    if cfg.issuer.is_some() && cfg.endpoints.contains_key("issuer") {
        problems.push(format!(
            "{at}.issuer: set issuer or endpoints.issuer, not both"
        ));
    }
    if let Some(i) = &cfg.issuer
        && let Err(e) = parse_http_url(i)
    {
        problems.push(format!("{at}.issuer: {e}"));
    }
    let declared = preset
        .as_ref()
        .map(|p| p.options.clone())
        .unwrap_or_default();
    let options = preset_options::resolve(at, &declared, &cfg.options)
        .map_err(|mut errs| problems.append(&mut errs))
        .unwrap_or_default();
    let configured_issuer = cfg.issuer.as_ref().or(cfg.endpoints.get("issuer"));
    let issuer = match (configured_issuer, &preset) {
        // A configured issuer may keep the preset's `{tenant}` too (another
        // cloud's host, the same tenants).
        (Some(i), _) => Some(preset_options::fill(i.trim_end_matches('/'), &options)),
        (None, Some(p)) => Some(preset_options::fill(&p.issuer, &options)),
        (None, None) => {
            problems.push(format!(
                "{at}.issuer: kind \"oidc\" needs the issuer URL (discovery is read from ISSUER/.well-known/openid-configuration)"
            ));
            None
        }
    };
    let (tenant_issuer, claims, secret_spec, denied) = match &preset {
        Some(p) => (
            p.tenant_issuer.clone(),
            p.claims.clone(),
            p.client_secret_jwt.clone(),
            p.denied.clone(),
        ),
        None => Default::default(),
    };
    let (display_name, aliases, default_scopes, mut authorize_params) = match preset {
        Some(p) => (
            p.display_name,
            p.issuer_aliases,
            p.default_scopes,
            p.authorize_params,
        ),
        None => (
            name.to_string(),
            Vec::new(),
            vec!["openid".into(), "email".into(), "profile".into()],
            BTreeMap::new(),
        ),
    };
    let mut info = info_for(name, cfg, &display_name, &default_scopes);
    info.denied.extend(denied);
    if !info.scopes.iter().any(|s| s == "openid") {
        problems.push(format!("{at}.scopes: OIDC needs the \"openid\" scope"));
    }
    authorize_params.extend(cfg.authorize_params.clone());
    // A preset that mints its secret signs it with the configured key.
    let signer = secret_spec
        .as_ref()
        .and_then(|spec| secret_signer(at, cfg, spec, &options, problems));
    let client_key = match secret_spec {
        Some(_) => None,
        None => client_key(at, cfg, problems),
    };
    match (cfg.token_auth, &client_key) {
        (Some(TokenAuth::PrivateKeyJwt), None) => problems.push(format!(
            "{at}.token_auth: private_key_jwt needs private_key_file"
        )),
        (Some(TokenAuth::ClientSecretBasic | TokenAuth::ClientSecretPost), Some(_)) => problems
            .push(format!(
                "{at}.private_key_file: only used with token_auth = \"private_key_jwt\" (or unset)"
            )),
        _ => {}
    }
    let token_auth = cfg.token_auth;
    let issuer = issuer?;
    // Generated for every login; used when discovery advertises S256.
    info.pkce = true;
    info.nonce = true;
    let fetch_userinfo = cfg.fetch_userinfo;
    let allow_insecure_http = cfg.allow_insecure_http;
    let http = http.clone();
    Some(Box::new(move |client_id, client_secret| {
        let signed_secret = signer.map(|(spec, key, team)| {
            Arc::new(SignedSecret::new(&spec, key, team, client_id.clone()))
        });
        Arc::new(OidcProvider::new(OidcConfig {
            info,
            issuer,
            issuer_aliases: aliases,
            overrides,
            authorize_params,
            client_id,
            client_secret,
            token_auth,
            client_key,
            fetch_userinfo,
            allow_insecure_http,
            http,
            tenant_issuer,
            claims,
            signed_secret,
        })) as Arc<dyn Provider>
    }))
}

fn unknown_endpoint_keys(
    at: &str,
    cfg: &ProviderConfig,
    known: &[&str],
    problems: &mut Vec<String>,
) {
    for key in cfg.endpoints.keys() {
        if !known.contains(&key.as_str()) {
            problems.push(format!(
                "{at}.endpoints.{key}: not an endpoint of {:?} (known: {})",
                cfg.kind,
                known.join(", ")
            ));
        }
    }
}

/// Client id and secret, or the problems with them.
fn credentials(
    at: &str,
    cfg: &ProviderConfig,
    problems: &mut Vec<String>,
) -> Option<(String, SecretString)> {
    let is_sandbox = cfg.kind == "sandbox";
    let client_id = match (cfg.client_id.trim(), is_sandbox) {
        ("", true) => Some(SANDBOX_CLIENT_ID.to_string()),
        ("", false) => {
            problems.push(format!("{at}.client_id: required"));
            None
        }
        (id, _) => Some(id.to_string()),
    };
    let secret = match (&cfg.client_secret, &cfg.client_secret_file) {
        (Some(_), Some(_)) => {
            problems.push(format!(
                "{at}: set client_secret or client_secret_file, not both"
            ));
            None
        }
        (Some(s), None) if !s.expose_secret().is_empty() => Some(s.clone()),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(s) if !s.trim().is_empty() => Some(SecretString::from(s.trim().to_string())),
            Ok(_) => {
                problems.push(format!(
                    "{at}.client_secret_file: {} is empty",
                    path.display()
                ));
                None
            }
            Err(e) => {
                problems.push(format!(
                    "{at}.client_secret_file: cannot read {}: {e}",
                    path.display()
                ));
                None
            }
        },
        _ if is_sandbox => Some(SecretString::from(SANDBOX_CLIENT_SECRET)),
        // The client signs an assertion instead (RFC 7523); no secret.
        _ if cfg.token_auth == Some(TokenAuth::PrivateKeyJwt) => Some(SecretString::from("")),
        // The preset signs its own (`secret_signer`).
        (None, None) if mints_secret(&cfg.kind) => Some(SecretString::from("")),
        _ => {
            let env_name = at.replace('.', "__").to_ascii_uppercase();
            problems.push(format!(
                "{at}: a client secret is required (client_secret, client_secret_file, \
                 or AUTHBROKER__{env_name}__CLIENT_SECRET)"
            ));
            None
        }
    };
    Some((client_id?, secret?))
}

fn check_redirect_uris(at: &str, cfg: &ProviderConfig, problems: &mut Vec<String>) {
    if cfg.redirect_uris.is_empty() {
        problems.push(format!("{at}.redirect_uris: at least one is required"));
    }
    for uri in &cfg.redirect_uris {
        match parse_http_url(uri) {
            Ok(u) if u.fragment().is_some() => problems.push(format!(
                "{at}.redirect_uris: {uri:?} must not have a fragment"
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("{at}.redirect_uris: {e}")),
        }
    }
}

/// The spec a provider runs on: a built-in preset, or for `kind = "oauth2"`
/// the `[providers.NAME.spec]` table, checked like a preset.
fn spec_for(at: &str, cfg: &ProviderConfig, problems: &mut Vec<String>) -> Option<ProviderSpec> {
    if cfg.kind == "oauth2" {
        let Some(table) = &cfg.spec else {
            problems.push(format!(
                "{at}.spec: kind \"oauth2\" needs a [{at}.spec] table describing the provider"
            ));
            return None;
        };
        return match ProviderSpec::deserialize(toml::Value::Table(table.clone())) {
            Ok(spec) => {
                let mut found: Vec<String> = spec
                    .check()
                    .into_iter()
                    .map(|p| format!("{at}.spec.{p}"))
                    .collect();
                if found.is_empty() {
                    Some(spec)
                } else {
                    problems.append(&mut found);
                    None
                }
            }
            Err(e) => {
                problems.push(format!("{at}.spec: {}", e.message()));
                None
            }
        };
    }
    if cfg.spec.is_some() {
        problems.push(format!(
            "{at}.spec: only kind = \"oauth2\" takes a spec; presets are configured with endpoints"
        ));
    }
    match presets::preset(&cfg.kind) {
        Some(Ok(spec)) => Some(spec),
        Some(Err(e)) => {
            problems.push(format!(
                "{at}.kind: built-in preset {:?} is broken: {e}",
                cfg.kind
            ));
            None
        }
        None => {
            let mut known: Vec<&str> = presets::PRESETS
                .iter()
                .chain(presets::OIDC_PRESETS)
                .map(|(n, _)| *n)
                .collect();
            known.extend(["oauth2", "oidc"]);
            known.sort_unstable();
            problems.push(format!(
                "{at}.kind: unknown kind {:?} (known: {})",
                cfg.kind,
                known.join(", ")
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HttpSettings;

    fn cfg(kind: &str) -> ProviderConfig {
        ProviderConfig {
            kind: kind.into(),
            client_id: "id".into(),
            client_secret: Some("secret".into()),
            redirect_uris: vec!["https://app.example/cb".into()],
            ..Default::default()
        }
    }

    fn build(configs: &[(&str, ProviderConfig)]) -> Result<Registry, Vec<String>> {
        let http = HttpClient::new(&HttpSettings::default()).unwrap();
        let map = configs
            .iter()
            .map(|(n, c)| (n.to_string(), c.clone()))
            .collect();
        Registry::build(&map, &http, None)
    }

    #[test]
    fn lists_every_problem() {
        let mut bad_kind = cfg("nope");
        bad_kind.client_id = String::new();
        let mut bad_gh = cfg("github");
        bad_gh.client_secret = None;
        bad_gh.redirect_uris = vec!["not a url".into(), "https://x/cb#frag".into()];
        bad_gh
            .endpoints
            .insert("token_url".into(), "ftp://x".into());
        bad_gh
            .endpoints
            .insert("bogus_url".into(), "https://x".into());
        let mut no_redirects = cfg("github");
        no_redirects.redirect_uris.clear();
        let problems = build(&[
            ("Bad Name", cfg("github")),
            ("a", bad_kind),
            ("b", bad_gh),
            ("c", no_redirects),
        ])
        .err()
        .unwrap();
        let has = |s: &str| problems.iter().any(|p| p.contains(s));
        assert!(has("providers.Bad Name: provider names"), "{problems:#?}");
        assert!(has("providers.a.kind: unknown kind \"nope\""));
        assert!(has("providers.a.client_id: required"));
        assert!(has("providers.b: a client secret is required"));
        assert!(has("AUTHBROKER__PROVIDERS__B__CLIENT_SECRET"));
        assert!(has("providers.b.redirect_uris: \"not a url\""));
        assert!(has("must not have a fragment"));
        assert!(has("providers.b.endpoints.token_url"));
        assert!(has("providers.b.endpoints.bogus_url: not an endpoint"));
        assert!(has("providers.c.redirect_uris: at least one"));
        assert_eq!(problems.len(), 9, "{problems:#?}");
    }

    #[test]
    fn disabled_and_unknown_are_told_apart() {
        let mut off = cfg("github");
        off.enabled = false;
        let r = build(&[("gh", cfg("github")), ("off", off)]).unwrap();
        assert!(r.get("gh").is_ok());
        assert_eq!(r.get("off").err(), Some(Lookup::Disabled));
        assert_eq!(r.get("zz").err(), Some(Lookup::Unknown));
    }

    #[test]
    fn secret_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "from-file\n").unwrap();
        let mut c = cfg("github");
        c.client_secret = None;
        c.client_secret_file = Some(path);
        assert!(build(&[("gh", c)]).is_ok());
    }
}

#[cfg(test)]
mod readme {
    use super::*;
    use crate::config::{HttpSettings, Settings};

    const README: &str = include_str!("../../README.md");

    fn row(kind: &str) -> Vec<&'static str> {
        let prefix = format!("| `{kind}` |");
        let line = README
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("README's provider table has no row for {kind}"));
        line.split('|').map(str::trim).collect()
    }

    #[test]
    fn provider_table_matches_the_presets() {
        for (kind, _) in presets::PRESETS {
            let spec = presets::preset(kind).unwrap().unwrap();
            let cells = row(kind);
            // cells: "", kind, subject, PKCE, refresh, revoke, union id, email, endpoints, ""
            assert_eq!(
                cells[3].starts_with("S256"),
                spec.pkce,
                "{kind}: PKCE column"
            );
            assert_eq!(
                cells[4].starts_with("yes"),
                spec.refresh.is_some(),
                "{kind}: refresh"
            );
            assert_eq!(
                cells[5].starts_with("yes"),
                spec.revoke.is_some(),
                "{kind}: revoke"
            );
            if *kind != "sandbox" {
                for key in spec.endpoints.keys() {
                    assert!(
                        cells[8].contains(&format!("`{key}`")),
                        "{kind}: endpoint {key}"
                    );
                }
                let listed = cells[8].matches('`').count() / 2;
                assert_eq!(listed, spec.endpoints.len(), "{kind}: endpoint keys");
            }
        }
        for (kind, _) in presets::OIDC_PRESETS {
            let cells = row(kind);
            for key in oidc::ENDPOINT_KEYS {
                assert!(
                    cells[8].contains(&format!("`{key}`")),
                    "{kind}: endpoint {key}"
                );
            }
        }
        row("oidc");
        row("oauth2");
    }

    #[test]
    fn the_custom_provider_example_builds() {
        let start = README.find("<!-- custom-provider:start -->").unwrap();
        let end = README.find("<!-- custom-provider:end -->").unwrap();
        let block = &README[start..end];
        let toml_text = block
            .split("```toml")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("nimbus");
        std::fs::write(&secret, "s3cret").unwrap();
        let toml_text = toml_text.replace("/run/secrets/nimbus", secret.to_str().unwrap());
        let settings = Settings::from_figment(
            figment::Figment::from(figment::providers::Serialized::defaults(Settings::default()))
                .merge(
                    <figment::providers::Toml as figment::providers::Format>::string(&toml_text),
                ),
        )
        .unwrap();
        let http = HttpClient::new(&HttpSettings::default()).unwrap();
        let registry = Registry::build(&settings.providers, &http, None)
            .unwrap_or_else(|p| panic!("README example: {p:#?}"));
        assert!(registry.get("nimbus").is_ok());
    }
}
