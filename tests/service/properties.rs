//! Property-based tests (proptest) of everything that reads what others
//! send: the provider body parsers, `return_to`, the field checks of
//! BeginLogin, CompleteLogin and LinkIdentity, and the ID-token checks. The
//! invariant is the same everywhere: no panic, and every refusal is one of
//! the documented reasons (`Reason`, which the README's error table lists),
//! carried in an `ErrorInfo` with its code.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use crate::support::emulators::{Emulator, google::GoogleEmulator};
use authbroker::{
    app::Application,
    config::Mode,
    grpc::{
        pb,
        status::{code, login_error},
    },
    login::{
        BeginLogin, CompleteLogin, LinkIdentity, LoginError, LoginService, check_return_to,
        provider_reason,
    },
    provider::{ProviderError, body},
    reason::Reason,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use proptest::{collection::vec, prelude::*};
use serde_json::Value;
use tonic_types::StatusExt;
use url::Url;

/// A refusal as the caller sees it: a documented reason, its code, and the
/// field at fault when there is one.
fn assert_documented(e: LoginError) -> Result<(), TestCaseError> {
    let reason = e.reason();
    let field = e.field();
    let status = login_error(e);
    prop_assert_eq!(status.code(), code(reason));
    let info = status.get_details_error_info();
    prop_assert_eq!(info.map(|i| i.reason), Some(reason.to_string()));
    if let Some(field) = field {
        let violations = status.get_details_bad_request();
        prop_assert_eq!(
            violations.map(|b| b.field_violations[0].field.clone()),
            Some(field.to_string())
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Provider bodies

/// Text shaped like what providers send: JSON, JSONP, forms, and near misses.
fn provider_shaped() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("(".to_string()),
        Just(");".to_string()),
        Just("callback".to_string()),
        Just("\"access_token\"".to_string()),
        Just(":".to_string()),
        Just(",".to_string()),
        Just("=".to_string()),
        Just("&".to_string()),
        Just("%".to_string()),
        Just("%2".to_string()),
        Just("<html>".to_string()),
        Just(" ".to_string()),
        Just("\n".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("-1".to_string()),
        Just("1e400".to_string()),
        Just("null".to_string()),
        Just("\"\\ud800\"".to_string()),
        "[a-z_]{1,6}",
        "[0-9]{1,20}",
    ];
    vec(piece, 0..24).prop_map(|p| p.concat())
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,24}".prop_map(Value::from),
        "[0-9]{1,25}".prop_map(Value::from),
        prop_oneof![Just("true"), Just("FALSE"), Just(" 7200 ")].prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn body_parse_takes_any_bytes(bytes in vec(any::<u8>(), 0..600)) {
        if let Some(v) = body::parse(&bytes) {
            prop_assert!(v.is_object() || v.is_array());
        }
    }

    #[test]
    fn body_parse_takes_provider_shaped_text(text in provider_shaped()) {
        if let Some(v) = body::parse(text.as_bytes()) {
            prop_assert!(v.is_object() || v.is_array());
        }
    }

    /// What the engine reads out of a parsed answer. A lifetime it refuses
    /// becomes PROVIDER_BAD_RESPONSE, which is documented.
    #[test]
    fn scalars_take_any_json(v in json()) {
        let _ = body::scalar_string(&v);
        let _ = body::scalar_u64(&v);
        let _ = body::scalar_bool(&v);
        match body::lifetime(&v) {
            Ok(Some(d)) => prop_assert!(d.as_secs() <= body::MAX_LIFETIME_SECS),
            Ok(None) => {}
            Err(what) => {
                let e = ProviderError::BadResponse {
                    provider: "p".into(),
                    step: "token".into(),
                    what: what.into(),
                };
                prop_assert_eq!(provider_reason(&e), Reason::ProviderBadResponse);
                assert_documented(LoginError::Provider(e))?;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// return_to

fn return_to() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/"),
        Just("//"),
        Just("."),
        Just(".."),
        Just("%2e"),
        Just("%2E"),
        Just("%2f"),
        Just("%5C"),
        Just("%25"),
        Just("%"),
        Just("\\"),
        Just("?"),
        Just("#"),
        Just(";"),
        Just(":"),
        Just("@"),
        Just(" "),
        Just("\t"),
        Just("\u{0}"),
        Just("evil.example"),
        Just("app.example.com"),
        Just("https:"),
        Just("https://"),
        Just("http://"),
        Just("javascript:"),
        Just("a"),
        Just("é"),
    ];
    prop_oneof![
        vec(piece, 0..12).prop_map(|p| p.concat()),
        ".{0,40}",
        "/[a-z./%25?#;]{0,30}",
    ]
}

fn origins() -> Vec<url::Origin> {
    vec![Url::parse("https://app.example.com").unwrap().origin()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Accepted values are their own normal form: resolved against any page
    /// of an allowed origin they stay on an allowed origin, lose no path
    /// segment to dot-segment removal, and never become `//host`.
    #[test]
    fn return_to_accepts_only_its_own_normal_form(s in return_to()) {
        let origins = origins();
        match check_return_to(&s, &origins) {
            Err(e) => {
                prop_assert_eq!(e.reason(), Reason::ReturnToNotAllowed);
                assert_documented(e)?;
            }
            Ok(None) => prop_assert!(s.is_empty()),
            Ok(Some(v)) => {
                prop_assert_eq!(&v, &s);
                let page = Url::parse("https://app.example.com/some/page").unwrap();
                let resolved = page.join(&v).unwrap();
                prop_assert!(origins.contains(&resolved.origin()), "{v:?} -> {resolved}");
                prop_assert!(!resolved.path().starts_with("//"), "{v:?} -> {resolved}");
                let path = if v.starts_with('/') {
                    v.split(['?', '#']).next().unwrap().to_string()
                } else {
                    Url::parse(&v).unwrap().path().to_string()
                };
                prop_assert_eq!(
                    resolved.path().split('/').count(),
                    path.split('/').count(),
                    "{:?} lost a segment: {}", v, resolved
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Request validation, through the real LoginService

struct Rig {
    runtime: tokio::runtime::Runtime,
    login: Arc<LoginService>,
    _app: Application,
    _dir: tempfile::TempDir,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::support::base_settings();
        settings.database.url = format!("sqlite://{}", dir.path().join("p.db").display());
        settings
            .providers
            .get_mut("sandbox")
            .unwrap()
            .allowed_scopes = vec!["extra".into()];
        let app = runtime
            .block_on(Application::build(settings, Mode::Serve))
            .unwrap();
        Rig {
            login: app.login_service(),
            runtime,
            _app: app,
            _dir: dir,
        }
    })
}

/// Field values that exercise every check: empty, known, unknown, too
/// long, control characters, and what a browser might send.
fn field(known: &'static [&'static str]) -> impl Strategy<Value = String> {
    let known = if known.is_empty() { &[""][..] } else { known };
    prop_oneof![
        Just(String::new()),
        proptest::sample::select(known).prop_map(str::to_string),
        ".{0,12}",
        "[a-zA-Z0-9_-]{43}",
        "x{2040,2060}",
        Just("\u{0}".to_string()),
    ]
}

fn begin_request() -> impl Strategy<Value = BeginLogin> {
    (
        field(&["sandbox", "github", "SANDBOX"]),
        field(&[
            crate::support::REDIRECT,
            "https://app.example.com/other",
            "https://evil.example/cb",
        ]),
        vec(field(&["extra", "read", "openid"]), 0..40),
        prop_oneof![return_to(), field(&["/orders?id=3"])],
    )
        .prop_map(|(provider, redirect_uri, scopes, return_to)| BeginLogin {
            provider,
            redirect_uri,
            scopes,
            return_to,
            ..Default::default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn begin_login_refuses_only_with_documented_reasons(req in begin_request()) {
        let rig = rig();
        match rig.runtime.block_on(rig.login.begin(req, None)) {
            Ok(begun) => prop_assert!(!begun.authorize_url.is_empty()),
            Err(e) => assert_documented(e)?,
        }
    }

    /// With a live state or any other, and any code, error or description.
    #[test]
    fn complete_login_refuses_only_with_documented_reasons(
        live in any::<bool>(),
        state in field(&[]),
        code in field(&["code"]),
        error in field(&["access_denied", "server_error"]),
        error_description in field(&["The user denied"]),
    ) {
        let rig = rig();
        let state = if live {
            let begun = rig.runtime.block_on(rig.login.begin(
                BeginLogin { provider: "sandbox".into(), ..Default::default() },
                None,
            ));
            begun.unwrap().state.as_str()
        } else {
            state
        };
        let req = CompleteLogin { state, code, error, error_description, ..Default::default() };
        if let Err(e) = rig.runtime.block_on(rig.login.complete(req, None)) {
            assert_documented(e)?;
        }
    }

    #[test]
    fn link_identity_refuses_only_with_documented_reasons(
        link_ticket in field(&[]),
        user_id in field(&["app-user-1", " padded "]),
    ) {
        let rig = rig();
        let req = LinkIdentity { link_ticket, user_id };
        if let Err(e) = rig.runtime.block_on(rig.login.link(req, None)) {
            assert_documented(e)?;
        }
    }
}

// ---------------------------------------------------------------------------
// ID tokens, through a real login against the Google emulator

struct OidcRig {
    runtime: tokio::runtime::Runtime,
    app: crate::support::TestApp,
    emu: Arc<GoogleEmulator>,
}

fn oidc_rig() -> &'static OidcRig {
    static RIG: OnceLock<OidcRig> = OnceLock::new();
    RIG.get_or_init(|| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (app, emu) = runtime.block_on(async {
            let emu = Arc::new(GoogleEmulator::start().await);
            let config = emu.provider_config();
            let app = crate::support::spawn_app_on(crate::support::Backend::Sqlite, |s| {
                s.providers.insert("google".into(), config);
            })
            .await;
            (app, emu)
        });
        OidcRig { runtime, app, emu }
    })
}

/// Ways to spoil a compact JWS `header.claims.signature`.
#[derive(Clone, Debug)]
enum Spoil {
    /// Replace the character at (index mod length).
    Char(usize, char),
    Truncate(usize),
    DropPart(usize),
    SwapParts(usize, usize),
    /// Replace one part with base64url of these bytes.
    Part(usize, Vec<u8>),
    /// A header with this `alg` (and the original kid).
    Alg(&'static str),
    /// These claims, base64url-encoded, under the original signature.
    Claims(Value),
    Append(String),
    Whole(String),
}

fn spoil() -> impl Strategy<Value = Spoil> {
    prop_oneof![
        (any::<usize>(), any::<char>()).prop_map(|(i, c)| Spoil::Char(i, c)),
        any::<usize>().prop_map(Spoil::Truncate),
        (0..3usize).prop_map(Spoil::DropPart),
        (0..3usize, 0..3usize).prop_map(|(a, b)| Spoil::SwapParts(a, b)),
        (0..3usize, vec(any::<u8>(), 0..80)).prop_map(|(i, b)| Spoil::Part(i, b)),
        proptest::sample::select(&["none", "HS256", "RS256", "ES256", "EdDSA", "RS512", ""][..])
            .prop_map(Spoil::Alg),
        json().prop_map(Spoil::Claims),
        "[.=a-zA-Z0-9_-]{0,8}".prop_map(Spoil::Append),
        ".{0,40}".prop_map(Spoil::Whole),
    ]
}

fn apply(token: &str, spoil: &Spoil) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    match spoil {
        Spoil::Char(i, c) => {
            let mut chars: Vec<char> = token.chars().collect();
            let at = i % chars.len();
            chars[at] = *c;
            return chars.into_iter().collect();
        }
        Spoil::Truncate(n) => return token.chars().take(n % token.len()).collect(),
        Spoil::DropPart(i) => {
            parts.remove(*i % parts.len());
        }
        Spoil::SwapParts(a, b) => {
            let n = parts.len();
            parts.swap(a % n, b % n);
        }
        Spoil::Part(i, bytes) => {
            let at = i % parts.len();
            parts[at] = URL_SAFE_NO_PAD.encode(bytes);
        }
        Spoil::Alg(alg) => {
            let header: Value = URL_SAFE_NO_PAD
                .decode(&parts[0])
                .ok()
                .and_then(|h| serde_json::from_slice(&h).ok())
                .unwrap_or_default();
            let mut header = header.as_object().cloned().unwrap_or_default();
            header.insert("alg".into(), Value::from(*alg));
            parts[0] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap());
        }
        Spoil::Claims(claims) => {
            parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
        }
        Spoil::Append(tail) => return format!("{token}{tail}"),
        Spoil::Whole(s) => return s.clone(),
    }
    parts.join(".")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A spoilt ID token never gets a user in: the login is refused with a
    /// documented reason (an unchanged token still signs in).
    #[test]
    fn id_token_checks_refuse_with_documented_reasons(spoil in spoil()) {
        let rig = oidc_rig();
        let unchanged = Arc::new(std::sync::Mutex::new(true));
        let seen = unchanged.clone();
        rig.emu.set_id_token_rewrite(Some(Arc::new(move |token: &str| {
            let spoilt = apply(token, &spoil);
            *seen.lock().unwrap() = spoilt == token;
            spoilt
        })));
        let result = rig.runtime.block_on(async {
            rig.emu.add_user("prop");
            let begun = rig.app.begin_with("google").await;
            let query: HashMap<String, String> = rig
                .emu
                .approve(&begun.authorize_url, "prop")
                .expect("the emulator accepts the authorize URL")
                .into_iter()
                .collect();
            rig.app.complete(&begun.state, &query["code"]).await
        });
        rig.emu.set_id_token_rewrite(None);
        let unchanged = *unchanged.lock().unwrap();
        match result {
            Ok(done) => {
                prop_assert!(unchanged, "a spoilt ID token signed in");
                prop_assert_ne!(done.outcome(), pb::Outcome::Unspecified);
            }
            Err(status) => {
                let info = status.get_details_error_info();
                prop_assert!(info.is_some(), "no ErrorInfo: {status:?}");
                let wire = info.unwrap().reason;
                let reason = Reason::from_wire(&wire);
                prop_assert!(reason.is_some(), "undocumented reason {wire}");
                prop_assert_eq!(Some(status.code()), reason.map(code));
                prop_assert!(
                    matches!(
                        reason,
                        Some(Reason::IdTokenInvalid | Reason::ProviderBadResponse)
                    ),
                    "{wire}: {status:?}"
                );
            }
        }
    }
}
