//! The generic OAuth2 authorization-code engine, driven by a `ProviderSpec`.
//! Every built-in preset and every config-defined provider runs through here.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use async_trait::async_trait;
use reqwest::{Method, header};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use url::Url;

use super::{
    AuthorizeParams, CallbackParams, Provider, ProviderError, ProviderInfo, Refresh, Revoke,
    TokenSet, Unavailable, body,
    client_auth::{ClientAuth, ClientKey, TokenAuth},
    observe,
    signing::Signer,
    spec::{
        ErrorSpec, FieldPath, Part, Paths, ProviderSpec, RequestAuth, RequestMethod, RevokeMethod,
        Template, TokenMethod, TokenSpec,
    },
};
use crate::{domain::Identity, http::HttpClient, state::PendingLogin};

/// Profile strings longer than this are dropped rather than stored: no real
/// name or avatar URL is this long, and the store should not hold megabytes.
const MAX_PROFILE_FIELD: usize = 2048;
/// Longest subject accepted (OIDC allows 255 ASCII characters).
const MAX_SUBJECT: usize = 255;

pub struct SpecProvider {
    info: ProviderInfo,
    spec: ProviderSpec,
    endpoints: BTreeMap<String, Url>,
    client_id: String,
    client_secret: SecretString,
    /// Config's `token_auth`, over each token spec's own `auth`.
    token_auth: Option<TokenAuth>,
    client_key: Option<ClientKey>,
    /// Provider options switched on in config (`union_id`).
    options: BTreeSet<String>,
    http: HttpClient,
    /// The authorize URL's fixed parts for each redirect URI with the
    /// default scopes: what nearly every BeginLogin asks for.
    authorize_templates: Vec<(Arc<str>, AuthorizeTemplate)>,
    /// Signs every request and checks every answer (a spec's `[signing]`).
    signer: Option<Signer>,
}

/// An authorize URL without its per-login parameters, already encoded.
#[derive(Debug)]
struct AuthorizeTemplate {
    /// Endpoint and query up to and including `scope`.
    prefix: String,
    /// `&`-led fixed extra parameters, then `#fragment`, or empty.
    suffix: String,
}

/// Everything `SpecProvider::new` needs, so the constructor reads clearly.
pub struct SpecParts {
    pub info: ProviderInfo,
    pub spec: ProviderSpec,
    pub endpoints: BTreeMap<String, Url>,
    pub client_id: String,
    pub client_secret: SecretString,
    /// Config's `token_auth`; `None` keeps what the spec says.
    pub token_auth: Option<TokenAuth>,
    /// The key `private_key_jwt` signs with.
    pub client_key: Option<ClientKey>,
    pub options: BTreeSet<String>,
    pub http: HttpClient,
}

impl SpecProvider {
    pub fn new(parts: SpecParts) -> Self {
        let mut provider = SpecProvider {
            info: parts.info,
            spec: parts.spec,
            endpoints: parts.endpoints,
            client_id: parts.client_id,
            client_secret: parts.client_secret,
            token_auth: parts.token_auth,
            client_key: parts.client_key,
            options: parts.options,
            http: parts.http,
            authorize_templates: Vec::new(),
            signer: None,
        };
        // Without an authorize endpoint (a spec that skipped
        // Registry::build's checks) no template is kept and BeginLogin
        // reports the missing endpoint itself.
        provider.authorize_templates = provider
            .info
            .redirect_uris
            .iter()
            .filter_map(|uri| {
                let template = provider
                    .authorize_template(uri, &provider.info.scopes)
                    .ok()?;
                Some((uri.clone(), template))
            })
            .collect();
        provider
    }

    /// The same provider, signing its requests and checking its answers.
    pub fn with_signer(mut self, signer: Option<Signer>) -> Self {
        self.signer = signer;
        self
    }

    fn endpoint(&self, name: &str) -> Result<&Url, ProviderError> {
        // Registry::build checks every referenced endpoint exists; this only
        // guards against a spec edited without going through it.
        self.endpoints
            .get(name)
            .ok_or_else(|| self.bad(name, format!("endpoint {name} is not configured")))
    }

