//! The provider conformance suite: the same scenarios, over real gRPC and
//! real HTTP, against every preset's emulator, on Postgres and on SQLite.
//! Each (provider, scenario, store) is a test of its own, so a failure
//! names all three: `conformance::qq::denial::on_postgres`. Refresh and
//! revoke have no gRPC surface yet, so they are exercised through the
//! library's provider API against the same emulators.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::support::{
    emulators::{Emulator, ExpectedIdentity, Fault, Step},
    *,
};
use authbroker::{
    config::{HttpSettings, ProviderConfig, Settings},
    grpc::pb::{self, Outcome},
    http::HttpClient,
    provider::{Provider, ProviderError, Registry},
};
use secrecy::{ExposeSecret, SecretString};
use tonic::Code;

/// The provider's name in config for every scenario.
const NAME: &str = "p";
/// A second provider whose every endpoint is a closed port.
const DEAD: &str = "dead";

fn configure(s: &mut Settings, config: ProviderConfig) {
    let mut dead = config.clone();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    for url in dead.endpoints.values_mut() {
        let path = url::Url::parse(url).unwrap().path().to_string();
        *url = format!("{base}{path}");
    }
    s.providers.insert(NAME.into(), config);
    s.providers.insert(DEAD.into(), dead);
    s.http.timeout = Duration::from_secs(1);
    s.http.connect_timeout = Duration::from_millis(500);
}

fn identity_of(r: &pb::CompleteLoginResponse) -> ExpectedIdentity {
    let i = r.identity.clone().unwrap();
    ExpectedIdentity {
        subject: i.subject,
        union_id: i.union_id,
        username: i.username,
        display_name: i.display_name,
        avatar_url: i.avatar_url,
        email: i.email,
        email_verified: i.email_verified,
    }
}

struct Suite {
    app: TestApp,
    emu: Arc<dyn Emulator>,
}

impl Suite {
    /// The app on `backend` with the emulator's provider, as `tweak` leaves
    /// its config, and a dead one beside it.
    async fn start(
        emu: Arc<dyn Emulator>,
        backend: Backend,
        tweak: impl FnOnce(&mut ProviderConfig),
    ) -> Suite {
        let mut config = emu.provider_config();
        tweak(&mut config);
        let app = spawn_app_on(backend, |s| configure(s, config)).await;
        Suite { app, emu }
    }

    fn kind(&self) -> &'static str {
        self.emu.kind()
    }

    /// A first login as `ada`, so the emulator has seen every step the
    /// provider has.
    async fn warm_up(&self) -> pb::CompleteLoginResponse {
        self.emu.add_user("ada");
        self.login("ada")
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", self.kind()))
    }

    /// What every scenario ends with: no request a real provider would refuse.
    fn assert_no_violations(&self) {
        let violations = self.emu.violations();
        assert!(
            violations.is_empty(),
            "{}: requests a real provider would refuse: {violations:?}",
            self.kind()
        );
    }

    /// BeginLogin, then the browser step as `seed`: (state, callback query).
    async fn authorize(&self, seed: &str) -> (String, HashMap<String, String>) {
        let begun = self.app.begin_with(NAME).await;
        let query = self
            .emu
            .approve(&begun.authorize_url, seed)
            .unwrap_or_else(|why| panic!("{} refused the authorize URL: {why}", self.emu.kind()));
        let mut query: HashMap<String, String> = query.into_iter().collect();
        assert_eq!(query.get("state"), Some(&begun.state), "state round-trips");
        // DingTalk names the code `authCode`; the web app hands it to
        // CompleteLogin as `code` (docs/providers.md#dingtalk).
        if let Some(code) = query.remove("authCode") {
            query.insert("code".into(), code);
        }
        // Alipay's is `auth_code` (docs/providers.md#alipay).
        if let Some(code) = query.remove("auth_code") {
            query.insert("code".into(), code);
        }
        (begun.state, query)
    }

    /// The callback's other parameters go along as `callback_params`, as
    /// a web app passes them (Apple's first-login `user`).
    async fn login(&self, seed: &str) -> Result<pb::CompleteLoginResponse, tonic::Status> {
        let (state, query) = self.authorize(seed).await;
        let callback_params = query
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "code" | "state"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let request = pb::CompleteLoginRequest {
            state,
            code: query["code"].clone(),
            callback_params,
            ..Default::default()
        };
        self.app
            .client()
            .complete_login(authed(request, LOGIN_KEY))
            .await
            .map(|r| r.into_inner())
    }

    async fn users(&self) -> u64 {
        self.app.store.count_users().await.unwrap()
    }

    /// A login that must fail with `reason` and leave no user behind.
    async fn fails(&self, seed: &str, code: Code, reason: &str) {
        let before = self.users().await;
        let started = Instant::now();
        let err = self.login(seed).await.expect_err("the login must fail");
        assert_error(&err, code, reason);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{reason} took {:?}",
            started.elapsed()
        );
        assert_eq!(
            self.users().await,
            before,
            "a failed login persists nothing"
        );
    }

    fn provider(&self) -> Arc<dyn Provider> {
        let http = HttpClient::new(&HttpSettings::default()).unwrap();
        let configs = [(NAME.to_string(), self.emu.provider_config())].into();
        let registry = Registry::build(&configs, &http, None).unwrap();
        registry.get(NAME).unwrap().clone()
    }
}

