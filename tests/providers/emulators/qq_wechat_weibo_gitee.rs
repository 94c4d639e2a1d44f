#![allow(dead_code)]
//! The QQ, WeChat, Weibo and Gitee emulators themselves, over real HTTP:
//! exact bytes where clients depend on them (QQ's JSONP and form-encoded
//! token answer, WeChat's `\/` escapes), error shapes and statuses,
//! single-use codes, refresh, recorded shape violations, faults and the
//! numbers-as-strings toggle. The last section drives authbroker's own
//! provider engine (presets under `providers/`) against each emulator.

use crate::support::emulators::{
    Emulator, ExpectedIdentity, Fault, SeenRequest, Step, gitee, qq, wechat, weibo,
};

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use authbroker::{
    config::{HttpSettings, ProviderConfig},
    http::HttpClient,
    provider::{AuthorizeParams, CallbackParams, Registry},
    state::{PendingLogin, PkceVerifier, StateToken},
};
use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use url::Url;

use gitee::GiteeEmulator;
use qq::{QqAvatars, QqEmulator};
use wechat::WechatEmulator;
use weibo::WeiboEmulator;

const REDIRECT: &str = "https://app.example.com/oauth/callback";
const STATE: &str = "st/ate+1=2&3";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("authbroker-emulator-tests")
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// `base + path ? pairs [# fragment]`, encoded as authbroker encodes it.
fn build_url(base: &str, path: &str, pairs: &[(&str, &str)], fragment: Option<&str>) -> String {
    let mut url = Url::parse(&format!("{base}{path}")).unwrap();
    url.query_pairs_mut().extend_pairs(pairs);
    if let Some(f) = fragment {
        url.set_fragment(Some(f));
    }
    url.to_string()
}

fn param(pairs: &[(String, String)], name: &str) -> String {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no {name} in {pairs:?}"))
}

async fn get(url: &str) -> (StatusCode, String, String) {
    answer(client().get(url).send().await.unwrap()).await
}

async fn answer(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

fn with_query(base: &str, path: &str, pairs: &[(&str, &str)]) -> String {
    build_url(base, path, pairs, None)
}

fn is_hex(s: &str, len: usize, upper: bool) -> bool {
    s.len() == len
        && s.bytes().all(|b| {
            b.is_ascii_digit()
                || if upper {
                    (b'A'..=b'F').contains(&b)
                } else {
                    (b'a'..=b'f').contains(&b)
                }
        })
}

fn last(requests: &[SeenRequest]) -> &SeenRequest {
    requests.last().expect("a recorded request")
}

// ---------------------------------------------------------------------------
// QQ

fn qq_authorize(emu: &QqEmulator, extra: &[(&str, &str)]) -> String {
    let mut pairs = vec![
        ("client_id", qq::APP_ID),
        ("redirect_uri", REDIRECT),
        ("response_type", "code"),
        ("scope", "get_user_info"),
        ("state", STATE),
    ];
    pairs.extend_from_slice(extra);
    build_url(&emu.base_url, qq::AUTHORIZE_PATH, &pairs, None)
}

async fn qq_code(emu: &QqEmulator, seed: &str) -> String {
    let back = emu.approve(&qq_authorize(emu, &[]), seed).unwrap();
    assert_eq!(param(&back, "state"), STATE);
    let code = param(&back, "code");
    assert!(is_hex(&code, 32, true), "{code}");
    code
}

fn qq_token_url(emu: &QqEmulator, code: &str, extra: &[(&str, &str)]) -> String {
    let mut pairs = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", REDIRECT),
        ("client_id", qq::APP_ID),
        ("client_secret", qq::APP_KEY),
    ];
    pairs.extend_from_slice(extra);
    with_query(&emu.base_url, qq::TOKEN_PATH, &pairs)
}

fn qq_jsonp_error(code: i64, description: &str) -> String {
    format!("callback( {{\"error\":{code},\"error_description\":\"{description}\"}} );\n")
}