    fn bad(&self, step: &str, what: impl Into<String>) -> ProviderError {
        ProviderError::BadResponse {
            provider: self.info.name.to_string(),
            step: step.into(),
            what: what.into(),
        }
    }

    fn rejected(&self, step: &str, code: String) -> ProviderError {
        ProviderError::Rejected {
            provider: self.info.name.to_string(),
            step: step.into(),
            code,
        }
    }

    /// Sends one request and turns the answer into a JSON document, or the
    /// right error: 5xx is retryable, an error key is a rejection whatever the
    /// status, anything unparseable is a bad response. An empty body is an
    /// empty object (revocation answers 204).
    pub(crate) async fn call(
        &self,
        step: &str,
        request: reqwest::RequestBuilder,
        errors: &ErrorSpec,
    ) -> Result<Value, ProviderError> {
        observe::request(&self.info.name, step, self.answer(step, request, errors)).await
    }

    /// `call` without its span and timing.
    async fn answer(
        &self,
        step: &str,
        request: reqwest::RequestBuilder,
        errors: &ErrorSpec,
    ) -> Result<Value, ProviderError> {
        let answer = self.http.send(request).await;
        let answer = answer.map_err(|e| ProviderError::from_http(&self.info.name, step, e))?;
        let status = answer.status;
        if status.is_server_error() {
            return Err(ProviderError::Unavailable {
                provider: self.info.name.to_string(),
                step: step.into(),
                cause: Unavailable::Status(status.as_u16()),
            });
        }
        if status.is_redirection() {
            return Err(self.bad(step, format!("unexpected redirect (HTTP {status})")));
        }
        let doc = body::parse(&answer.body);
        let code = doc.as_ref().and_then(|d| error_code(d, errors));
        if status.is_success()
            && let Some(signer) = &self.signer
        {
            signer
                .check_answer(&answer.body, code.is_some())
                .map_err(|what| self.bad(step, what))?;
        }
        if let Some(code) = code {
            return Err(self.rejected(step, code));
        }
        if !status.is_success() {
            return Err(self.rejected(step, format!("http_{}", status.as_u16())));
        }
        match doc {
            Some(doc) => Ok(doc),
            None if answer.body.iter().all(u8::is_ascii_whitespace) => {
                Ok(Value::Object(Default::default()))
            }
            None => Err(self.bad(step, "answer is not JSON, JSONP or form-encoded")),
        }
    }