/// The scenarios, each run on a fresh app and emulator.
mod scenario {
    use super::*;

    /// A new user, the same user again, then a second user.
    pub async fn happy_path(suite: &Suite) {
        let kind = suite.kind();
        let expected = suite.emu.add_user("ada");
        let first = suite
            .login("ada")
            .await
            .unwrap_or_else(|e| panic!("{kind}: {e:?}"));
        assert_eq!(first.outcome(), Outcome::UserCreated, "{kind}");
        assert_eq!(
            identity_of(&first),
            expected,
            "{kind}: identity as the provider reports it"
        );
        let again = suite.login("ada").await.unwrap();
        assert_eq!(again.outcome(), Outcome::SignedIn, "{kind}");
        assert_eq!(
            again.binding.as_ref().unwrap().user_id,
            first.binding.as_ref().unwrap().user_id
        );
        let other = suite.emu.add_user("grace");
        let second = suite.login("grace").await.unwrap();
        assert_eq!(second.outcome(), Outcome::UserCreated);
        assert_eq!(identity_of(&second), other);
        assert_ne!(other.subject, expected.subject);
        assert_eq!(suite.users().await, 2);
    }

    /// PKCE exactly where the provider supports it.
    pub async fn pkce(suite: &Suite) {
        let kind = suite.kind();
        let caps = suite.emu.capabilities();
        suite.warm_up().await;
        let begun = suite.app.begin_with(NAME).await;
        let q: HashMap<_, _> = url::Url::parse(&begun.authorize_url)
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect();
        assert_eq!(q.contains_key("code_challenge"), caps.pkce, "{kind}: PKCE");
        if caps.pkce {
            assert_eq!(q["code_challenge_method"], "S256");
            let token_calls: Vec<_> = suite
                .emu
                .requests()
                .into_iter()
                .filter(|r| r.step == Step::Token)
                .collect();
            assert!(!token_calls.is_empty());
            assert!(
                token_calls
                    .iter()
                    .all(|r| r.param("code_verifier").is_some()),
                "{kind}: every token call carries the verifier"
            );
        }
    }

    /// The user says no.
    pub async fn denial(suite: &Suite) {
        let kind = suite.kind();
        let begun = suite.app.begin_with(NAME).await;
        let denial = suite.emu.deny(&begun.authorize_url);
        assert_eq!(
            denial.is_some(),
            suite.emu.capabilities().deny_redirects,
            "{kind}"
        );
        let denial: HashMap<_, _> = denial
            .unwrap_or_else(|| vec![("error".into(), "access_denied".into())])
            .into_iter()
            .collect();
        let err = suite
            .app
            .client()
            .complete_login(authed(
                pb::CompleteLoginRequest {
                    state: begun.state.clone(),
                    error: denial["error"].clone(),
                    error_description: denial.get("error_description").cloned().unwrap_or_default(),
                    ..Default::default()
                },
                LOGIN_KEY,
            ))
            .await
            .unwrap_err();
        assert_error(&err, Code::FailedPrecondition, "ACCESS_DENIED");
    }

    /// A code the provider never issued, and a code used twice: refused,
    /// and nothing persisted.
    pub async fn bad_code(suite: &Suite) {
        let kind = suite.kind();
        let begun = suite.app.begin_with(NAME).await;
        let err = suite
            .app
            .complete(&begun.state, "0000bogus0000")
            .await
            .unwrap_err();
        assert_error(&err, Code::FailedPrecondition, "PROVIDER_REJECTED");
        if suite.emu.capabilities().errors_with_http_200 {
            let last_token = suite
                .emu
                .requests()
                .into_iter()
                .rfind(|r| r.step == Step::Token)
                .unwrap();
            assert_eq!(
                last_token.status, 200,
                "{kind}: this provider reports errors with HTTP 200"
            );
        }
        assert_eq!(suite.users().await, 0);
        suite.emu.add_user("ada");
        let (state, query) = suite.authorize("ada").await;
        suite.app.complete(&state, &query["code"]).await.unwrap();
        let before = suite.users().await;
        let begun = suite.app.begin_with(NAME).await;
        let err = suite
            .app
            .complete(&begun.state, &query["code"])
            .await
            .unwrap_err();
        assert_error(&err, Code::FailedPrecondition, "PROVIDER_REJECTED");
        assert_eq!(suite.users().await, before);
    }