#[tokio::test]
async fn qq_login_answers_byte_for_byte() {
    let emu = QqEmulator::start().await;
    let expected = emu.add_user_with("alice", QqAvatars::Full);
    let code = qq_code(&emu, "alice").await;

    let (status, content_type, body) = get(&qq_token_url(&emu, &code, &[])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/html");
    let parts: Vec<&str> = body.split('&').collect();
    assert_eq!(parts.len(), 3, "{body}");
    let access = parts[0].strip_prefix("access_token=").unwrap();
    assert!(is_hex(access, 32, true));
    assert_eq!(parts[1], "expires_in=7776000");
    let refresh = parts[2].strip_prefix("refresh_token=").unwrap();
    assert!(is_hex(refresh, 32, true));
    assert!(emu.access_token_valid(access));

    let openid = emu.user("alice").unwrap().openid;
    assert_eq!(openid, expected.subject);
    assert!(is_hex(&openid, 32, true));
    let (status, content_type, body) = get(&with_query(
        &emu.base_url,
        qq::ME_PATH,
        &[("access_token", access)],
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/html");
    assert_eq!(
        body,
        format!("callback( {{\"client_id\":\"101518219\",\"openid\":\"{openid}\"}} );\n")
    );
    // The real capture is 83 bytes for a 9-digit appid and 32-hex openid.
    assert_eq!(body.len(), 83);

    let (status, _, body) = get(&with_query(
        &emu.base_url,
        qq::USER_INFO_PATH,
        &[
            ("access_token", access),
            ("oauth_consumer_key", qq::APP_ID),
            ("openid", &openid),
        ],
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.starts_with("{\"ret\":0,\"msg\":\"\",\"is_lost\":0,\"nickname\":\"飞翔的企鹅-alice\""),
        "{body}"
    );
    let user: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(user["figureurl_qq"], expected.avatar_url.as_str());
    assert!(user["figureurl_qq"].as_str().unwrap().contains("&s=640&"));
    assert!(user["figureurl_qq_2"].as_str().unwrap().contains("&s=100&"));
    assert!(user["figureurl_qq_1"].as_str().unwrap().contains("&s=40&"));
    assert_eq!(
        user["figureurl_2"],
        format!("http://qzapp.qlogo.cn/qzapp/101518219/{openid}/100").as_str()
    );
    assert_eq!(expected.display_name, "飞翔的企鹅-alice");
    assert_eq!(expected.union_id, "");

    let requests = emu.requests();
    assert_eq!(requests.len(), 3);
    let token = &requests[0];
    assert_eq!((token.step, token.method.as_str()), (Step::Token, "GET"));
    assert_eq!(token.param("code"), Some("<redacted>"));
    assert_eq!(token.param("client_secret"), Some("<redacted>"));
    assert_eq!(token.param("client_id"), Some(qq::APP_ID));
    assert_eq!(token.status, 200);
    assert_eq!(requests[1].step, Step::Identity);
    assert_eq!(requests[1].param("access_token"), Some("<redacted>"));
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn qq_codes_are_single_use_and_errors_are_jsonp_with_200() {
    let emu = QqEmulator::start().await;
    emu.add_user("bob");
    let code = qq_code(&emu, "bob").await;
    let (status, _, _) = get(&qq_token_url(&emu, &code, &[])).await;
    assert_eq!(status, StatusCode::OK);

    let (status, content_type, body) = get(&qq_token_url(&emu, &code, &[])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/html");
    assert_eq!(body, qq_jsonp_error(100020, "code is reused error"));

    let (_, _, body) = get(&qq_token_url(&emu, "0123456789ABCDEF0123456789ABCDEF", &[])).await;
    assert_eq!(body, qq_jsonp_error(100019, "code to access token error"));

    emu.expire_codes();
    let code = qq_code(&emu, "bob").await;
    emu.expire_codes();
    let (_, _, body) = get(&qq_token_url(&emu, &code, &[])).await;
    assert_eq!(body, qq_jsonp_error(100019, "code to access token error"));

    let code = qq_code(&emu, "bob").await;
    let bad_secret = with_query(
        &emu.base_url,
        qq::TOKEN_PATH,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", qq::APP_ID),
            ("client_secret", "wrong"),
        ],
    );
    let (_, _, body) = get(&bad_secret).await;
    assert_eq!(body, qq_jsonp_error(100009, "client secret is illegal"));
    assert!(
        emu.violations().is_empty(),
        "a bad secret is not a shape problem"
    );

    let bad_grant = qq_token_url(&emu, &code, &[]).replace("authorization_code", "code");
    let (_, _, body) = get(&bad_grant).await;
    assert_eq!(
        body,
        qq_jsonp_error(100004, "param grant_type is wrong or lost ")
    );
    assert_eq!(emu.violations().len(), 1);
}

#[tokio::test]
async fn qq_fmt_json_and_post_form() {
    let emu = QqEmulator::start().await;
    emu.add_user("carol");
    let code = qq_code(&emu, "carol").await;
    let (status, _, body) = get(&qq_token_url(&emu, &code, &[("fmt", "json")])).await;
    assert_eq!(status, StatusCode::OK);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["expires_in"], "7776000", "a string, as QQ sends it");
    let access = doc["access_token"].as_str().unwrap().to_string();
    assert_eq!(
        body,
        format!(
            "{{\"access_token\":\"{access}\",\"expires_in\":\"7776000\",\"refresh_token\":\"{}\"}}",
            doc["refresh_token"].as_str().unwrap()
        )
    );
    // fmt=json errors are bare JSON.
    let (_, _, body) = get(&qq_token_url(&emu, &code, &[("fmt", "json")])).await;
    assert_eq!(
        body,
        r#"{"error":100020,"error_description":"code is reused error"}"#
    );
    let (_, _, body) = get(&with_query(
        &emu.base_url,
        qq::ME_PATH,
        &[("access_token", &access), ("fmt", "json")],
    ))
    .await;
    let openid = emu.user("carol").unwrap().openid;
    assert_eq!(
        body,
        format!("{{\"client_id\":\"101518219\",\"openid\":\"{openid}\"}}")
    );

    // SC posts a form body: accepted.
    let code = qq_code(&emu, "carol").await;
    let response = client()
        .post(emu.url(qq::TOKEN_PATH))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
            ("client_id", qq::APP_ID),
            ("client_secret", qq::APP_KEY),
        ])
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("access_token="), "{body}");
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn qq_refresh_tokens_work_once() {
    let emu = QqEmulator::start().await;
    emu.add_user("dave");
    let (access, refresh) = emu.issue_tokens("dave");
    let refresh = refresh.unwrap();
    assert!(emu.access_token_valid(&access));
    let url = |rt: &str| {
        with_query(
            &emu.base_url,
            qq::TOKEN_PATH,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", rt),
                ("client_id", qq::APP_ID),
                ("client_secret", qq::APP_KEY),
            ],
        )
    };
    let (status, _, body) = get(&url(&refresh)).await;
    assert_eq!(status, StatusCode::OK);
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let next = param(&pairs, "refresh_token");
    assert_ne!(next, refresh);
    assert!(emu.access_token_valid(&param(&pairs, "access_token")));

    let (status, _, body) = get(&url(&refresh)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, qq_jsonp_error(100021, "get token failed"));
    let (_, _, body) = get(&url(&next)).await;
    assert!(
        body.starts_with("access_token="),
        "the new one works: {body}"
    );

    let steps: Vec<Step> = emu.requests().iter().map(|r| r.step).collect();
    assert_eq!(steps, [Step::Refresh; 3]);
    assert_eq!(emu.requests()[0].param("refresh_token"), Some("<redacted>"));
}

#[tokio::test]
async fn qq_me_unionid_and_bad_tokens() {
    let emu = QqEmulator::start().await;
    emu.add_user("erin");
    let (access, _) = emu.issue_tokens("erin");
    let user = emu.user("erin").unwrap();
    let me = |extra: &[(&str, &str)]| {
        let mut pairs = vec![("access_token", access.as_str())];
        pairs.extend_from_slice(extra);
        with_query(&emu.base_url, qq::ME_PATH, &pairs)
    };
    let (_, _, body) = get(&me(&[("unionid", "1")])).await;
    assert_eq!(
        body,
        format!(
            "callback( {{\"client_id\":\"101518219\",\"openid\":\"{}\",\"unionid\":\"{}\"}} );\n",
            user.openid, user.unionid
        )
    );
    assert_eq!(user.unionid, emu.union_id_of("erin"));
    assert!(user.unionid.starts_with("UID_") && user.unionid.len() == 36);

    emu.set_union_id_enabled(false);
    let (_, _, body) = get(&me(&[("unionid", "1")])).await;
    assert_eq!(body, qq_jsonp_error(100048, "companyid not set"));

    let (_, _, body) = get(&with_query(
        &emu.base_url,
        qq::ME_PATH,
        &[("access_token", "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF")],
    ))
    .await;
    assert_eq!(body, qq_jsonp_error(100016, "access token check failed"));

    // get_user_info: ret/msg errors with HTTP 200.
    let info = |token: &str, openid: &str| {
        with_query(
            &emu.base_url,
            qq::USER_INFO_PATH,
            &[
                ("access_token", token),
                ("oauth_consumer_key", qq::APP_ID),
                ("openid", openid),
            ],
        )
    };
    let (status, _, body) = get(&info("BAD", &user.openid)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, r#"{"ret":1002,"msg":"请先登录"}"#);
    assert!(emu.violations().is_empty());
    let (_, _, body) = get(&info(&access, "0000")).await;
    assert_eq!(
        body,
        r#"{"ret":-1,"msg":"client request's parameters are invalid, invalid openid"}"#
    );
    assert_eq!(emu.violations().len(), 1, "{:?}", emu.violations());
}

#[tokio::test]
async fn qq_avatar_fields_follow_the_user() {
    let emu = QqEmulator::start().await;
    for (seed, avatars, present, absent) in [
        (
            "f1",
            QqAvatars::Full,
            vec!["figureurl_qq", "figureurl_qq_2"],
            vec![],
        ),
        (
            "f2",
            QqAvatars::Without640,
            vec!["figureurl_qq_2"],
            vec!["figureurl_qq"],
        ),
        (
            "f3",
            QqAvatars::QzoneOnly,
            vec![],
            vec!["figureurl_qq", "figureurl_qq_2"],
        ),
    ] {
        let expected = emu.add_user_with(seed, avatars);
        let (access, _) = emu.issue_tokens(seed);
        let openid = expected.subject.clone();
        let (_, _, body) = get(&with_query(
            &emu.base_url,
            qq::USER_INFO_PATH,
            &[
                ("access_token", &access),
                ("oauth_consumer_key", qq::APP_ID),
                ("openid", &openid),
            ],
        ))
        .await;
        let user: Value = serde_json::from_str(&body).unwrap();
        for key in present {
            assert!(user.get(key).is_some(), "{seed}: {key} missing");
        }
        for key in absent {
            assert!(user.get(key).is_none(), "{seed}: {key} present");
        }
        for key in ["figureurl", "figureurl_1", "figureurl_2", "figureurl_qq_1"] {
            assert!(user.get(key).is_some(), "{seed}: {key} always present");
        }
        let want = match avatars {
            QqAvatars::Full => &user["figureurl_qq"],
            QqAvatars::Without640 => &user["figureurl_qq_2"],
            QqAvatars::QzoneOnly => &user["figureurl_2"],
        };
        assert_eq!(want, expected.avatar_url.as_str());
    }
}

#[tokio::test]
async fn qq_authorize_url_checks() {
    let emu = QqEmulator::start().await;
    emu.add_user("gina");
    let bad = [
        build_url(
            &emu.base_url,
            qq::AUTHORIZE_PATH,
            &[
                ("appid", qq::APP_ID),
                ("redirect_uri", REDIRECT),
                ("response_type", "code"),
                ("state", STATE),
            ],
            None,
        ),
        qq_authorize(&emu, &[]).replace("get_user_info", "get_user_info+list_album"),
        qq_authorize(
            &emu,
            &[("code_challenge", "abc"), ("code_challenge_method", "S256")],
        ),
        qq_authorize(&emu, &[]).replace("response_type=code", "response_type=token"),
        qq_authorize(&emu, &[]).replace("state=", "x="),
        qq_authorize(&emu, &[]).replace("app.example.com", "evil.example.com"),
        qq_authorize(&emu, &[]).replace(qq::AUTHORIZE_PATH, "/oauth2.0/authorise"),
    ];
    for (i, url) in bad.iter().enumerate() {
        assert!(emu.approve(url, "gina").is_err(), "{url}");
        assert_eq!(emu.violations().len(), i + 1);
    }
    // Comma-separated scopes and no scope at all are fine.
    let ok = qq_authorize(&emu, &[]).replace("get_user_info", "get_user_info%2Clist_album");
    emu.approve(&ok, "gina").unwrap();
    assert!(emu.approve(&qq_authorize(&emu, &[]), "nobody").is_err());
    assert_eq!(
        emu.violations().len(),
        bad.len(),
        "an unknown user is no violation"
    );
    assert!(emu.deny(&qq_authorize(&emu, &[])).is_none());
    let caps = emu.capabilities();
    assert!(caps.refresh && caps.refresh_single_use && caps.errors_with_http_200);
    assert!(!caps.pkce && !caps.deny_redirects && !caps.revoke);
}

#[tokio::test]
async fn qq_shape_violations_are_recorded() {
    let emu = QqEmulator::start().await;
    emu.add_user("hank");
    let code = qq_code(&emu, "hank").await;
    // No redirect_uri: QQ requires it.
    let url = with_query(
        &emu.base_url,
        qq::TOKEN_PATH,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("client_id", qq::APP_ID),
            ("client_secret", qq::APP_KEY),
        ],
    );
    let (_, _, body) = get(&url).await;
    assert!(body.contains("100010"), "{body}");
    // A JSON body and a PUT.
    let response = client()
        .put(emu.url(qq::TOKEN_PATH))
        .json(&json!({"grant_type": "authorization_code", "code": code}))
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        qq_jsonp_error(100004, "param grant_type is wrong or lost ")
    );
    let violations = emu.violations();
    assert!(
        violations.iter().any(|v| v.contains("redirect_uri")),
        "{violations:?}"
    );
    assert!(
        violations.iter().any(|v| v.contains("JSON body")),
        "{violations:?}"
    );
    assert!(
        violations.iter().any(|v| v.contains("QQ takes GET")),
        "{violations:?}"
    );
    let json_request = last(&emu.requests()).clone();
    assert_eq!(json_request.param("code"), Some("<redacted>"));
    assert_eq!(json_request.method, "PUT");
}

