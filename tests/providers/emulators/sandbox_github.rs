#![allow(dead_code)]
//! The fake providers themselves, over real HTTP: the built-in sandbox
//! provider (`authbroker dev`) and the GitHub emulator other tests rely on.
//! If these drift from the wire formats, every provider test lies.

use crate::support::{
    emulators::{Emulator, github},
    faults,
};
use std::time::{Duration, Instant};

use authbroker::sandbox::SandboxServer;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use url::Url;

use faults::{Fault, GARBAGE_BODY, OVERSIZED_PREFIX};
use github::{Endpoint, GithubEmail, GithubEmulator, GithubUser};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("authbroker-emulator-tests")
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A PKCE pair: (verifier, S256 challenge).
fn pkce() -> (String, String) {
    let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

fn location(response: &reqwest::Response) -> Url {
    let raw = response
        .headers()
        .get(header::LOCATION)
        .expect("a Location header")
        .to_str()
        .unwrap();
    Url::parse(raw).unwrap()
}

fn query_param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

// ---------------------------------------------------------------------------
// Sandbox

const REDIRECT: &str = "http://localhost:8080/callback?next=%2Forders&x=1";
/// Characters that must survive the round trip through the query untouched.
const STATE: &str = "st/ate+1=2&3";

struct Sandbox {
    server: SandboxServer,
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn sandbox() -> Sandbox {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = SandboxServer::start(listener, async move {
        let _ = stopped.await;
    })
    .unwrap();
    let base = server.base_url().as_str().trim_end_matches('/').to_owned();
    Sandbox {
        server,
        base,
        stop: Some(stop),
    }
}

impl Sandbox {
    fn authorize_url(&self, challenge: &str, extra: &[(&str, &str)]) -> Url {
        let mut url = self.server.base_url().join("authorize").unwrap();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", "web-app")
            .append_pair("redirect_uri", REDIRECT)
            .append_pair("scope", "openid profile email")
            .append_pair("state", STATE)
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256")
            .extend_pairs(extra);
        url
    }

    /// Approves as `user`; returns the code.
    async fn login(&self, user: &str, challenge: &str) -> String {
        let response = client()
            .get(self.authorize_url(challenge, &[("sandbox_user", user)]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FOUND);
        query_param(&location(&response), "code").expect("a code")
    }

    async fn token(&self, form: &[(&str, &str)]) -> (StatusCode, Value) {
        let response = client()
            .post(format!("{}/token", self.base))
            .form(form)
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/json",
            "token answers are JSON"
        );
        (status, response.json().await.unwrap())
    }

    async fn redeem(&self, code: &str, verifier: &str) -> (StatusCode, Value) {
        self.token(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("client_id", "web-app"),
            ("client_secret", "dev-secret"),
            ("code_verifier", verifier),
        ])
        .await
    }

    async fn userinfo(&self, authorization: Option<&str>) -> reqwest::Response {
        let mut request = client().get(format!("{}/userinfo", self.base));
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        request.send().await.unwrap()
    }
}

fn expected_subject(name: &str) -> String {
    let digest = Sha256::digest(format!("sandbox:{name}").as_bytes());
    u64::from_be_bytes(digest[..8].try_into().unwrap()).to_string()
}

#[tokio::test]
async fn sandbox_full_login_flow() {
    let sb = sandbox().await;
    assert!(sb.base.starts_with("http://127.0.0.1:"));
    let (verifier, challenge) = pkce();

    let response = client()
        .get(sb.authorize_url(&challenge, &[("sandbox_user", "alice")]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let back = location(&response);
    assert_eq!(back.origin(), Url::parse(REDIRECT).unwrap().origin());
    assert_eq!(back.path(), "/callback");
    assert_eq!(query_param(&back, "next").as_deref(), Some("/orders"));
    assert_eq!(query_param(&back, "x").as_deref(), Some("1"));
    assert_eq!(query_param(&back, "state").as_deref(), Some(STATE));
    let code = query_param(&back, "code").unwrap();
    assert_eq!(code.len(), 43);

    let (status, body) = sb.redeem(&code, &verifier).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let access = body["access_token"].as_str().unwrap();
    assert!(access.starts_with("sbx_at_") && access.len() == 7 + 43);
    assert!(
        body["refresh_token"]
            .as_str()
            .unwrap()
            .starts_with("sbx_rt_")
    );
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "openid profile email");

    let response = sb.userinfo(Some(&format!("Bearer {access}"))).await;
    assert_eq!(response.status(), StatusCode::OK);
    let profile: Value = response.json().await.unwrap();
    assert_eq!(
        profile,
        json!({
            "sub": expected_subject("alice"),
            "preferred_username": "alice",
            "name": "Alice",
            "email": "alice@sandbox.test",
            "email_verified": true,
            "picture": format!("{}/avatar/alice.svg", sb.base),
        })
    );
    assert_eq!(profile["sub"], "12617301175701908547");

    // The avatar the profile points at is served.
    let avatar = client()
        .get(profile["picture"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(avatar.status(), StatusCode::OK);
    assert_eq!(avatar.headers()[header::CONTENT_TYPE], "image/svg+xml");
    assert!(avatar.text().await.unwrap().contains(">A</text>"));

    // Logging in again as alice yields the same subject; bob gets another.
    let (verifier2, challenge2) = pkce();
    let code2 = sb.login("alice", &challenge2).await;
    let (_, body2) = sb.redeem(&code2, &verifier2).await;
    assert_ne!(body2["access_token"], body["access_token"]);
    let again: Value = sb
        .userinfo(Some(&format!(
            "Bearer {}",
            body2["access_token"].as_str().unwrap()
        )))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["sub"], profile["sub"]);
    let code3 = sb.login("bob", &challenge2).await;
    let (_, body3) = sb.redeem(&code3, &verifier2).await;
    let bob: Value = sb
        .userinfo(Some(&format!(
            "Bearer {}",
            body3["access_token"].as_str().unwrap()
        )))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(bob["sub"], expected_subject("bob"));
    assert_ne!(bob["sub"], profile["sub"]);
}

#[tokio::test]
async fn sandbox_code_is_single_use() {
    let sb = sandbox().await;
    let (verifier, challenge) = pkce();
    let code = sb.login("alice", &challenge).await;
    assert_eq!(sb.redeem(&code, &verifier).await.0, StatusCode::OK);
    let (status, body) = sb.redeem(&code, &verifier).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_grant");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("already used")
    );
}

#[tokio::test]
async fn sandbox_checks_pkce() {
    let sb = sandbox().await;
    let (verifier, challenge) = pkce();
    let (other_verifier, _) = pkce();

    let code = sb.login("alice", &challenge).await;
    let (status, body) = sb.redeem(&code, &other_verifier).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_grant"))
    );
    // The failed attempt burned the code: no second guess.
    assert_eq!(
        sb.redeem(&code, &verifier).await.1["error"],
        "invalid_grant"
    );

    let code = sb.login("alice", &challenge).await;
    let (status, body) = sb
        .token(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", "web-app"),
            ("client_secret", "dev-secret"),
        ])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_grant");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("code_verifier")
    );
}