    /// Malformed and oversized answers, 5xx, timeouts, at each step the
    /// provider has (an OIDC provider without userinfo makes no identity
    /// call).
    pub async fn faults(suite: &Suite) {
        suite.warm_up().await;
        let identity_calls = suite
            .emu
            .requests()
            .iter()
            .any(|r| r.step == Step::Identity);
        for (step, fault, code, reason) in [
            (
                Step::Token,
                Fault::Garbage,
                Code::Internal,
                "PROVIDER_BAD_RESPONSE",
            ),
            (
                Step::Token,
                Fault::Oversized(2 << 20),
                Code::Internal,
                "PROVIDER_BAD_RESPONSE",
            ),
            (
                Step::Token,
                Fault::Status500,
                Code::Unavailable,
                "PROVIDER_UNAVAILABLE",
            ),
            (
                Step::Token,
                Fault::Hang,
                Code::Unavailable,
                "PROVIDER_UNAVAILABLE",
            ),
            (
                Step::Identity,
                Fault::Garbage,
                Code::Internal,
                "PROVIDER_BAD_RESPONSE",
            ),
            (
                Step::Identity,
                Fault::Status503,
                Code::Unavailable,
                "PROVIDER_UNAVAILABLE",
            ),
            (
                Step::Identity,
                Fault::Hang,
                Code::Unavailable,
                "PROVIDER_UNAVAILABLE",
            ),
        ] {
            if step == Step::Identity && !identity_calls {
                continue;
            }
            suite.emu.clear_faults();
            suite.emu.set_fault(step, fault.clone());
            suite.emu.add_user("faulty");
            suite.fails("faulty", code, reason).await;
        }
        suite.emu.clear_faults();
    }

    /// Unreachable: nothing listens where the dead provider points.
    pub async fn unreachable(suite: &Suite) {
        let begun = suite.app.begin(pb::BeginLoginRequest {
            provider: DEAD.into(),
            ..Default::default()
        });
        match begun.await {
            // OIDC providers need discovery before they can build the URL.
            Err(e) => {
                assert_error(&e, Code::Unavailable, "PROVIDER_UNAVAILABLE");
            }
            Ok(begun) => {
                let err = suite
                    .app
                    .complete(&begun.state, "some-code")
                    .await
                    .unwrap_err();
                assert_error(&err, Code::Unavailable, "PROVIDER_UNAVAILABLE");
            }
        }
    }

    /// Numbers sent as strings change nothing.
    pub async fn numbers_as_strings(suite: &Suite) {
        let kind = suite.kind();
        suite.emu.set_numbers_as_strings(true);
        let expected = suite.emu.add_user("lin");
        let done = suite
            .login("lin")
            .await
            .unwrap_or_else(|e| panic!("{kind} with strings: {e:?}"));
        assert_eq!(identity_of(&done), expected, "{kind}: numbers as strings");
        suite.emu.set_numbers_as_strings(false);
    }

    /// Refresh through the provider API, where the provider has it; a
    /// single-use refresh token comes with its successor.
    pub async fn refresh(suite: &Suite) {
        let kind = suite.kind();
        let caps = suite.emu.capabilities();
        let provider = suite.provider();
        assert_eq!(
            provider.refresher().is_some(),
            caps.refresh,
            "{kind}: refresh support"
        );
        let Some(refresher) = provider.refresher() else {
            return;
        };
        suite.emu.add_user("ada");
        let (_, refresh) = suite.emu.issue_tokens("ada");
        let refresh = SecretString::from(refresh.expect("a refresh token"));
        let renewed = refresher
            .refresh(&refresh, &[])
            .await
            .unwrap_or_else(|e| panic!("{kind} refresh: {e}"));
        assert!(
            suite
                .emu
                .access_token_valid(renewed.access_token.expose_secret())
        );
        if caps.refresh_single_use {
            assert!(
                renewed.refresh_token.is_some(),
                "{kind}: a single-use refresh token comes with its successor"
            );
            let reused = refresher.refresh(&refresh, &[]).await.unwrap_err();
            assert!(
                matches!(reused, ProviderError::Rejected { .. }),
                "{kind}: {reused:?}"
            );
        }
        let bogus = refresher
            .refresh(&SecretString::from("not-a-refresh-token"), &[])
            .await
            .unwrap_err();
        assert!(
            matches!(bogus, ProviderError::Rejected { .. }),
            "{kind}: {bogus:?}"
        );
    }