#[tokio::test]
async fn qq_numbers_as_strings_and_faults() {
    let emu = QqEmulator::start().await;
    emu.add_user("ivy");
    let (access, _) = emu.issue_tokens("ivy");
    let openid = emu.user("ivy").unwrap().openid;
    emu.set_numbers_as_strings(true);
    let (_, _, body) = get(&qq_token_url(&emu, "NOPE", &[])).await;
    assert_eq!(
        body,
        "callback( {\"error\":\"100019\",\"error_description\":\"code to access token error\"} );\n"
    );
    let (_, _, body) = get(&with_query(
        &emu.base_url,
        qq::USER_INFO_PATH,
        &[
            ("access_token", &access),
            ("oauth_consumer_key", qq::APP_ID),
            ("openid", &openid),
        ],
    ))
    .await;
    assert!(
        body.starts_with("{\"ret\":\"0\",\"msg\":\"\",\"is_lost\":\"0\""),
        "{body}"
    );
    emu.set_numbers_as_strings(false);

    emu.set_fault(Step::Identity, Fault::Status503);
    let (status, _, _) = get(&with_query(
        &emu.base_url,
        qq::ME_PATH,
        &[("access_token", &access)],
    ))
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(last(&emu.requests()).status, 503);
    // The token endpoint is unaffected; refresh faults are separate.
    emu.set_fault(Step::Refresh, Fault::Garbage);
    let (status, _, body) = get(&qq_token_url(&emu, "NOPE", &[])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("callback("));
    emu.clear_faults();
    let (_, _, body) = get(&with_query(
        &emu.base_url,
        qq::ME_PATH,
        &[("access_token", &access)],
    ))
    .await;
    assert!(body.contains(&openid));

    emu.set_fault_times(Step::Token, Fault::Status500, 1);
    let (status, _, _) = get(&qq_token_url(&emu, "NOPE", &[])).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let (status, _, _) = get(&qq_token_url(&emu, "NOPE", &[])).await;
    assert_eq!(status, StatusCode::OK);
}