    /// A token-endpoint request (code exchange or refresh) as `t` describes it.
    fn token_request(
        &self,
        t: &TokenSpec,
        grant_type: &str,
        mut params: Vec<(String, String)>,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        if t.grant_type {
            params.insert(0, ("grant_type".into(), grant_type.into()));
        }
        let step = if grant_type == "refresh_token" {
            "refresh"
        } else {
            "token"
        };
        let credentials = self.client_credentials(step, t)?;
        params.extend(credentials.params);
        params.extend(t.params.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.sign(step, &mut params)?;
        let mut url = self.endpoint(&t.endpoint)?.clone();
        let request = match t.method {
            TokenMethod::PostForm => self.http.request(Method::POST, url).form(&params),
            TokenMethod::PostJson => {
                let body: serde_json::Map<String, Value> = params
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                self.http.request(Method::POST, url).json(&body)
            }
            TokenMethod::Get => {
                url.query_pairs_mut().extend_pairs(&params);
                self.http.request(Method::GET, url)
            }
        };
        let request = match credentials.authorization {
            Some(value) => request.header(header::AUTHORIZATION, value),
            None => request,
        };
        Ok(t.headers
            .iter()
            .fold(request, |r, (k, v)| r.header(k.as_str(), v.as_str())))
    }

    /// Adds the signature to a request's parameters, for a spec that signs.
    fn sign(&self, step: &str, params: &mut Vec<(String, String)>) -> Result<(), ProviderError> {
        match &self.signer {
            Some(signer) => signer.sign(params).map_err(|what| self.bad(step, what)),
            None => Ok(()),
        }
    }

    /// The client's credentials for a request described by `t` (a token
    /// spec, whose parameter names the body form uses). A spec that sends
    /// no secret on this request (WeChat's refresh) sends none whatever
    /// the method.
    fn client_credentials(
        &self,
        step: &str,
        t: &TokenSpec,
    ) -> Result<super::client_auth::Credentials, ProviderError> {
        let method = match self.token_auth.unwrap_or(t.auth) {
            _ if t.client_secret_param.is_empty() => TokenAuth::ClientSecretPost,
            m => m,
        };
        let auth = ClientAuth {
            method,
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            key: self.client_key.clone(),
        };
        let audience = self.endpoint(&self.spec.token.endpoint)?.as_str();
        auth.credentials(&t.client_id_param, &t.client_secret_param, audience)
            .map_err(|what| self.bad(step, what))
    }

    /// Reads a token answer with the `token` section's field paths.
    fn token_set(
        &self,
        step: &str,
        raw: Value,
        fallback_scopes: &[String],
    ) -> Result<TokenSet, ProviderError> {
        let t = &self.spec.token;
        let access_token = get_string(&raw, &t.access_token)
            .ok_or_else(|| self.bad(step, "no access token in the answer"))?;
        let scopes = match raw.pointer(&t.scope.0).filter(|_| !t.scope.0.is_empty()) {
            Some(v) => parse_scopes(v),
            None => fallback_scopes.to_vec(),
        };
        Ok(TokenSet {
            access_token: access_token.into(),
            refresh_token: get_string(&raw, &t.refresh_token).map(Into::into),
            token_type: get_string(&raw, &t.token_type),
            expires_in: match raw.pointer(&t.expires_in.0) {
                Some(v) if !t.expires_in.0.is_empty() => {
                    body::lifetime(v).map_err(|what| self.bad(step, what))?
                }
                _ => None,
            },
            scopes,
            raw,
        })
    }

    /// Encodes everything of the authorize URL that does not change from
    /// one login to the next. The query order is the one WeChat documents
    /// (nobody else minds it): client id, redirect URI, response type,
    /// scope, then the per-login state, PKCE challenge and nonce, then the
    /// fixed extras and the fragment.
    fn authorize_template(
        &self,
        redirect_uri: &str,
        scopes: &[String],
    ) -> Result<AuthorizeTemplate, ProviderError> {
        let a = &self.spec.authorize;
        let mut url = self.endpoint("authorize_url")?.clone();
        // The fragment has to stay last, after the per-login parameters.
        let fragment = if a.fragment.is_empty() {
            url.fragment().map(str::to_owned)
        } else {
            Some(a.fragment.trim_start_matches('#').to_owned())
        };
        url.set_fragment(None);
        let mut tail = url.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair(&a.client_id_param, &self.client_id);
            if a.redirect_uri {
                q.append_pair("redirect_uri", redirect_uri);
            }
            if !a.response_type.is_empty() {
                q.append_pair("response_type", &a.response_type);
            }
            if !scopes.is_empty() {
                q.append_pair("scope", &scopes.join(&self.spec.scope_separator));
            }
        }
        // The url crate encodes the extras and the fragment too, so the
        // result is byte for byte what building the whole URL with it gives.
        tail.set_query(None);
        tail.query_pairs_mut().extend_pairs(&a.params);
        tail.set_fragment(fragment.as_deref());
        let mut suffix = String::new();
        if let Some(q) = tail.query().filter(|q| !q.is_empty()) {
            suffix.push('&');
            suffix.push_str(q);
        }
        if let Some(f) = tail.fragment() {
            suffix.push('#');
            suffix.push_str(f);
        }
        Ok(AuthorizeTemplate {
            prefix: url.into(),
            suffix,
        })
    }