    /// Revocation through the provider API, where the provider has it.
    pub async fn revoke(suite: &Suite) {
        let kind = suite.kind();
        let provider = suite.provider();
        // An OIDC provider can revoke only if discovery names an endpoint.
        let can_revoke = provider.revoker().is_some() && provider.can_revoke().await;
        assert_eq!(
            can_revoke,
            suite.emu.capabilities().revoke,
            "{kind}: revoke support"
        );
        let Some(revoker) = provider.revoker().filter(|_| can_revoke) else {
            return;
        };
        suite.emu.add_user("ada");
        let (access, _) = suite.emu.issue_tokens("ada");
        assert!(suite.emu.access_token_valid(&access));
        revoker
            .revoke(&SecretString::from(access.clone()))
            .await
            .unwrap_or_else(|e| panic!("{kind} revoke: {e}"));
        assert!(!suite.emu.access_token_valid(&access), "{kind}: revoked");
    }
}

/// One test per (provider, scenario, store), all ending with no violation.
macro_rules! conformance {
    ($($provider:ident => $start:expr $(, tweak $tweak:expr)?;)*) => {
        $(
            mod $provider {
                use super::*;

                async fn suite(backend: Backend) -> Suite {
                    let tweak: fn(&mut ProviderConfig) = tweak!($($tweak)?);
                    Suite::start(Arc::new($start.await), backend, tweak).await
                }

                scenarios!(
                    happy_path,
                    pkce,
                    denial,
                    bad_code,
                    faults,
                    unreachable,
                    numbers_as_strings,
                    refresh,
                    revoke,
                );
            }
        )*
    };
}

/// A provider's config change, or none.
macro_rules! tweak {
    () => {
        |_| {}
    };
    ($tweak:expr) => {
        $tweak
    };
}

macro_rules! scenarios {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn on_postgres() {
                    let suite = suite(Backend::Postgres).await;
                    scenario::$scenario(&suite).await;
                    suite.assert_no_violations();
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn on_sqlite() {
                    let suite = suite(Backend::Sqlite).await;
                    scenario::$scenario(&suite).await;
                    suite.assert_no_violations();
                }
            }
        )*
    };
}

use crate::support::emulators::{
    acwing::AcwingEmulator, alipay::AlipayEmulator, custom::CustomEmulator,
    dingtalk::DingtalkEmulator, feishu::FeishuEmulator, gitee::GiteeEmulator,
    github::GithubEmulator, gitlab::GitlabEmulator, google::GoogleEmulator, qiita::QiitaEmulator,
    qq::QqEmulator, wechat::WechatEmulator, weibo::WeiboEmulator,
};

use crate::support::emulators::{apple::AppleEmulator, microsoft::MicrosoftEmulator};

conformance! {
    qq => QqEmulator::start();
    wechat => WechatEmulator::start();
    weibo => WeiboEmulator::start();
    gitee => GiteeEmulator::start();
    acwing => AcwingEmulator::start();
    qiita => QiitaEmulator::start();
    github => GithubEmulator::start();
    google => GoogleEmulator::start();
    // OIDC with the userinfo endpoint merged in, so identity-step faults apply.
    google_with_userinfo => GoogleEmulator::start(), tweak |c| c.fetch_userinfo = true;
    custom_oauth2 => CustomEmulator::start();
    gitlab => GitlabEmulator::start();
    dingtalk => DingtalkEmulator::start();
    feishu => FeishuEmulator::start();
    alipay => AlipayEmulator::start();
    lark => FeishuEmulator::start_lark();
    // GitLab with userinfo, so identity-step faults apply there too.
    gitlab_with_userinfo => GitlabEmulator::start(), tweak |c| c.fetch_userinfo = true;
    microsoft => MicrosoftEmulator::start();
    apple => AppleEmulator::start();
}

