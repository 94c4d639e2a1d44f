//! The provider spec: everything that differs between OAuth2 providers and can
//! be said as data — URLs, parameter names, how the token request is sent,
//! where the token, the errors and the user id are in the answers. Built-in
//! presets are TOML files under `providers/` in this very schema (see
//! `presets`).

use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Deserializer};

pub use super::client_auth::TokenAuth;
use super::signing::SigningSpec;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    pub display_name: String,
    /// Send a PKCE S256 challenge and verifier.
    #[serde(default)]
    pub pkce: bool,
    #[serde(default = "space")]
    pub scope_separator: String,
    #[serde(default)]
    pub default_scopes: Vec<String>,
    /// Named URLs; `authorize_url` and `token_url` are required, requests
    /// refer to the others by name. Each is overridable in config.
    pub endpoints: BTreeMap<String, String>,
    #[serde(default)]
    pub authorize: AuthorizeSpec,
    #[serde(default)]
    pub token: TokenSpec,
    /// How an error is recognised in any answer (token or profile).
    #[serde(default)]
    pub errors: ErrorSpec,
    /// Calls made after the token exchange, in order; their answers are
    /// documents the identity mapping and later templates can read.
    #[serde(default)]
    pub requests: Vec<RequestSpec>,
    pub identity: IdentitySpec,
    /// The refresh-token grant; absent means the provider has none. Same
    /// schema as `token`; the answer is read with `token`'s field paths.
    #[serde(default)]
    pub refresh: Option<TokenSpec>,
    /// Refresh tokens work once; the answer carries the next one (QQ).
    #[serde(default)]
    pub refresh_token_single_use: bool,
    #[serde(default)]
    pub revoke: Option<RevokeSpec>,
    /// Every request signed and every answer checked, instead of a client
    /// secret (Alipay's gateway); see `signing`.
    #[serde(default)]
    pub signing: Option<SigningSpec>,
    /// Settings the preset takes from `[providers.NAME.options]`, each with
    /// its default (`identity.subject_by_option`).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn space() -> String {
    " ".into()
}

fn code() -> String {
    "code".into()
}

fn client_id() -> String {
    "client_id".into()
}