    fn authorize_url_now(
        &self,
        login: &PendingLogin,
        params: &AuthorizeParams,
    ) -> Result<String, ProviderError> {
        let built;
        let cached = self
            .authorize_templates
            .iter()
            .find(|(uri, _)| **uri == *login.redirect_uri);
        let template = match cached {
            Some((_, t)) if *login.scopes == *self.info.scopes => t,
            _ => {
                built = self.authorize_template(&login.redirect_uri, &login.scopes)?;
                &built
            }
        };
        let mut url = String::with_capacity(template.prefix.len() + template.suffix.len() + 200);
        url.push_str(&template.prefix);
        // State, PKCE challenge and nonce are base64url, which form encoding
        // leaves unchanged, so they go in as they are.
        url.push_str("&state=");
        login.state.push_to(&mut url);
        if self.info.pkce
            && let Some(pkce) = &login.pkce
        {
            url.push_str("&code_challenge=");
            pkce.push_challenge_s256(&mut url);
            url.push_str("&code_challenge_method=S256");
        }
        if self.info.nonce
            && let Some(nonce) = &login.nonce
        {
            url.push_str("&nonce=");
            nonce.push_verifier(&mut url);
        }
        // A fixed parameter from config wins over the caller's.
        let a = &self.spec.authorize;
        for (k, v) in params.pairs() {
            if a.request_params.iter().any(|p| p == k) && !a.params.contains_key(k) {
                url.push('&');
                url.push_str(k);
                url.push('=');
                url.extend(url::form_urlencoded::byte_serialize(v.as_bytes()));
            }
        }
        url.push_str(&template.suffix);
        Ok(url)
    }

    /// Makes the profile requests; returns every answer by name. `extra`
    /// adds documents the caller already has (OIDC's verified `id_token`
    /// claims).
    pub(crate) async fn fetch_docs<'a>(
        &'a self,
        tokens: &TokenSet,
        callback: &CallbackParams,
        extra: Vec<(&'a str, Value)>,
    ) -> Result<Docs<'a>, ProviderError> {
        let mut docs = Docs {
            docs: BTreeMap::from([
                ("token", tokens.raw.clone()),
                ("callback", callback_doc(callback)),
            ]),
        };
        docs.docs.extend(extra);
        for r in &self.spec.requests {
            if !r.when_scope.is_empty() && !r.when_scope.iter().any(|s| tokens.scopes.contains(s)) {
                continue;
            }
            let mut url = self.endpoint(&r.endpoint)?.clone();
            let conditional = r
                .query_when
                .iter()
                .filter(|(option, _)| self.options.contains(*option))
                .flat_map(|(_, q)| q.iter());
            let mut params = Vec::new();
            for (k, template) in r.query.iter().chain(conditional) {
                let value = docs.render(template, &self.client_id).ok_or_else(|| {
                    self.bad(&r.name, format!("no value for query parameter {k}"))
                })?;
                params.push((k.clone(), value));
            }
            self.sign(&r.name, &mut params)?;
            let token = tokens.access_token.expose_secret();
            let mut request = match r.method {
                RequestMethod::Get => {
                    url.query_pairs_mut().extend_pairs(&params);
                    self.http.request(Method::GET, url)
                }
                RequestMethod::PostForm => self.http.request(Method::POST, url).form(&params),
            };
            request = authorize(request, r.auth, token);
            for (k, template) in &r.headers {
                let value = docs
                    .render(template, &self.client_id)
                    .ok_or_else(|| self.bad(&r.name, format!("no value for header {k}")))?;
                request = request.header(k.as_str(), value);
            }
            let errors = r.errors.as_ref().unwrap_or(&self.spec.errors);
            let doc = self.call(&r.name, request, errors).await?;
            docs.docs.insert(r.name.as_str(), doc);
        }
        Ok(docs)
    }

    pub(crate) fn map_identity(&self, docs: &Docs) -> Result<Identity, ProviderError> {
        let id = &self.spec.identity;
        let subject = docs
            .first_string(&id.subject)
            .ok_or_else(|| self.bad("identity", "the answer has no user id"))?;
        if subject.len() > MAX_SUBJECT {
            return Err(self.bad("identity", "the user id is implausibly long"));
        }
        let (mut email, mut email_verified) = (None, false);
        if let Some(list) = &id.email_list
            && let Some(Value::Array(items)) = docs.docs.get(list.doc.as_str())
        {
            let chosen = items.iter().find(|item| matches_all(item, &list.require));
            if let Some(item) = chosen {
                email = get_string(item, &list.email).filter(|e| e.len() <= MAX_PROFILE_FIELD);
                email_verified = email.is_some()
                    && !list.verified_when.is_empty()
                    && matches_all(item, &list.verified_when);
            }
        }
        if email.is_none() {
            email = docs.profile_string(&id.email);
            email_verified = email.is_some() && docs.first_bool(&id.email_verified) == Some(true);
        }
        Ok(Identity {
            provider: self.info.name.to_string(),
            subject,
            union_id: docs.profile_string(&id.union_id),
            username: docs.profile_string(&id.username),
            display_name: docs.profile_string(&id.display_name),
            avatar_url: docs.profile_string(&id.avatar_url),
            email,
            email_verified,
        })
    }
}