// ---------------------------------------------------------------------------
// WeChat

fn wx_authorize(emu: &WechatEmulator) -> String {
    build_url(
        &emu.base_url,
        wechat::AUTHORIZE_PATH,
        &[
            ("appid", wechat::APP_ID),
            ("redirect_uri", REDIRECT),
            ("response_type", "code"),
            ("scope", "snsapi_login"),
            ("state", STATE),
        ],
        Some("wechat_redirect"),
    )
}

fn wx_token_url(emu: &WechatEmulator, code: &str) -> String {
    with_query(
        &emu.base_url,
        wechat::TOKEN_PATH,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("appid", wechat::APP_ID),
            ("secret", wechat::APP_SECRET),
        ],
    )
}

/// `{"errcode":N,"errmsg":"<message>, rid: xxxxxxxx-xxxxxxxx-xxxxxxxx"}`.
fn assert_wx_error(body: &str, code: i64, message: &str) {
    let prefix = format!("{{\"errcode\":{code},\"errmsg\":\"{message}, rid: ");
    assert!(body.starts_with(&prefix), "{body}");
    let rid = body[prefix.len()..].strip_suffix("\"}").unwrap();
    assert_eq!(rid.len(), 26, "{rid}");
}

#[tokio::test]
async fn wechat_login_answers() {
    let emu = WechatEmulator::start().await;
    let expected = emu.add_user("alice");
    let user = emu.user("alice").unwrap();
    assert_eq!(user.openid.len(), 28);
    assert!(user.openid.starts_with("oH9d2v"));
    assert_eq!(user.unionid.len(), 28);
    assert_eq!(expected.union_id, user.unionid);
    assert_eq!(expected.subject, user.openid);

    let back = emu.approve(&wx_authorize(&emu), "alice").unwrap();
    assert_eq!(param(&back, "state"), STATE);
    let code = param(&back, "code");
    assert_eq!(code.len(), 32);
    let (status, content_type, body) = get(&wx_token_url(&emu, &code)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/plain");
    assert!(!body.contains("errcode"));
    let doc: Value = serde_json::from_str(&body).unwrap();
    let access = doc["access_token"].as_str().unwrap();
    assert!(access.starts_with("78_"));
    assert_eq!(
        body,
        format!(
            "{{\"access_token\":\"{access}\",\"expires_in\":7200,\"refresh_token\":\"{}\",\"openid\":\"{}\",\"scope\":\"snsapi_login\",\"unionid\":\"{}\"}}",
            doc["refresh_token"].as_str().unwrap(),
            user.openid,
            user.unionid
        )
    );

    let (status, content_type, body) = get(&with_query(
        &emu.base_url,
        wechat::USER_INFO_PATH,
        &[("access_token", access), ("openid", &user.openid)],
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/plain");
    let escaped = user.headimgurl.replace('/', "\\/");
    assert!(escaped.starts_with("https:\\/\\/thirdwx.qlogo.cn\\/mmopen\\/vi_32\\/"));
    assert_eq!(
        body,
        format!(
            "{{\"openid\":\"{}\",\"nickname\":\"摇一摇-alice\",\"sex\":0,\"language\":\"\",\"city\":\"\",\"province\":\"\",\"country\":\"\",\"headimgurl\":\"{escaped}\",\"privilege\":[],\"unionid\":\"{}\"}}",
            user.openid, user.unionid
        )
    );
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["headimgurl"], expected.avatar_url.as_str());
    assert_eq!(expected.display_name, "摇一摇-alice");
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
    let token = &emu.requests()[0];
    assert_eq!(token.param("secret"), Some("<redacted>"));
    assert_eq!(token.param("appid"), Some(wechat::APP_ID));
}

#[tokio::test]
async fn wechat_errors() {
    let emu = WechatEmulator::start().await;
    emu.add_user("bob");
    let code = param(&emu.approve(&wx_authorize(&emu), "bob").unwrap(), "code");
    get(&wx_token_url(&emu, &code)).await;
    let (status, content_type, body) = get(&wx_token_url(&emu, &code)).await;
    assert_eq!(
        (status, content_type.as_str()),
        (StatusCode::OK, "text/plain")
    );
    assert_wx_error(&body, 40163, "code been used");
    let (_, _, body) = get(&wx_token_url(&emu, "0nope")).await;
    assert_wx_error(&body, 40029, "invalid code");
    let (_, _, body) = get(&wx_token_url(&emu, "x").replace(wechat::APP_SECRET, "bad")).await;
    assert_wx_error(&body, 40125, "invalid appsecret");
    let (_, _, body) =
        get(&wx_token_url(&emu, "x").replace(wechat::APP_ID, "wx0000000000000000")).await;
    assert_wx_error(&body, 40013, "invalid appid");
    assert!(emu.violations().is_empty());

    // OAuth2's standard names instead of WeChat's.
    let (_, _, body) = get(&wx_token_url(&emu, "x").replace("appid=", "client_id=")).await;
    assert_wx_error(&body, 41002, "appid missing");
    assert_eq!(emu.violations().len(), 1);
    assert!(emu.violations()[0].contains("client_id"));

    let (access, _) = emu.issue_tokens("bob");
    let openid = emu.user("bob").unwrap().openid;
    let info = |token: &str, openid: &str| {
        with_query(
            &emu.base_url,
            wechat::USER_INFO_PATH,
            &[("access_token", token), ("openid", openid)],
        )
    };
    let (_, _, body) = get(&info(&access, "oSomeoneElse")).await;
    assert_eq!(body, r#"{"errcode":40003,"errmsg":"invalid openid"}"#);
    assert_eq!(emu.violations().len(), 2);
    emu.expire_access_token(&access);
    assert!(!emu.access_token_valid(&access));
    let (_, _, body) = get(&info(&access, &openid)).await;
    assert_eq!(body, r#"{"errcode":42001,"errmsg":"access_token expired"}"#);
    let (_, _, body) = get(&info("78_unknown", &openid)).await;
    assert_wx_error(
        &body,
        40001,
        "invalid credential, access_token is invalid or not latest",
    );

    // The fragment is mandatory; so is snsapi_login.
    assert!(
        emu.approve(&wx_authorize(&emu).replace("#wechat_redirect", ""), "bob")
            .is_err()
    );
    assert!(
        emu.approve(
            &wx_authorize(&emu).replace("snsapi_login", "snsapi_userinfo"),
            "bob"
        )
        .is_err()
    );
    assert!(
        emu.approve(&wx_authorize(&emu).replace("appid=", "client_id="), "bob")
            .is_err()
    );
    assert_eq!(emu.violations().len(), 5);
    assert!(emu.deny(&wx_authorize(&emu)).is_none());
}

#[tokio::test]
async fn wechat_refresh_keeps_the_refresh_token() {
    let emu = WechatEmulator::start().await;
    emu.add_user("carol");
    let (access, refresh) = emu.issue_tokens("carol");
    let refresh = refresh.unwrap();
    let url = with_query(
        &emu.base_url,
        wechat::REFRESH_PATH,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("appid", wechat::APP_ID),
        ],
    );
    let (status, _, body) = get(&url).await;
    assert_eq!(status, StatusCode::OK);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        doc["access_token"],
        access.as_str(),
        "still valid: same token"
    );
    assert_eq!(doc["refresh_token"], refresh.as_str());
    assert_eq!(doc["expires_in"], 7200);
    assert!(doc.get("unionid").is_none());
    assert!(!body.contains("errcode"));

    emu.expire_access_token(&access);
    let (_, _, body) = get(&url).await;
    let doc: Value = serde_json::from_str(&body).unwrap();
    let fresh = doc["access_token"].as_str().unwrap();
    assert_ne!(fresh, access);
    assert!(emu.access_token_valid(fresh));
    assert_eq!(
        emu.requests()
            .iter()
            .filter(|r| r.step == Step::Refresh)
            .count(),
        2
    );

    let (_, _, body) = get(&url.replace(&refresh, "78_nope")).await;
    assert_eq!(
        body,
        r#"{"errcode":40030,"errmsg":"invalid refresh_token"}"#
    );
    assert!(emu.violations().is_empty());
    // The refresh call takes no secret.
    get(&format!("{url}&secret={}", wechat::APP_SECRET)).await;
    assert_eq!(emu.violations().len(), 1);
    let caps = emu.capabilities();
    assert!(caps.refresh && !caps.refresh_single_use && caps.errors_with_http_200);
}

#[tokio::test]
async fn wechat_numbers_as_strings_unionid_and_faults() {
    let emu = WechatEmulator::start().await;
    emu.set_unionid_enabled(false);
    let expected = emu.add_user("dave");
    assert_eq!(expected.union_id, "");
    emu.set_numbers_as_strings(true);
    let code = param(&emu.approve(&wx_authorize(&emu), "dave").unwrap(), "code");
    let (_, _, body) = get(&wx_token_url(&emu, &code)).await;
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["expires_in"], "7200");
    assert!(doc.get("unionid").is_none());
    let (_, _, body) = get(&wx_token_url(&emu, &code)).await;
    assert!(body.starts_with("{\"errcode\":\"40163\","), "{body}");
    emu.set_numbers_as_strings(false);

    emu.set_fault(Step::Token, Fault::Garbage);
    let (status, _, body) = get(&wx_token_url(&emu, &code)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, crate::support::faults::GARBAGE_BODY);
    assert_eq!(last(&emu.requests()).step, Step::Token);
    emu.clear_faults();
    let (_, _, body) = get(&wx_token_url(&emu, &code)).await;
    assert!(body.contains("40163"));
}

// ---------------------------------------------------------------------------
// Weibo

fn wb_authorize(emu: &WeiboEmulator, scope: Option<&str>) -> String {
    let mut pairs = vec![
        ("client_id", weibo::APP_KEY),
        ("redirect_uri", REDIRECT),
        ("response_type", "code"),
    ];
    if let Some(scope) = scope {
        pairs.push(("scope", scope));
    }
    pairs.push(("state", STATE));
    build_url(&emu.base_url, weibo::AUTHORIZE_PATH, &pairs, None)
}

fn wb_form(code: &str) -> Vec<(&'static str, String)> {
    vec![
        ("grant_type", "authorization_code".into()),
        ("code", code.into()),
        ("redirect_uri", REDIRECT.into()),
        ("client_id", weibo::APP_KEY.into()),
        ("client_secret", weibo::APP_SECRET.into()),
    ]
}

async fn wb_post_form(
    emu: &WeiboEmulator,
    form: &[(&str, String)],
) -> (StatusCode, String, String) {
    answer(
        client()
            .post(emu.url(weibo::TOKEN_PATH))
            .form(form)
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn weibo_login_answers() {
    let emu = WeiboEmulator::start().await;
    let expected = emu.add_user("alice");
    let user = emu.user("alice").unwrap();
    assert_eq!(user.uid.to_string().len(), 10);
    assert_eq!(expected.subject, user.uid.to_string());
    assert_eq!(expected.username, "晴天小猪_alice");
    let code = param(
        &emu.approve(&wb_authorize(&emu, None), "alice").unwrap(),
        "code",
    );
    assert!(is_hex(&code, 32, false));
    let (status, content_type, body) = wb_post_form(&emu, &wb_form(&code)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/plain;charset=UTF-8");
    let doc: Value = serde_json::from_str(&body).unwrap();
    let access = doc["access_token"].as_str().unwrap();
    assert!(access.starts_with("2.00") && access.len() == 32);
    assert_eq!(
        body,
        format!(
            "{{\"access_token\":\"{access}\",\"remind_in\":\"157679999\",\"expires_in\":157679999,\"uid\":\"{}\",\"isRealName\":\"true\"}}",
            user.uid
        )
    );

    let (status, _, body) = get(&with_query(
        &emu.base_url,
        weibo::SHOW_PATH,
        &[("access_token", access), ("uid", &user.uid.to_string())],
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.starts_with(&format!(
            "{{\"id\":{},\"idstr\":\"{}\",",
            user.uid, user.uid
        )),
        "{body}"
    );
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["screen_name"], "晴天小猪_alice");
    assert_eq!(doc["avatar_hd"], expected.avatar_url.as_str());
    assert!(doc["avatar_large"].is_string());
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
    assert_eq!(emu.requests()[0].method, "POST");
    assert_eq!(emu.requests()[0].param("code"), Some("<redacted>"));

    // JA: the query string with an empty body.
    let code = param(
        &emu.approve(&wb_authorize(&emu, Some("all,email")), "alice")
            .unwrap(),
        "code",
    );
    let form = wb_form(&code);
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let response = client()
        .post(with_query(&emu.base_url, weibo::TOKEN_PATH, &pairs))
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.ends_with(",\"isRealName\":\"true\",\"scope\":\"all,email\"}"),
        "{body}"
    );
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn weibo_errors_are_400_and_echo_the_code() {
    let emu = WeiboEmulator::start().await;
    emu.add_user("bob");
    let code = param(
        &emu.approve(&wb_authorize(&emu, None), "bob").unwrap(),
        "code",
    );
    wb_post_form(&emu, &wb_form(&code)).await;
    let (status, _, body) = wb_post_form(&emu, &wb_form(&code)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        format!(
            "{{\"error\":\"invalid_grant\",\"error_code\":21325,\"request\":\"/oauth2/access_token\",\"error_uri\":\"/oauth2/access_token\",\"error_description\":\"invalid authorization code:{code}\"}}"
        )
    );
    let mut form = wb_form("x");
    form[3].1 = "1234567890".into();
    let (status, _, body) = wb_post_form(&emu, &form).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["error"], "invalid_client");
    assert_eq!(doc["error_code"], 21324);
    assert!(emu.violations().is_empty());

    // A JSON body: 21323, and a violation.
    let response = client()
        .post(emu.url(weibo::TOKEN_PATH))
        .json(&json!({"client_id": weibo::APP_KEY, "client_secret": weibo::APP_SECRET}))
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("\"error_code\":21323") && body.contains("miss client id or secret"));
    assert_eq!(emu.violations().len(), 1);
    // GET is refused too.
    let (status, _, _) = get(&with_query(
        &emu.base_url,
        weibo::TOKEN_PATH,
        &[("code", "x")],
    ))
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(emu.violations().len(), 2);

    let (status, content_type, body) = get(&with_query(
        &emu.base_url,
        weibo::SHOW_PATH,
        &[("access_token", "2.00bad"), ("uid", "1234567890")],
    ))
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(content_type, "application/json;charset=UTF-8");
    assert_eq!(
        body,
        r#"{"error":"invalid_access_token","error_code":21332,"request":"/2/users/show.json"}"#
    );
    let caps = emu.capabilities();
    assert!(!caps.refresh && !caps.errors_with_http_200 && caps.deny_redirects);
    let (access, refresh) = emu.issue_tokens("bob");
    assert!(refresh.is_none() && emu.access_token_valid(&access));
}

#[tokio::test]
async fn weibo_authorize_deny_and_number_knobs() {
    let emu = WeiboEmulator::start().await;
    emu.add_user("carol");
    assert!(
        emu.approve(&wb_authorize(&emu, Some("all email")), "carol")
            .is_err()
    );
    assert!(
        emu.approve(&wb_authorize(&emu, Some("bogus")), "carol")
            .is_err()
    );
    assert_eq!(emu.violations().len(), 2);
    let denied = emu.deny(&wb_authorize(&emu, None)).unwrap();
    assert_eq!(param(&denied, "error"), "access_denied");
    assert_eq!(param(&denied, "error_code"), "21330");
    assert_eq!(param(&denied, "state"), STATE);

    let uid = emu.user("carol").unwrap().uid;
    emu.set_uid_as_number(true);
    let code = param(
        &emu.approve(&wb_authorize(&emu, None), "carol").unwrap(),
        "code",
    );
    let (_, _, body) = wb_post_form(&emu, &wb_form(&code)).await;
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["uid"], uid);
    assert_eq!(doc["remind_in"], "157679999");

    emu.set_numbers_as_strings(true);
    let code = param(
        &emu.approve(&wb_authorize(&emu, None), "carol").unwrap(),
        "code",
    );
    let (_, _, body) = wb_post_form(&emu, &wb_form(&code)).await;
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["uid"], uid.to_string());
    assert_eq!(doc["expires_in"], "157679999");
    let (_, _, body) = get(&with_query(
        &emu.base_url,
        weibo::SHOW_PATH,
        &[
            ("access_token", doc["access_token"].as_str().unwrap()),
            ("uid", &uid.to_string()),
        ],
    ))
    .await;
    let user: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(user["id"], uid.to_string());
    let (_, _, body) = wb_post_form(&emu, &wb_form(&code)).await;
    assert!(body.contains("\"error_code\":\"21325\""), "{body}");

    emu.set_fault(Step::Identity, Fault::Status500);
    let (status, _, _) = get(&with_query(
        &emu.base_url,
        weibo::SHOW_PATH,
        &[("access_token", "x"), ("uid", "1")],
    ))
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(last(&emu.requests()).status, 500);
}