fn client_secret() -> String {
    "client_secret".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthorizeSpec {
    pub client_id_param: String,
    /// `""` omits the parameter.
    pub response_type: String,
    /// Whether the redirect URI is sent (Qiita uses the registered one).
    pub redirect_uri: bool,
    /// Extra fixed parameters.
    pub params: BTreeMap<String, String>,
    /// Appended verbatim, e.g. WeChat's `#wechat_redirect`.
    pub fragment: String,
    /// `error` values on the callback that mean "the user said no".
    pub denied: Vec<String>,
    /// Which of BeginLogin's optional `prompt`, `login_hint` and `max_age`
    /// this provider takes (by those names); the others are left out.
    pub request_params: Vec<String>,
}

impl Default for AuthorizeSpec {
    fn default() -> Self {
        AuthorizeSpec {
            client_id_param: client_id(),
            response_type: code(),
            redirect_uri: true,
            params: BTreeMap::new(),
            fragment: String::new(),
            denied: vec!["access_denied".into()],
            request_params: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenMethod {
    /// POST, `application/x-www-form-urlencoded` body.
    PostForm,
    /// POST, JSON body.
    PostJson,
    /// GET, parameters in the query.
    Get,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSpec {
    /// Name of the endpoint to call.
    pub endpoint: String,
    pub method: TokenMethod,
    /// `""` leaves the client id out (Gitee's refresh).
    pub client_id_param: String,
    /// `""` leaves the secret out (WeChat's and AcWing's refresh).
    pub client_secret_param: String,
    /// Name of the parameter carrying the code (code exchange).
    pub code_param: String,
    /// Name of the parameter carrying the refresh token (refresh).
    pub refresh_token_param: String,
    /// Send `grant_type=authorization_code`.
    pub grant_type: bool,
    /// How the client authenticates: the id and secret in the body under
    /// the two names above (`client_secret_post`, the default and what
    /// every OAuth2 preset documents), in a Basic header, or a signed
    /// assertion. Config's `token_auth` overrides it.
    pub auth: TokenAuth,
    pub redirect_uri: bool,
    pub params: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
    pub access_token: FieldPath,
    pub refresh_token: FieldPath,
    pub expires_in: FieldPath,
    pub scope: FieldPath,
    pub token_type: FieldPath,
}

impl Default for TokenSpec {
    fn default() -> Self {
        TokenSpec {
            endpoint: "token_url".into(),
            method: TokenMethod::PostForm,
            client_id_param: client_id(),
            client_secret_param: client_secret(),
            code_param: code(),
            refresh_token_param: "refresh_token".into(),
            grant_type: true,
            auth: TokenAuth::ClientSecretPost,
            redirect_uri: true,
            params: BTreeMap::new(),
            headers: BTreeMap::new(),
            access_token: FieldPath::new("/access_token"),
            refresh_token: FieldPath::new("/refresh_token"),
            expires_in: FieldPath::new("/expires_in"),
            scope: FieldPath::new("/scope"),
            token_type: FieldPath::new("/token_type"),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorSpec {
    /// Fields holding an error code; present (and not in `ok`) means error,
    /// whatever the HTTP status says.
    pub code: Vec<FieldPath>,
    /// Code values that mean success (`ret: 0`, `errcode: 0`).
    pub ok: Vec<String>,
}

impl Default for ErrorSpec {
    fn default() -> Self {
        ErrorSpec {
            code: vec![FieldPath::new("/error")],
            ok: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RequestAuth {
    /// `Authorization: Bearer TOKEN`.
    #[default]
    Bearer,
    /// `Authorization: token TOKEN` (GitHub's legacy form).
    Token,
    /// The token goes in `query` via a template, or not at all.
    None,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    /// The document name the answer is stored under.
    pub name: String,
    /// Name of the endpoint to call.
    pub endpoint: String,
    /// GET with `query` in the URL, or POST with it as a form body.
    #[serde(default)]
    pub method: RequestMethod,
    #[serde(default)]
    pub auth: RequestAuth,
    /// Query parameters; values are templates (`{token:/access_token}`,
    /// `{client_id}`, `{me:/openid}`).
    #[serde(default)]
    pub query: BTreeMap<String, Template>,
    /// Extra query parameters sent only when a provider option is on in
    /// config, e.g. QQ's `unionid = "1"` under `union_id`.
    #[serde(default)]
    pub query_when: BTreeMap<String, BTreeMap<String, Template>>,
    /// Header values are templates too, so a token can travel in a header
    /// of the provider's own name (DingTalk's `x-acs-dingtalk-access-token`).
    #[serde(default)]
    pub headers: BTreeMap<String, Template>,
    /// Only made when the granted scopes include one of these.
    #[serde(default)]
    pub when_scope: Vec<String>,
    /// Error recognition for this answer, instead of the provider-wide one.
    #[serde(default)]
    pub errors: Option<ErrorSpec>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RequestMethod {
    #[default]
    Get,
    PostForm,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySpec {
    /// The stable user id. First present value wins, for every field.
    pub subject: Paths,
    /// Where the subject is read instead, by the value of the option
    /// `subject` (Alipay's `user_id` or `open_id`).
    #[serde(default)]
    pub subject_by_option: BTreeMap<String, Paths>,
    #[serde(default)]
    pub union_id: Paths,
    #[serde(default)]
    pub username: Paths,
    #[serde(default)]
    pub display_name: Paths,
    #[serde(default)]
    pub avatar_url: Paths,
    #[serde(default)]
    pub email: Paths,
    /// Where the provider says the email is verified; absent means unverified.
    #[serde(default)]
    pub email_verified: Paths,
    /// Pick the email from a list (GitHub `/user/emails`); wins over `email`.
    #[serde(default)]
    pub email_list: Option<EmailListSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailListSpec {
    /// Document holding a JSON array of email objects.
    pub doc: String,
    #[serde(default = "email_field")]
    pub email: FieldPath,
    /// Fields an entry must match to be chosen: equal to a scalar, or an
    /// array containing it (Gitee's `"scope":["primary"]`).
    #[serde(default)]
    pub require: BTreeMap<String, toml::Value>,
    /// Fields that must match for the chosen email to count as verified;
    /// empty means never verified.
    #[serde(default)]
    pub verified_when: BTreeMap<String, toml::Value>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RevokeMethod {
    Delete,
    PostForm,
    Get,
}

/// How to revoke an access token at the provider.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeSpec {
    pub endpoint: String,
    pub method: RevokeMethod,
    /// Append the access token as the last path segment (Qiita's
    /// `DELETE /api/v2/access_tokens/:token`).
    #[serde(default)]
    pub token_in_path: bool,
    /// Parameters; templates may use `{token:/access_token}`.
    #[serde(default)]
    pub params: BTreeMap<String, Template>,
    #[serde(default = "no_auth")]
    pub auth: RequestAuth,
    /// Authenticate as the client, the same way as the token request
    /// (RFC 7009 §2.1); only with `method = "post_form"`.
    #[serde(default)]
    pub client_auth: bool,
}

fn no_auth() -> RequestAuth {
    RequestAuth::None
}

/// Provider options a spec may depend on (`query_when`).
pub const OPTIONS: &[&str] = &["union_id"];

fn email_field() -> FieldPath {
    FieldPath::new("/email")
}

/// A JSON pointer into one answer (`/user/id`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPath(pub String);

impl FieldPath {
    fn new(s: &str) -> Self {
        FieldPath(s.into())
    }
}

impl<'de> Deserialize<'de> for FieldPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.is_empty() && !s.starts_with('/') {
            return Err(serde::de::Error::custom(format!(
                "{s:?} is not a JSON pointer (must start with '/')"
            )));
        }
        Ok(FieldPath(s))
    }
}

/// `doc:/pointer` — a field of a named answer (`token`, or a request's name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldRef {
    pub doc: String,
    pub pointer: String,
}

impl FromStr for FieldRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (doc, pointer) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} must look like doc:/pointer, e.g. user:/id"))?;
        if doc.is_empty() || !pointer.starts_with('/') {
            return Err(format!("{s:?} must look like doc:/pointer, e.g. user:/id"));
        }
        Ok(FieldRef {
            doc: doc.into(),
            pointer: pointer.into(),
        })
    }
}

impl fmt::Display for FieldRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.doc, self.pointer)
    }
}

/// One field reference or a list of fallbacks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Paths(pub Vec<FieldRef>);

impl<'de> Deserialize<'de> for Paths {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let items = match OneOrMany::deserialize(d)? {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        items
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<_>, _>>()
            .map(Paths)
            .map_err(serde::de::Error::custom)
    }
}

/// A string with `{…}` placeholders: `{client_id}` or a `doc:/pointer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template(pub Vec<Part>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Literal(String),
    ClientId,
    Field(FieldRef),
}

impl FromStr for Template {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].into()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("template {s:?} has an unclosed '{{'"))?;
            let inner = &rest[open + 1..open + close];
            parts.push(if inner == "client_id" {
                Part::ClientId
            } else {
                Part::Field(inner.parse()?)
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.into()));
        }
        Ok(Template(parts))
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Template {
    fn fields(&self) -> impl Iterator<Item = &FieldRef> {
        self.0.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f),
            _ => None,
        })
    }
}