/// The callback's parameters as a document (`callback:/user/name`): a
/// value that is a JSON object or array (Apple's first-login `user`) is
/// read as one, anything else stays a string.
fn callback_doc(callback: &CallbackParams) -> Value {
    Value::Object(
        callback
            .0
            .iter()
            .map(|(k, v)| {
                let parsed = serde_json::from_str::<Value>(v)
                    .ok()
                    .filter(|j| j.is_object() || j.is_array());
                (
                    k.clone(),
                    parsed.unwrap_or_else(|| Value::String(v.clone())),
                )
            })
            .collect(),
    )
}

fn authorize(
    request: reqwest::RequestBuilder,
    auth: RequestAuth,
    token: &str,
) -> reqwest::RequestBuilder {
    match auth {
        RequestAuth::Bearer => request.bearer_auth(token),
        RequestAuth::Token => request.header(header::AUTHORIZATION, format!("token {token}")),
        RequestAuth::None => request,
    }
}

/// The provider's error code, if the document carries one. Only a short
/// token-like code is kept: descriptions can echo the code or token back.
fn error_code(doc: &Value, errors: &ErrorSpec) -> Option<String> {
    errors.code.iter().find_map(|path| {
        let v = doc.pointer(&path.0)?;
        if v.is_null() {
            return None;
        }
        let code = body::scalar_string(v).unwrap_or(Cow::Borrowed("error"));
        if errors.ok.iter().any(|ok| *ok == code) {
            return None;
        }
        let clean: String = code
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            .take(64)
            .collect();
        Some(if clean.is_empty() {
            "error".into()
        } else {
            clean
        })
    })
}

fn get_string(doc: &Value, path: &FieldPath) -> Option<String> {
    if path.0.is_empty() {
        return None;
    }
    doc.pointer(&path.0)
        .and_then(body::scalar_string)
        .filter(|s| !s.is_empty())
        .map(Cow::into_owned)
}