// ---------------------------------------------------------------------------
// Gitee

fn ge_authorize(emu: &GiteeEmulator, scope: &str) -> String {
    build_url(
        &emu.base_url,
        gitee::AUTHORIZE_PATH,
        &[
            ("client_id", gitee::CLIENT_ID),
            ("redirect_uri", REDIRECT),
            ("response_type", "code"),
            ("scope", scope),
            ("state", STATE),
        ],
        None,
    )
}

fn ge_form(code: &str) -> Vec<(&'static str, String)> {
    vec![
        ("grant_type", "authorization_code".into()),
        ("code", code.into()),
        ("redirect_uri", REDIRECT.into()),
        ("client_id", gitee::CLIENT_ID.into()),
        ("client_secret", gitee::CLIENT_SECRET.into()),
    ]
}

async fn ge_post(emu: &GiteeEmulator, form: &[(&str, String)]) -> (StatusCode, String, String) {
    answer(
        client()
            .post(emu.url(gitee::TOKEN_PATH))
            .form(form)
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn gitee_login_answers() {
    let emu = GiteeEmulator::start().await;
    let expected = emu.add_user("Alice");
    let user = emu.user("Alice").unwrap();
    assert_eq!(expected.subject, user.id.to_string());
    assert_eq!(expected.username, user.login);
    assert!(user.login.starts_with("alice-"));
    let code = param(
        &emu.approve(&ge_authorize(&emu, "user_info"), "Alice")
            .unwrap(),
        "code",
    );
    assert!(is_hex(&code, 64, false));
    let (status, content_type, body) = ge_post(&emu, &ge_form(&code)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/json; charset=utf-8");
    let doc: Value = serde_json::from_str(&body).unwrap();
    let access = doc["access_token"].as_str().unwrap();
    assert!(is_hex(access, 32, false));
    assert!(is_hex(doc["refresh_token"].as_str().unwrap(), 64, false));
    let created_at = doc["created_at"].as_i64().unwrap();
    assert_eq!(
        body,
        format!(
            "{{\"access_token\":\"{access}\",\"token_type\":\"bearer\",\"expires_in\":86400,\"refresh_token\":\"{}\",\"scope\":\"user_info\",\"created_at\":{created_at}}}",
            doc["refresh_token"].as_str().unwrap()
        )
    );

    let (status, _, body) = get(&with_query(
        &emu.base_url,
        gitee::USER_PATH,
        &[("access_token", access)],
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with(&format!(
        "{{\"id\":{},\"login\":\"{}\",",
        user.id, user.login
    )));
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["name"], "码云小蜜蜂-Alice");
    assert_eq!(doc["avatar_url"], expected.avatar_url.as_str());
    assert_eq!(
        doc["following_url"],
        format!(
            "https://gitee.com/api/v5/users/{}/following_url{{/other_user}}",
            user.login
        )
        .as_str()
    );
    match &user.email {
        Some(email) => assert_eq!(doc["email"], email.as_str()),
        None => assert!(doc["email"].is_null()),
    }
    assert_eq!(expected.email, user.email.clone().unwrap_or_default());
    assert!(!expected.email_verified);

    // No `emails` scope: the emails call is refused and flagged.
    let (status, _, _) = get(&with_query(
        &emu.base_url,
        gitee::EMAILS_PATH,
        &[("access_token", access)],
    ))
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(emu.violations().len(), 1);
    let steps: Vec<(Step, u16)> = emu.requests().iter().map(|r| (r.step, r.status)).collect();
    assert_eq!(
        steps,
        [
            (Step::Token, 200),
            (Step::Identity, 200),
            (Step::Identity, 403)
        ]
    );
}

#[tokio::test]
async fn gitee_emails_scope_query_params_and_refresh() {
    let emu = GiteeEmulator::start().await;
    emu.add_user("bob");
    let with_emails = emu.expected_with_emails("bob");
    let code = param(
        &emu.approve(&ge_authorize(&emu, "user_info emails"), "bob")
            .unwrap(),
        "code",
    );
    // JA/CD: everything in the query, POST with no body.
    let form = ge_form(&code);
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let response = client()
        .post(with_query(&emu.base_url, gitee::TOKEN_PATH, &pairs))
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, StatusCode::OK);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["scope"], "user_info emails");
    let access = doc["access_token"].as_str().unwrap();
    let (status, _, body) = get(&with_query(
        &emu.base_url,
        gitee::EMAILS_PATH,
        &[("access_token", access)],
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    let emails: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(emails[0]["email"], with_emails.email.as_str());
    assert_eq!(emails[0]["state"], "confirmed");
    assert_eq!(emails[0]["scope"], json!(["primary", "notified"]));
    assert_eq!(emails[1]["state"], "unconfirmed");
    assert!(with_emails.email_verified);

    // Refresh: no client credentials, form body.
    let refresh = doc["refresh_token"].as_str().unwrap();
    let (status, _, body) = ge_post(
        &emu,
        &[
            ("grant_type", "refresh_token".into()),
            ("refresh_token", refresh.into()),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let next: Value = serde_json::from_str(&body).unwrap();
    assert_ne!(next["access_token"], doc["access_token"]);
    assert_eq!(next["scope"], "user_info emails");
    assert_eq!(last(&emu.requests()).step, Step::Refresh);
    let (status, _, body) = ge_post(
        &emu,
        &[
            ("grant_type", "refresh_token".into()),
            ("refresh_token", "0".repeat(64)),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body,
        format!(
            "{{\"error\":\"invalid_grant\",\"error_description\":\"{}\"}}",
            gitee::INVALID_GRANT
        )
    );
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}

#[tokio::test]
async fn gitee_errors() {
    let emu = GiteeEmulator::start().await;
    emu.add_user("carol");
    let code = param(
        &emu.approve(&ge_authorize(&emu, "user_info"), "carol")
            .unwrap(),
        "code",
    );
    ge_post(&emu, &ge_form(&code)).await;
    let (status, _, body) = ge_post(&emu, &ge_form(&code)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body,
        "{\"error\":\"invalid_grant\",\"error_description\":\"授权方式无效，或者登录回调地址无效、过期或已被撤销\"}"
    );
    let mut form = ge_form("x");
    form[4].1 = "wrong".into();
    let (status, _, body) = ge_post(&emu, &form).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("invalid_client"));
    assert!(emu.violations().is_empty());

    let (status, _, body) = get(&with_query(
        &emu.base_url,
        gitee::USER_PATH,
        &[("access_token", "nope")],
    ))
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, gitee::BAD_TOKEN_BODY);

    // No User-Agent: 403 and a violation.
    let bare = reqwest::Client::new();
    let response = bare
        .post(emu.url(gitee::TOKEN_PATH))
        .form(&ge_form("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(emu.violations().len(), 1);
    assert!(emu.violations()[0].contains("User-Agent"));

    // Comma-separated scopes are refused at the browser step.
    assert!(
        emu.approve(&ge_authorize(&emu, "user_info,emails"), "carol")
            .is_err()
    );
    assert_eq!(emu.violations().len(), 2);
    let denied = emu.deny(&ge_authorize(&emu, "user_info")).unwrap();
    assert_eq!(param(&denied, "error"), "access_denied");
    assert_eq!(param(&denied, "state"), STATE);

    emu.set_numbers_as_strings(true);
    let (access, _) = emu.issue_tokens("carol");
    let (_, _, body) = get(&with_query(
        &emu.base_url,
        gitee::USER_PATH,
        &[("access_token", &access)],
    ))
    .await;
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["id"], emu.user("carol").unwrap().id.to_string());
    let code = param(
        &emu.approve(&ge_authorize(&emu, "user_info"), "carol")
            .unwrap(),
        "code",
    );
    let (_, _, body) = ge_post(&emu, &ge_form(&code)).await;
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["expires_in"], "86400");
    assert!(doc["created_at"].is_string());

    emu.set_fault(Step::Refresh, Fault::Status503);
    let (status, _, _) = ge_post(
        &emu,
        &[
            ("grant_type", "refresh_token".into()),
            ("refresh_token", "x".into()),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let caps = emu.capabilities();
    assert!(caps.refresh && !caps.refresh_single_use && !caps.errors_with_http_200);
}

// ---------------------------------------------------------------------------
// authbroker's own engine against each emulator: the presets and the
// emulators must agree, with no violations.

async fn engine_login(emu: &dyn Emulator, seed: &str) -> ExpectedIdentity {
    let expected = emu.add_user(seed);
    engine_login_with(emu, seed, emu.provider_config(), expected).await
}

/// A login through the engine with `config`, which must report `expected`.
async fn engine_login_with(
    emu: &dyn Emulator,
    seed: &str,
    config: ProviderConfig,
    expected: ExpectedIdentity,
) -> ExpectedIdentity {
    let name = emu.kind();
    let configs = BTreeMap::from([(name.to_string(), config)]);
    let http = HttpClient::new(&HttpSettings::default()).unwrap();
    let registry = Registry::build(&configs, &http, None).expect("the emulator's config builds");
    let provider = registry.get(name).expect("provider registered").clone();
    let info = provider.info().clone();
    let now = time::OffsetDateTime::now_utc();
    let login = PendingLogin {
        state: StateToken::generate().unwrap(),
        provider: Arc::from(name),
        redirect_uri: info.redirect_uris[0].clone(),
        scopes: info.scopes.clone(),
        return_to: None,
        // Offered, but none of these presets may send it.
        pkce: Some(PkceVerifier::generate().unwrap()),
        nonce: None,
        created_at: now,
        expires_at: now + time::Duration::minutes(10),
    };
    let url = provider
        .authorize_url(&login, &AuthorizeParams::default())
        .await
        .unwrap();
    let back = emu.approve(url.as_str(), seed).unwrap();
    assert_eq!(param(&back, "state"), login.state.as_str());
    let tokens = provider
        .exchange_code(&param(&back, "code"), &login, &CallbackParams::default())
        .await
        .unwrap();
    let identity = provider
        .fetch_identity(&tokens, &login, &CallbackParams::default())
        .await
        .unwrap();
    let got = ExpectedIdentity {
        subject: identity.subject,
        union_id: identity.union_id.unwrap_or_default(),
        username: identity.username.unwrap_or_default(),
        display_name: identity.display_name.unwrap_or_default(),
        avatar_url: identity.avatar_url.unwrap_or_default(),
        email: identity.email.unwrap_or_default(),
        email_verified: identity.email_verified,
    };
    assert_eq!(got, expected, "{name}");
    if emu.capabilities().refresh {
        let refresher = provider.refresher().expect("a refresh grant");
        let refresh_token = tokens.refresh_token.clone().expect("a refresh token");
        let refreshed = refresher
            .refresh(&refresh_token, &tokens.scopes)
            .await
            .unwrap();
        if emu.capabilities().refresh_single_use {
            assert!(
                refresher
                    .refresh(&refresh_token, &tokens.scopes)
                    .await
                    .is_err()
            );
        }
        use secrecy::ExposeSecret;
        assert!(emu.access_token_valid(refreshed.access_token.expose_secret()));
    }
    assert!(
        emu.violations().is_empty(),
        "{name}: {:?}",
        emu.violations()
    );
    for r in emu.requests() {
        assert!(r.params.iter().all(|(k, _)| k != "code_verifier"), "{r:?}");
    }
    expected
}

#[tokio::test]
async fn engine_qq() {
    let emu = QqEmulator::start().await;
    for seed in ["q1", "q2", "q3", "q4", "q5", "q6"] {
        engine_login(&emu, seed).await;
    }
    // Every avatar fallback was exercised.
    let kinds: std::collections::HashSet<_> = ["q1", "q2", "q3", "q4", "q5", "q6"]
        .iter()
        .map(|s| format!("{:?}", emu.user(s).unwrap().avatars))
        .collect();
    assert!(kinds.len() >= 2, "{kinds:?}");

    // union_id = true: /me?unionid=1, and the union id is reported.
    let mut config = emu.provider_config();
    config.union_id = true;
    let expected = ExpectedIdentity {
        union_id: emu.union_id_of("q7"),
        ..emu.add_user("q7")
    };
    engine_login_with(&emu, "q7", config, expected).await;
    let me = emu.requests_to(qq::ME_PATH);
    assert_eq!(last(&me).param("unionid"), Some("1"));
}

#[tokio::test]
async fn engine_wechat() {
    let emu = WechatEmulator::start().await;
    let expected = engine_login(&emu, "w1").await;
    assert!(!expected.union_id.is_empty());
}

#[tokio::test]
async fn engine_weibo() {
    let emu = WeiboEmulator::start().await;
    engine_login(&emu, "b1").await;
    emu.set_uid_as_number(true);
    emu.set_numbers_as_strings(true);
    engine_login(&emu, "b2").await;
}

#[tokio::test]
async fn engine_gitee() {
    let emu = GiteeEmulator::start().await;
    for seed in ["g1", "g2", "g3", "g4"] {
        engine_login(&emu, seed).await;
    }
}

#[tokio::test]
async fn a_request_never_answered_is_recorded_with_status_0() {
    let emu = QqEmulator::start().await;
    emu.set_fault(Step::Identity, Fault::Hang);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    assert!(impatient.get(emu.url(qq::ME_PATH)).send().await.is_err());
    drop(impatient);
    for _ in 0..50 {
        if !emu.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests = emu.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!((requests[0].step, requests[0].status), (Step::Identity, 0));
}