impl ProviderSpec {
    pub fn parse(text: &str) -> Result<ProviderSpec, String> {
        let spec: ProviderSpec = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let problems = spec.check();
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(problems.join("; "))
        }
    }

    /// Internal consistency: required endpoints exist, every field reference
    /// names a document that exists by then.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for required in ["authorize_url", "token_url"] {
            if !self.endpoints.contains_key(required) {
                problems.push(format!("endpoints.{required} is missing"));
            }
        }
        for (what, endpoint) in [
            Some(("token", &self.token.endpoint)),
            self.refresh.as_ref().map(|r| ("refresh", &r.endpoint)),
            self.revoke.as_ref().map(|r| ("revoke", &r.endpoint)),
        ]
        .into_iter()
        .flatten()
        {
            if !self.endpoints.contains_key(endpoint) {
                problems.push(format!("{what}.endpoint: {endpoint:?} is not in endpoints"));
            }
        }
        for name in &self.authorize.request_params {
            if !super::AuthorizeParams::NAMES.contains(&name.as_str()) {
                problems.push(format!(
                    "authorize.request_params: unknown parameter {name:?} (known: {})",
                    super::AuthorizeParams::NAMES.join(", ")
                ));
            }
        }
        if let Some(r) = &self.revoke
            && r.client_auth
            && r.method != RevokeMethod::PostForm
        {
            problems.push("revoke.client_auth: only with method = \"post_form\"".into());
        }
        if self.token.access_token.0.is_empty() {
            problems.push("token.access_token: a field path is required".into());
        }
        // `callback`: the callback's other parameters (Apple's `user`).
        let mut docs = vec!["token".to_string(), "callback".to_string()];
        for r in &self.requests {
            for option in r.query_when.keys() {
                if !OPTIONS.contains(&option.as_str()) {
                    problems.push(format!(
                        "requests.{}.query_when: unknown option {option:?} (known: {})",
                        r.name,
                        OPTIONS.join(", ")
                    ));
                }
            }
            if !self.endpoints.contains_key(&r.endpoint) {
                problems.push(format!(
                    "requests.{}: endpoint {:?} is not in endpoints",
                    r.name, r.endpoint
                ));
            }
            for f in r
                .query
                .values()
                .chain(r.query_when.values().flat_map(|q| q.values()))
                .chain(r.headers.values())
                .flat_map(Template::fields)
            {
                if !docs.contains(&f.doc) {
                    problems.push(format!(
                        "requests.{}: {f} refers to a document not fetched before it",
                        r.name
                    ));
                }
            }
            if docs.contains(&r.name) {
                problems.push(format!("requests.{}: name used twice", r.name));
            }
            docs.push(r.name.clone());
        }
        if let Some(signing) = &self.signing {
            problems.extend(signing.check());
        }
        let id = &self.identity;
        if !id.subject_by_option.is_empty() {
            match self.options.get("subject") {
                None => problems.push(
                    "identity.subject_by_option: declare the option in [options] subject".into(),
                ),
                Some(default) if !id.subject_by_option.contains_key(default) => {
                    problems.push(format!(
                        "options.subject: default {default:?} is not in identity.subject_by_option"
                    ))
                }
                Some(_) => {}
            }
        }
        if id.subject.0.is_empty() {
            problems.push("identity.subject: at least one field is required".into());
        }
        for (field, paths) in [
            ("subject", &id.subject),
            ("union_id", &id.union_id),
            ("username", &id.username),
            ("display_name", &id.display_name),
            ("avatar_url", &id.avatar_url),
            ("email", &id.email),
            ("email_verified", &id.email_verified),
        ]
        .into_iter()
        .chain(
            id.subject_by_option
                .values()
                .map(|p| ("subject_by_option", p)),
        ) {
            for f in &paths.0 {
                if !docs.contains(&f.doc) {
                    problems.push(format!(
                        "identity.{field}: {f} refers to an unknown document (known: {})",
                        docs.join(", ")
                    ));
                }
            }
        }
        if let Some(list) = &id.email_list
            && !docs.contains(&list.doc)
        {
            problems.push(format!(
                "identity.email_list.doc: unknown document {:?}",
                list.doc
            ));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse() {
        let t: Template = "{token:/access_token}".parse().unwrap();
        assert_eq!(
            t.0,
            vec![Part::Field(FieldRef {
                doc: "token".into(),
                pointer: "/access_token".into()
            })]
        );
        let t: Template = "a{client_id}b".parse().unwrap();
        assert_eq!(
            t.0,
            vec![
                Part::Literal("a".into()),
                Part::ClientId,
                Part::Literal("b".into())
            ]
        );
        assert!("{oops".parse::<Template>().is_err());
        assert!("{nocolon}".parse::<Template>().is_err());
    }

    #[test]
    fn check_finds_dangling_references() {
        let spec: ProviderSpec = toml::from_str(
            r#"
            display_name = "X"
            [endpoints]
            authorize_url = "https://x/a"
            [[requests]]
            name = "user"
            endpoint = "userinfo_url"
            query = { openid = "{me:/openid}" }
            [identity]
            subject = "profile:/id"
            "#,
        )
        .unwrap();
        let problems = spec.check();
        assert!(problems.iter().any(|p| p.contains("token_url")));
        assert!(problems.iter().any(|p| p.contains("userinfo_url")));
        assert!(problems.iter().any(|p| p.contains("me:/openid")));
        assert!(problems.iter().any(|p| p.contains("profile:/id")));
    }

    /// A token may travel in a header of the provider's own name; the
    /// header's template is checked like a query's.
    #[test]
    fn header_values_are_templates() {
        let spec = |header: &str| {
            ProviderSpec::parse(&format!(
                r#"
                display_name = "X"
                [endpoints]
                authorize_url = "https://x/a"
                token_url = "https://x/t"
                me_url = "https://x/me"
                [[requests]]
                name = "me"
                endpoint = "me_url"
                auth = "none"
                headers = {{ x-token = "{header}", Accept = "application/json" }}
                [identity]
                subject = "me:/id"
                "#
            ))
        };
        let parsed = spec("{token:/accessToken}").unwrap();
        assert_eq!(
            parsed.requests[0].headers["x-token"].0,
            vec![Part::Field(FieldRef {
                doc: "token".into(),
                pointer: "/accessToken".into()
            })]
        );
        assert_eq!(
            parsed.requests[0].headers["Accept"].0,
            vec![Part::Literal("application/json".into())]
        );
        let err = spec("{later:/accessToken}").unwrap_err();
        assert!(err.contains("later:/accessToken"), "{err}");
    }
}