/// Granted scopes arrive space- or comma-separated (GitHub: `repo,gist`), or
/// as an array (Qiita `scopes`).
fn parse_scopes(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(body::scalar_string)
            .map(Cow::into_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// The answers gathered for one login, by name (`token`, `user`, …).
pub(crate) struct Docs<'a> {
    docs: BTreeMap<&'a str, Value>,
}

impl Docs<'_> {
    pub(crate) fn get(&self, doc: &str, pointer: &str) -> Option<&Value> {
        self.lookup(doc, pointer)
    }

    fn lookup(&self, doc: &str, pointer: &str) -> Option<&Value> {
        self.docs
            .get(doc)?
            .pointer(pointer)
            .filter(|v| !v.is_null())
    }

    fn first_string(&self, paths: &Paths) -> Option<String> {
        paths.0.iter().find_map(|f| {
            self.lookup(&f.doc, &f.pointer)
                .and_then(body::scalar_string)
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
    }

    fn profile_string(&self, paths: &Paths) -> Option<String> {
        self.first_string(paths)
            .filter(|s| s.len() <= MAX_PROFILE_FIELD)
    }

    fn first_bool(&self, paths: &Paths) -> Option<bool> {
        paths
            .0
            .iter()
            .find_map(|f| self.lookup(&f.doc, &f.pointer).and_then(body::scalar_bool))
    }

    fn render(&self, template: &Template, client_id: &str) -> Option<String> {
        let mut out = String::new();
        for part in &template.0 {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::ClientId => out.push_str(client_id),
                Part::Field(f) => {
                    out.push_str(&body::scalar_string(self.lookup(&f.doc, &f.pointer)?)?)
                }
            }
        }
        Some(out)
    }
}

/// Every `pointer = value` holds: equal scalars, or an array containing it.
fn matches_all(item: &Value, want: &BTreeMap<String, toml::Value>) -> bool {
    want.iter()
        .all(|(ptr, w)| item.pointer(ptr).is_some_and(|v| toml_matches(v, w)))
}

fn toml_matches(json: &Value, want: &toml::Value) -> bool {
    if let Value::Array(items) = json {
        return items.iter().any(|i| toml_matches(i, want));
    }
    match want {
        toml::Value::Boolean(b) => json.as_bool() == Some(*b),
        toml::Value::String(s) => json.as_str() == Some(s),
        toml::Value::Integer(i) => json.as_i64() == Some(*i),
        _ => false,
    }
}

#[async_trait]
impl Provider for SpecProvider {
    fn info(&self) -> &ProviderInfo {
        &self.info
    }

    async fn authorize_url(
        &self,
        login: &PendingLogin,
        params: &AuthorizeParams,
    ) -> Result<String, ProviderError> {
        self.authorize_url_now(login, params)
    }

    async fn exchange_code(
        &self,
        code: &str,
        login: &PendingLogin,
        _callback: &CallbackParams,
    ) -> Result<TokenSet, ProviderError> {
        let t = &self.spec.token;
        let mut params = vec![(t.code_param.clone(), code.to_string())];
        if t.redirect_uri {
            params.push(("redirect_uri".into(), login.redirect_uri.to_string()));
        }
        if self.info.pkce
            && let Some(pkce) = &login.pkce
        {
            params.push(("code_verifier".into(), pkce.verifier()));
        }
        let request = self.token_request(t, "authorization_code", params)?;
        let raw = self.call("token", request, &self.spec.errors).await?;
        self.token_set("token", raw, &login.scopes)
    }

    async fn fetch_identity(
        &self,
        tokens: &TokenSet,
        _login: &PendingLogin,
        callback: &CallbackParams,
    ) -> Result<Identity, ProviderError> {
        let docs = self.fetch_docs(tokens, callback, Vec::new()).await?;
        self.map_identity(&docs)
    }

    fn refresher(&self) -> Option<&dyn Refresh> {
        self.spec.refresh.is_some().then_some(self as &dyn Refresh)
    }

    fn revoker(&self) -> Option<&dyn Revoke> {
        self.spec.revoke.is_some().then_some(self as &dyn Revoke)
    }
}

#[async_trait]
impl Refresh for SpecProvider {
    async fn refresh(
        &self,
        refresh_token: &SecretString,
        scopes: &[String],
    ) -> Result<TokenSet, ProviderError> {
        let Some(r) = &self.spec.refresh else {
            return Err(self.bad("refresh", "this provider has no refresh grant"));
        };
        let params = vec![(
            r.refresh_token_param.clone(),
            refresh_token.expose_secret().to_string(),
        )];
        let request = self.token_request(r, "refresh_token", params)?;
        let raw = self.call("refresh", request, &self.spec.errors).await?;
        self.token_set("refresh", raw, scopes)
    }
}

#[async_trait]
impl Revoke for SpecProvider {
    async fn revoke(&self, access_token: &SecretString) -> Result<bool, ProviderError> {
        let Some(r) = &self.spec.revoke else {
            return Err(self.bad("revoke", "this provider cannot revoke tokens"));
        };
        let token = access_token.expose_secret();
        let mut url = self.endpoint(&r.endpoint)?.clone();
        if r.token_in_path {
            url.path_segments_mut()
                .map_err(|_| self.bad("revoke", "revoke_url cannot take a path segment"))?
                .pop_if_empty()
                .push(token);
        }
        let docs = Docs {
            docs: BTreeMap::from([("token", serde_json::json!({ "access_token": token }))]),
        };
        let mut params = Vec::new();
        for (k, template) in &r.params {
            let value = docs
                .render(template, &self.client_id)
                .ok_or_else(|| self.bad("revoke", format!("no value for parameter {k}")))?;
            params.push((k.clone(), value));
        }
        let request = match r.method {
            RevokeMethod::Delete => {
                url.query_pairs_mut().extend_pairs(&params);
                self.http.request(Method::DELETE, url)
            }
            RevokeMethod::Get => {
                url.query_pairs_mut().extend_pairs(&params);
                self.http.request(Method::GET, url)
            }
            RevokeMethod::PostForm => {
                let mut request = self.http.request(Method::POST, url);
                if r.client_auth {
                    // RFC 7009 §2.1: authenticated as the token request is.
                    let credentials = self.client_credentials("revoke", &self.spec.token)?;
                    params.extend(credentials.params);
                    if let Some(value) = credentials.authorization {
                        request = request.header(header::AUTHORIZATION, value);
                    }
                }
                request.form(&params)
            }
        };
        let request = authorize(request, r.auth, token);
        self.call("revoke", request, &self.spec.errors)
            .await
            .map(|_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_codes_are_found_and_sanitised() {
        let errors = ErrorSpec {
            code: vec![FieldPath("/error".into()), FieldPath("/ret".into())],
            ok: vec!["0".into()],
        };
        assert_eq!(
            error_code(&json!({"error":"bad_verification_code"}), &errors),
            Some("bad_verification_code".into())
        );
        assert_eq!(error_code(&json!({"ret":0,"nickname":"x"}), &errors), None);
        assert_eq!(error_code(&json!({"ret":-1}), &errors), Some("-1".into()));
        assert_eq!(
            error_code(&json!({"error":"invalid code: abc<script> 123"}), &errors),
            Some("invalidcodeabcscript123".into())
        );
        assert_eq!(error_code(&json!({"error":null,"a":1}), &errors), None);
        assert_eq!(error_code(&json!({"access_token":"x"}), &errors), None);
    }

    /// The authorize URL as it was built before templates: all of it
    /// through the url crate. The templated one must match it exactly.
    fn url_crate_authorize_url(p: &SpecProvider, login: &PendingLogin) -> String {
        let a = &p.spec.authorize;
        let mut url = p.endpoint("authorize_url").unwrap().clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair(&a.client_id_param, &p.client_id);
            if a.redirect_uri {
                q.append_pair("redirect_uri", &login.redirect_uri);
            }
            if !a.response_type.is_empty() {
                q.append_pair("response_type", &a.response_type);
            }
            if !login.scopes.is_empty() {
                q.append_pair("scope", &login.scopes.join(&p.spec.scope_separator));
            }
            q.append_pair("state", &login.state.as_str());
            if p.info.pkce
                && let Some(pkce) = &login.pkce
            {
                q.append_pair("code_challenge", &pkce.challenge_s256());
                q.append_pair("code_challenge_method", "S256");
            }
            if p.info.nonce
                && let Some(nonce) = &login.nonce
            {
                q.append_pair("nonce", &nonce.verifier());
            }
            for (k, v) in &a.params {
                q.append_pair(k, v);
            }
        }
        if !a.fragment.is_empty() {
            url.set_fragment(Some(a.fragment.trim_start_matches('#')));
        }
        url.into()
    }

    fn provider(spec: ProviderSpec, endpoint: Option<&str>, nonce: bool) -> SpecProvider {
        let mut endpoints: BTreeMap<String, Url> = spec
            .endpoints
            .iter()
            .map(|(k, v)| (k.clone(), Url::parse(v).unwrap()))
            .collect();
        if let Some(e) = endpoint {
            endpoints.insert("authorize_url".into(), Url::parse(e).unwrap());
        }
        let info = ProviderInfo {
            name: Arc::from("p"),
            kind: "test".into(),
            display_name: "P".into(),
            redirect_uris: vec![
                Arc::from("https://app.example/cb"),
                Arc::from("https://app.example/login/done?next=/a b&x=é"),
            ],
            scopes: Arc::from(spec.default_scopes.clone()),
            allowed_scopes: vec!["extra:scope".into()],
            pkce: spec.pkce,
            nonce,
            denied: Vec::new(),
            refresh_token_single_use: false,
        };
        SpecProvider::new(SpecParts {
            info,
            spec,
            endpoints,
            client_id: "client id/+&=".into(),
            client_secret: SecretString::from("s"),
            token_auth: None,
            client_key: None,
            options: BTreeSet::new(),
            http: HttpClient::new(&crate::config::HttpSettings::default()).unwrap(),
        })
    }

    #[test]
    fn templated_authorize_urls_match_the_url_crate() {
        let mut specs: Vec<(String, SpecProvider)> = crate::provider::presets::PRESETS
            .iter()
            .map(|(name, _)| {
                let spec = crate::provider::presets::preset(name).unwrap().unwrap();
                (name.to_string(), provider(spec, None, false))
            })
            .collect();
        // Everything a config-defined provider may add: fixed extras that
        // need escaping, a fragment, an endpoint with its own query and
        // fragment, an OIDC nonce.
        let mut custom = crate::provider::presets::preset("github").unwrap().unwrap();
        custom
            .authorize
            .params
            .insert("prompt".into(), "select account & more".into());
        custom.authorize.params.insert("a/b".into(), "ü".into());
        custom.authorize.fragment = "#frag ment".into();
        custom.scope_separator = " ".into();
        specs.push((
            "custom".into(),
            provider(
                custom.clone(),
                Some("https://idp.example/auth?tenant=x y"),
                true,
            ),
        ));
        custom.authorize.fragment = String::new();
        specs.push((
            "endpoint fragment".into(),
            provider(custom, Some("https://idp.example/auth?t=1#keep"), false),
        ));
        let mut checked = 0;
        for (name, p) in &specs {
            let (state, pkce, nonce) = crate::state::login_secrets().unwrap();
            let extra: Arc<[String]> = p
                .info
                .scopes
                .iter()
                .cloned()
                .chain(["extra:scope".to_string()])
                .collect();
            for uri in &p.info.redirect_uris {
                for scopes in [p.info.scopes.clone(), extra.clone()] {
                    let login = PendingLogin {
                        state,
                        provider: p.info.name.clone(),
                        redirect_uri: uri.clone(),
                        scopes,
                        return_to: None,
                        pkce: Some(pkce),
                        nonce: Some(nonce),
                        created_at: time::OffsetDateTime::now_utc(),
                        expires_at: time::OffsetDateTime::now_utc(),
                    };
                    assert_eq!(
                        p.authorize_url_now(&login, &AuthorizeParams::default())
                            .unwrap(),
                        url_crate_authorize_url(p, &login),
                        "{name}, {uri}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, specs.len() * 4);
        assert!(specs.iter().all(|(_, p)| p.authorize_templates.len() == 2));
    }

    #[test]
    fn scopes_in_every_shape() {
        assert_eq!(
            parse_scopes(&json!("read:user,user:email")),
            ["read:user", "user:email"]
        );
        assert_eq!(parse_scopes(&json!("openid email")), ["openid", "email"]);
        assert_eq!(parse_scopes(&json!(["read_qiita"])), ["read_qiita"]);
    }
}