/// A provider's `expires_in` of 99999999999999 seconds once overflowed the
/// expiry instant and panicked the call; it is a bad response.
#[tokio::test]
async fn an_overflowing_token_lifetime_is_a_bad_response() {
    let nimbus = crate::support::emulators::custom::CustomEmulator::start().await;
    nimbus.add_user("n");
    nimbus.set_lifetime(99_999_999_999_999);
    let mut config = nimbus.provider_config();
    config.store_tokens = true;
    let app = spawn_app_on(Backend::Sqlite, |s| {
        with_vault(s);
        s.providers.insert(NAME.into(), config);
    })
    .await;
    let suite = Suite {
        app,
        emu: Arc::new(nimbus),
    };
    suite
        .fails("n", Code::Internal, "PROVIDER_BAD_RESPONSE")
        .await;
    let err = suite.login("n").await.unwrap_err();
    assert!(err.message().contains("expires_in"), "{}", err.message());
}

/// Alipay's answers are trusted only under the Alipay public key: with
/// another key configured, a genuine answer is a bad response and no user
/// is made.
#[tokio::test]
async fn alipay_answers_under_another_key_are_refused() {
    let emu = AlipayEmulator::start().await;
    emu.add_user("ada");
    let suite = Suite::start(Arc::new(emu), Backend::Sqlite, |c| {
        c.provider_public_key = Some(AlipayEmulator::app_public_key());
    })
    .await;
    suite
        .fails("ada", Code::Internal, "PROVIDER_BAD_RESPONSE")
        .await;
    suite.assert_no_violations();
}

/// `options.subject = "user_id"` binds the `2088…` id instead of `open_id`.
#[tokio::test]
async fn alipay_binds_user_id_when_configured() {
    let emu = AlipayEmulator::start().await;
    emu.add_user("ada");
    let user_id = emu.user("ada").unwrap().user_id;
    let suite = Suite::start(Arc::new(emu), Backend::Sqlite, |c| {
        c.options.insert("subject".into(), "user_id".into());
    })
    .await;
    let done = suite.login("ada").await.unwrap();
    assert_eq!(identity_of(&done).subject, user_id);
    suite.assert_no_violations();
}

/// check-config names the Alipay key that is wrong, and never prints it.
#[tokio::test]
async fn alipay_key_problems_name_the_key() {
    let emu = AlipayEmulator::start().await;
    let build = |tweak: &dyn Fn(&mut ProviderConfig)| {
        let mut config = emu.provider_config();
        tweak(&mut config);
        let http = HttpClient::new(&HttpSettings::default()).unwrap();
        Registry::build(&[(NAME.to_string(), config)].into(), &http, None)
            .err()
            .unwrap_or_default()
    };
    assert!(build(&|_| {}).is_empty());
    let problems = build(&|c| c.client_secret = Some("MIIBnot-a-key".into()));
    assert!(
        problems.len() == 1 && problems[0].starts_with("providers.p.client_secret"),
        "{problems:?}"
    );
    assert!(!problems[0].contains("MIIB"), "{problems:?}");
    let problems = build(&|c| c.provider_public_key = None);
    assert!(
        problems.len() == 1 && problems[0].contains("provider_public_key: is required"),
        "{problems:?}"
    );
    let problems = build(&|c| {
        c.options.insert("subject".into(), "alipay_user_id".into());
    });
    assert!(
        problems.len() == 1 && problems[0].contains("options.subject"),
        "{problems:?}"
    );
    // Only a provider that signs its answers takes the key.
    let mut github = crate::support::emulators::github::GithubEmulator::start()
        .await
        .provider_config();
    github.provider_public_key = Some(AlipayEmulator::alipay_public_key());
    let http = HttpClient::new(&HttpSettings::default()).unwrap();
    let problems = Registry::build(&[(NAME.to_string(), github)].into(), &http, None)
        .err()
        .unwrap_or_default();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("provider_public_key: only for providers that sign")),
        "{problems:?}"
    );
}

/// The README's Alipay example (outside the tested preset blocks, for its
/// key files) builds once its paths point at real keys.
#[tokio::test]
async fn the_readme_alipay_example_builds() {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("[providers.alipay]")
        .expect("an Alipay example");
    let block = &readme[start..];
    let block = &block[..block.find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("alipay-public.pem");
    std::fs::write(&public, AlipayEmulator::alipay_public_key()).unwrap();
    let private = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/keys/rsa.pem");
    let block = block
        .replace("/run/secrets/alipay-app-private.pem", private)
        .replace("/run/secrets/alipay-public.pem", public.to_str().unwrap());
    use figment::providers::{Format, Serialized, Toml};
    let settings = Settings::from_figment(
        figment::Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(&block)),
    )
    .unwrap();
    let http = HttpClient::new(&settings.http).unwrap();
    if let Err(p) = Registry::build(&settings.providers, &http, None) {
        panic!("README's Alipay example: {p:#?}");
    }
}