#[tokio::test]
async fn sandbox_token_endpoint_errors() {
    let sb = sandbox().await;
    let (verifier, challenge) = pkce();
    // Each case: a correct form with one field replaced (or dropped when empty).
    let cases = [
        (
            "redirect_uri",
            "http://localhost:8080/other",
            "invalid_grant",
        ),
        ("client_id", "another-app", "invalid_grant"),
        ("code", "garbage", "invalid_grant"),
        ("client_secret", "", "invalid_client"),
        ("grant_type", "password", "unsupported_grant_type"),
        ("redirect_uri", "", "invalid_request"),
    ];
    for (key, value, error) in cases {
        let code = sb.login("carol", &challenge).await;
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", "web-app"),
            ("client_secret", "dev-secret"),
            ("code_verifier", &verifier),
        ];
        form.retain(|(k, _)| *k != key);
        if !value.is_empty() {
            form.push((key, value));
        }
        let (status, body) = sb.token(&form).await;
        assert_eq!(body["error"], error, "{key}={value:?}: {body}");
        assert!(status.is_client_error());
    }

    // A JSON body is not what RFC 6749 specifies.
    let response = client()
        .post(format!("{}/token", sb.base))
        .json(&json!({"grant_type": "authorization_code"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");

    // client_secret_basic works as well as client_secret_post.
    let code = sb.login("carol", &challenge).await;
    let response = client()
        .post(format!("{}/token", sb.base))
        .basic_auth("web-app", Some("dev-secret"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
}

#[tokio::test]
async fn sandbox_refresh_rotates_tokens() {
    let sb = sandbox().await;
    let (verifier, challenge) = pkce();
    let code = sb.login("bob", &challenge).await;
    let (_, first) = sb.redeem(&code, &verifier).await;
    let refresh = first["refresh_token"].as_str().unwrap();
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh),
        ("client_id", "web-app"),
        ("client_secret", "dev-secret"),
        ("scope", "openid"),
    ];
    let (status, second) = sb.token(&form).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["scope"], "openid");
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let profile: Value = sb
        .userinfo(Some(&format!(
            "Bearer {}",
            second["access_token"].as_str().unwrap()
        )))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(profile["preferred_username"], "bob");
    // The old refresh token died with its use.
    assert_eq!(sb.token(&form).await.1["error"], "invalid_grant");
}

#[tokio::test]
async fn sandbox_userinfo_rejects_bad_tokens() {
    let sb = sandbox().await;
    let unknown = format!("Bearer sbx_at_{}", URL_SAFE_NO_PAD.encode([7u8; 32]));
    for authorization in [
        None,
        Some("Bearer nonsense"),
        Some(unknown.as_str()),
        Some("Basic YTpi"),
    ] {
        let response = sb.userinfo(authorization).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{authorization:?}"
        );
        assert!(
            response.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_token");
        assert!(body["error_description"].is_string());
    }
}

#[tokio::test]
async fn sandbox_deny_redirects_with_access_denied() {
    let sb = sandbox().await;
    let (_, challenge) = pkce();
    let response = client()
        .get(sb.authorize_url(&challenge, &[("sandbox_deny", "1")]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let raw = response.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        raw.contains("&error=access_denied&error_description=The+user+denied+the+request.&state="),
        "{raw}"
    );
    let back = Url::parse(&raw).unwrap();
    assert_eq!(query_param(&back, "state").as_deref(), Some(STATE));
    assert_eq!(query_param(&back, "next").as_deref(), Some("/orders"));
    assert_eq!(query_param(&back, "code"), None);
}

#[tokio::test]
async fn sandbox_picker_page_lists_users_and_escapes_input() {
    let sb = sandbox().await;
    let (_, challenge) = pkce();
    let mut url = sb.authorize_url(&challenge, &[]);
    let query = url.query().unwrap().replace(
        "client_id=web-app",
        "client_id=%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    );
    url.set_query(Some(&query));
    let response = client().get(url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/html; charset=utf-8"
    );
    let page = response.text().await.unwrap();
    assert!(page.contains("<title>authbroker sandbox</title>"));
    assert!(!page.contains("<script>"), "unescaped input echoed");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    for user in ["alice", "bob", "carol"] {
        assert!(
            page.contains(&format!("&amp;sandbox_user={user}\"")),
            "{user}"
        );
    }
    assert!(page.contains("&amp;sandbox_deny=1\""));
    assert!(page.contains("name=\"sandbox_user\""));
    for scope in ["openid", "profile", "email"] {
        assert!(page.contains(&format!("<code>{scope}</code>")));
    }
}

#[tokio::test]
async fn sandbox_bad_authorize_requests_get_a_400_page_not_a_redirect() {
    let sb = sandbox().await;
    let (_, challenge) = pkce();
    let good = sb.authorize_url(&challenge, &[("sandbox_user", "alice")]);
    let q = good.query().unwrap().to_owned();
    let broken = [
        q.replace("response_type=code", "response_type=token"),
        q.replace("client_id=web-app", "client_id="),
        q.replace(
            "redirect_uri=http%3A%2F%2Flocalhost",
            "redirect_uri=%2F%2Flocalhost",
        ),
        q.replace("redirect_uri=http", "redirect_uri=javascript"),
        q.replace(&format!("state={}", urlencode(STATE)), ""),
        q.replace("code_challenge_method=S256", "code_challenge_method=plain"),
        q.replace("sandbox_user=alice", "sandbox_user=%3Cb%3E"),
    ];
    for query in broken {
        let mut url = good.clone();
        url.set_query(Some(&query));
        let response = client().get(url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
        assert!(response.headers().get(header::LOCATION).is_none());
        let page = response.text().await.unwrap();
        assert!(page.contains("authorization request is invalid"), "{query}");
        assert!(!page.contains("<b>"));
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn sandbox_stops_on_shutdown() {
    let mut sb = sandbox().await;
    let url = format!("{}/userinfo", sb.base);
    assert_eq!(
        client().get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    sb.stop.take().unwrap().send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // A fresh client each time: no pooled connection to reuse.
        if client().get(&url).send().await.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "still serving after shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// GitHub emulator

const GH_REDIRECT: &str = "http://localhost:8080/oauth/github/callback";

async fn github() -> GithubEmulator {
    let gh = GithubEmulator::start().await;
    gh.add_account(GithubUser::octocat());
    gh.add_account(
        GithubUser::new(1001, "mona")
            .name("Mona Lisa")
            .public_email("mona@example.com")
            .with_email(GithubEmail::primary("mona@example.com"))
            .with_email(GithubEmail::secondary("mona@old.example", false)),
    );
    gh
}

fn gh_authorize_url(gh: &GithubEmulator, challenge: &str) -> String {
    let mut url = Url::parse(&gh.url(github::AUTHORIZE_PATH)).unwrap();
    url.query_pairs_mut()
        .append_pair("client_id", gh.client_id())
        .append_pair("redirect_uri", GH_REDIRECT)
        .append_pair("scope", "read:user user:email")
        .append_pair("state", "gh-state")
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256");
    url.into()
}

/// A well-formed token call, as authbroker should make it.
async fn gh_token(
    gh: &GithubEmulator,
    code: &str,
    verifier: &str,
    accept: Option<&str>,
) -> reqwest::Response {
    let mut request = client().post(gh.url(github::TOKEN_PATH)).form(&[
        ("client_id", gh.client_id()),
        ("client_secret", gh.client_secret()),
        ("code", code),
        ("redirect_uri", GH_REDIRECT),
        ("code_verifier", verifier),
    ]);
    if let Some(accept) = accept {
        request = request.header(header::ACCEPT, accept);
    }
    request.send().await.unwrap()
}

/// Logs `login` in and returns its access token (scopes as requested).
async fn gh_access_token(gh: &GithubEmulator, login: &str, scopes: Option<&[&str]>) -> String {
    let (verifier, challenge) = pkce();
    let url = gh_authorize_url(gh, &challenge);
    let code = match scopes {
        Some(scopes) => gh.authorize_with_scopes(&url, login, scopes),
        None => gh.authorize(&url, login),
    }
    .unwrap();
    let body: Value = gh_token(gh, &code, &verifier, Some("application/json"))
        .await
        .json()
        .await
        .unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

async fn gh_api(gh: &GithubEmulator, path: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut request = client()
        .get(gh.url(path))
        .header(header::ACCEPT, "application/vnd.github+json");
    if let Some(value) = authorization {
        request = request.header(header::AUTHORIZATION, value);
    }
    request.send().await.unwrap()
}

fn assert_gho_token(token: &str) {
    assert!(token.starts_with("gho_"), "{token}");
    assert_eq!(token.len(), 40);
    assert!(token[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
}

#[tokio::test]
async fn github_token_answers_json_when_asked() {
    let gh = github().await;
    let (verifier, challenge) = pkce();
    let code = gh
        .authorize(&gh_authorize_url(&gh, &challenge), "octocat")
        .unwrap();
    assert_eq!(code.len(), 20);
    let response = gh_token(&gh, &code, &verifier, Some("application/json")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/json; charset=utf-8"
    );
    let raw = response.text().await.unwrap();
    assert!(raw.starts_with(r#"{"access_token":"gho_"#), "{raw}");
    assert!(raw.ends_with(r#"","token_type":"bearer","scope":"read:user,user:email"}"#));
    let body: Value = serde_json::from_str(&raw).unwrap();
    assert_gho_token(body["access_token"].as_str().unwrap());

    // What the emulator saw: a clean request, secrets redacted.
    assert_eq!(gh.violations(), Vec::<String>::new());
    let seen = gh.requests_to(github::TOKEN_PATH);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        seen[0].content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(seen[0].param("client_id"), Some(github::CLIENT_ID));
    assert_eq!(seen[0].param("client_secret"), Some("<redacted>"));
    assert_eq!(seen[0].param("code_verifier"), Some("<redacted>"));
    let authorize = gh.requests_to(github::AUTHORIZE_PATH);
    assert_eq!(
        authorize[0].param("code_challenge"),
        Some(challenge.as_str())
    );
}

#[tokio::test]
async fn github_token_defaults_to_a_form_body() {
    let gh = github().await;
    let (verifier, challenge) = pkce();
    let code = gh
        .authorize(&gh_authorize_url(&gh, &challenge), "octocat")
        .unwrap();
    let response = gh_token(&gh, &code, &verifier, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/x-www-form-urlencoded; charset=utf-8"
    );
    let raw = response.text().await.unwrap();
    assert!(raw.starts_with("access_token=gho_"), "{raw}");
    assert!(
        raw.ends_with("&scope=read%3Auser%2Cuser%3Aemail&token_type=bearer"),
        "{raw}"
    );
}

#[tokio::test]
async fn github_token_errors_come_with_http_200() {
    let gh = github().await;
    let (verifier, challenge) = pkce();
    let url = gh_authorize_url(&gh, &challenge);

    // A used code is a bad code, in either format.
    let code = gh.authorize(&url, "octocat").unwrap();
    assert_eq!(
        gh_token(&gh, &code, &verifier, None).await.status(),
        StatusCode::OK
    );
    let response = gh_token(&gh, &code, &verifier, Some("application/json")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"error":"bad_verification_code","error_description":"The code passed is incorrect or expired.","error_uri":"https://docs.github.com/apps/managing-oauth-apps/troubleshooting-oauth-app-access-token-request-errors/#bad-verification-code"}"#
    );
    let response = gh_token(&gh, &code, &verifier, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.text().await.unwrap(),
        "error=bad_verification_code&error_description=The+code+passed+is+incorrect+or+expired.&error_uri=https%3A%2F%2Fdocs.github.com%2Fapps%2Fmanaging-oauth-apps%2Ftroubleshooting-oauth-app-access-token-request-errors%2F%23bad-verification-code"
    );

    let error_of = |response: reqwest::Response| async move {
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        body["error"].as_str().unwrap().to_owned()
    };

    // Wrong verifier.
    let code = gh.authorize(&url, "octocat").unwrap();
    let (wrong, _) = pkce();
    let response = gh_token(&gh, &code, &wrong, Some("application/json")).await;
    assert_eq!(error_of(response).await, "bad_verification_code");

    // Expired code (10 minutes).
    let code = gh.authorize(&url, "octocat").unwrap();
    gh.expire_codes();
    let response = gh_token(&gh, &code, &verifier, Some("application/json")).await;
    assert_eq!(error_of(response).await, "bad_verification_code");

    // Wrong client secret.
    let code = gh.authorize(&url, "octocat").unwrap();
    let response = client()
        .post(gh.url(github::TOKEN_PATH))
        .header(header::ACCEPT, "application/json")
        .form(&[
            ("client_id", gh.client_id()),
            ("client_secret", "wrong"),
            ("code", &code),
            ("code_verifier", &verifier),
        ])
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "incorrect_client_credentials");
    assert_eq!(
        body["error_description"],
        "The client_id and/or client_secret passed are incorrect."
    );

    // Another redirect_uri than at authorize.
    let response = client()
        .post(gh.url(github::TOKEN_PATH))
        .header(header::ACCEPT, "application/json")
        .form(&[
            ("client_id", gh.client_id()),
            ("client_secret", gh.client_secret()),
            ("code", &code),
            ("redirect_uri", "http://localhost:8080/elsewhere"),
            ("code_verifier", &verifier),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await, "redirect_uri_mismatch");
    assert_eq!(gh.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn github_token_records_badly_shaped_requests() {
    let gh = github().await;
    let url = gh.url(github::TOKEN_PATH);

    let response = client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.text().await.unwrap().contains("POST"));

    let response = client()
        .post(&url)
        .json(&json!({"client_id": github::CLIENT_ID, "client_secret": github::CLIENT_SECRET, "code": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let no_agent = reqwest::Client::builder().build().unwrap();
    let response = no_agent
        .post(&url)
        .form(&[("client_id", github::CLIENT_ID)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let violations = gh.violations();
    assert_eq!(violations.len(), 3, "{violations:?}");
    assert!(violations[1].contains("x-www-form-urlencoded"));
    assert!(violations[2].contains("User-Agent"));
    // Secrets sent the wrong way are still redacted in the record.
    let seen = gh.requests_to(github::TOKEN_PATH);
    assert_eq!(seen[1].param("client_secret"), Some("<redacted>"));
}

#[tokio::test]
async fn github_user_follows_the_rest_rules() {
    let gh = github().await;
    let token = gh_access_token(&gh, "octocat", None).await;

    // No User-Agent: 403 with GitHub's administrative-rules text.
    let response = reqwest::Client::new()
        .get(gh.url(github::USER_PATH))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(response.text().await.unwrap(), github::NO_USER_AGENT_BODY);

    let response = gh_api(&gh, github::USER_PATH, None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["message"], "Requires authentication");

    let response = gh_api(&gh, github::USER_PATH, Some("Bearer gho_nope")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.text().await.unwrap(), github::BAD_CREDENTIALS_BODY);

    // Both `Bearer` and the legacy `token` scheme work.
    for scheme in ["Bearer", "token"] {
        let response = gh_api(&gh, github::USER_PATH, Some(&format!("{scheme} {token}"))).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/json; charset=utf-8"
        );
        assert_eq!(
            response.headers()["x-oauth-scopes"],
            "read:user, user:email"
        );
        let user: Value = response.json().await.unwrap();
        assert_eq!(user["login"], "octocat");
        assert_eq!(user["id"], 583231);
        assert_eq!(user["node_id"], "MDQ6VXNlcjU4MzIzMQ==");
        assert_eq!(
            user["avatar_url"],
            "https://avatars.githubusercontent.com/u/583231?v=4"
        );
        assert_eq!(user["type"], "User");
        assert_eq!(user["site_admin"], false);
        assert_eq!(user["name"], "The Octocat");
        assert_eq!(user["email"], Value::Null);
        assert_eq!(user["company"], Value::Null);
        assert_eq!(user["blog"], "");
        for field in ["gravatar_id", "url", "html_url", "created_at", "updated_at"] {
            assert!(user[field].is_string(), "{field}");
        }
        for field in ["public_repos", "public_gists", "followers", "following"] {
            assert!(user[field].is_u64(), "{field}");
        }
    }

    // The public email shows up when the user has one.
    let mona = gh_access_token(&gh, "mona", None).await;
    let user: Value = gh_api(&gh, github::USER_PATH, Some(&format!("Bearer {mona}")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(user["email"], "mona@example.com");

    gh.revoke_tokens();
    let response = gh_api(&gh, github::USER_PATH, Some(&format!("Bearer {token}"))).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn github_emails_need_the_email_scope() {
    let gh = github().await;
    let narrow = gh_access_token(&gh, "mona", Some(&["read:user"])).await;
    let response = gh_api(&gh, github::EMAILS_PATH, Some(&format!("Bearer {narrow}"))).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        response.text().await.unwrap(),
        github::EMAILS_NOT_FOUND_BODY
    );

    for scopes in [&["user:email"][..], &["user"][..]] {
        let token = gh_access_token(&gh, "mona", Some(scopes)).await;
        let response = gh_api(&gh, github::EMAILS_PATH, Some(&format!("token {token}"))).await;
        assert_eq!(response.status(), StatusCode::OK, "{scopes:?}");
        let emails: Value = response.json().await.unwrap();
        assert_eq!(
            emails,
            json!([
                {"email": "mona@example.com", "primary": true, "verified": true, "visibility": "private"},
                {"email": "mona@old.example", "primary": false, "verified": false, "visibility": null},
            ])
        );
    }
}

#[tokio::test]
async fn github_browser_authorize_redirects() {
    let gh = github().await;
    let (verifier, challenge) = pkce();
    let url = gh_authorize_url(&gh, &challenge);

    let response = client()
        .get(format!("{url}&login=mona"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let back = location(&response);
    assert!(back.as_str().starts_with(GH_REDIRECT));
    assert_eq!(query_param(&back, "state").as_deref(), Some("gh-state"));
    let code = query_param(&back, "code").unwrap();
    let body: Value = gh_token(&gh, &code, &verifier, Some("application/json"))
        .await
        .json()
        .await
        .unwrap();
    let token = body["access_token"].as_str().unwrap();
    let user: Value = gh_api(&gh, github::USER_PATH, Some(&format!("Bearer {token}")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(user["login"], "mona");

    gh.set_user_denies(true);
    let response = client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let raw = response.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        raw,
        format!(
            "{GH_REDIRECT}?error=access_denied&error_description=The+user+has+denied+your+application+access.\
&error_uri=https%3A%2F%2Fdocs.github.com%2Fapps%2Fmanaging-oauth-apps%2Ftroubleshooting-authorization-request-errors%2F%23access-denied&state=gh-state"
        )
    );

    // Unknown application: GitHub's 404 page, no redirect.
    let response = client()
        .get(url.replace(github::CLIENT_ID, "Iv1.unknown"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // The direct helper refuses what GitHub (or we) would refuse.
    assert!(gh.authorize(&url, "nobody").is_err());
    assert!(
        gh.authorize(&url.replace("S256", "plain"), "octocat")
            .is_err()
    );
    assert!(
        gh.authorize(&url.replace("state=gh-state", "state="), "octocat")
            .is_err()
    );
    assert!(
        gh.authorize(&url.replace(github::CLIENT_ID, "x"), "octocat")
            .is_err()
    );
}

// --- faults -----------------------------------------------------------------

/// A token call that may fail at the transport level.
async fn gh_raw_token(
    gh: &GithubEmulator,
    client: &reqwest::Client,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(gh.url(github::TOKEN_PATH))
        .header(header::ACCEPT, "application/json")
        .form(&[
            ("client_id", gh.client_id()),
            ("client_secret", gh.client_secret()),
            ("code", "0000"),
        ])
        .send()
        .await
}

#[tokio::test]
async fn github_fault_slow_delays_then_answers() {
    let gh = github().await;
    gh.set_endpoint_fault(Endpoint::Token, Fault::Slow(Duration::from_millis(300)));
    let started = Instant::now();
    let response = gh_raw_token(&gh, &client()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"], "bad_verification_code",
        "normal answer after the delay"
    );
}

#[tokio::test]
async fn github_fault_status_codes() {
    let gh = github().await;
    for (fault, status) in [
        (Fault::Status500, StatusCode::INTERNAL_SERVER_ERROR),
        (Fault::Status503, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        gh.set_endpoint_fault(Endpoint::Token, fault);
        let response = gh_raw_token(&gh, &client()).await.unwrap();
        assert_eq!(response.status(), status);
        assert!(
            response.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        assert!(response.text().await.unwrap().contains("<html>"));
    }
    // Faults are per endpoint: /user still answers normally.
    let response = gh_api(&gh, github::USER_PATH, None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    gh.clear_faults();
    assert_eq!(
        gh_raw_token(&gh, &client()).await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn github_fault_garbage_is_not_json() {
    let gh = github().await;
    let token = gh_access_token(&gh, "octocat", None).await;
    gh.set_endpoint_fault(Endpoint::User, Fault::Garbage);
    let response = gh_api(&gh, github::USER_PATH, Some(&format!("Bearer {token}"))).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let raw = response.text().await.unwrap();
    assert_eq!(raw, GARBAGE_BODY);
    assert!(serde_json::from_str::<Value>(&raw).is_err());
}

#[tokio::test]
async fn github_fault_oversized_streams_exactly_that_many_bytes() {
    let gh = github().await;
    let size = 2 * 1024 * 1024 + 17;
    gh.set_endpoint_fault(Endpoint::Emails, Fault::Oversized(size));
    let response = gh_api(&gh, github::EMAILS_PATH, Some("Bearer whatever")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers().get(header::CONTENT_LENGTH).is_none(),
        "streamed, so a client must count bytes itself"
    );
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len(), size);
    assert!(body.starts_with(OVERSIZED_PREFIX.as_bytes()));
}

#[tokio::test]
async fn github_fault_hang_is_cut_by_the_client_timeout() {
    let gh = github().await;
    gh.set_endpoint_fault(Endpoint::Token, Fault::Hang);
    let impatient = reqwest::Client::builder()
        .user_agent("authbroker-emulator-tests")
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = Instant::now();
    let error = gh_raw_token(&gh, &impatient).await.unwrap_err();
    assert!(error.is_timeout(), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn github_fault_close_connection_breaks_the_response() {
    let gh = github().await;
    gh.set_endpoint_fault(Endpoint::Token, Fault::CloseConnection);
    let outcome = match gh_raw_token(&gh, &client()).await {
        Err(e) => Err(e),
        Ok(response) => response.bytes().await.map(|_| ()),
    };
    let error = outcome.expect_err("a dropped connection cannot yield a full response");
    assert!(!error.is_timeout(), "{error}");
}

#[tokio::test]
async fn github_fault_can_fire_a_fixed_number_of_times() {
    let gh = github().await;
    gh.set_endpoint_fault_times(Endpoint::Token, Fault::Status503, 2);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(gh_raw_token(&gh, &client()).await.unwrap().status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::OK
        ]
    );
}
