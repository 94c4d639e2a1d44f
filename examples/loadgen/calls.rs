//! One call of each scenario, as a caller (a web backend plus its user's
//! browser) makes it, and how a failed call is described.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use authbroker::grpc::pb::{
    BeginLoginRequest, BeginLoginResponse, CompleteLoginRequest, Outcome,
    login_service_client::LoginServiceClient,
};
use futures::{StreamExt, TryStreamExt};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

use crate::harness::{API_KEY, REDIRECT_URI, RunningApp};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// grpc.health.v1.Health/Check: the floor, an empty unary RPC.
    Health,
    /// LoginService/BeginLogin alone.
    #[value(name = "begin")]
    BeginLogin,
    /// BeginLogin, the sandbox's authorize page, CompleteLogin: a first login.
    #[value(name = "new")]
    NewUser,
    /// The same for users who logged in before.
    #[value(name = "returning")]
    ReturningUser,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [
        Scenario::Health,
        Scenario::BeginLogin,
        Scenario::NewUser,
        Scenario::ReturningUser,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Health => "Health/Check",
            Scenario::BeginLogin => "BeginLogin",
            Scenario::NewUser => "full login, new user",
            Scenario::ReturningUser => "full login, returning user",
        }
    }

    pub fn is_full_login(self) -> bool {
        matches!(self, Scenario::NewUser | Scenario::ReturningUser)
    }
}

/// Where the parts of one full login went, as the client saw them.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoginTimes {
    pub begin: Duration,
    pub browser: Duration,
    pub complete: Duration,
}

/// What all callers share: the app's channels, the "browser", the key, and
/// the counters that hand out user names.
pub struct Shared {
    channels: Vec<Channel>,
    /// One pooled HTTP/1.1 client for every caller's "browser"; it does not
    /// follow redirects because the 302 back to the app is what we read.
    browser: reqwest::Client,
    bearer: MetadataValue<Ascii>,
    returning_users: usize,
    /// Next new-user number; names are never reused within a run.
    next_new: AtomicU64,
    /// Next returning user, round-robin over the pool.
    next_returning: AtomicU64,
}

impl Shared {
    pub fn new(app: &RunningApp, returning_users: usize) -> anyhow::Result<Shared> {
        let browser = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            // Loopback only, whatever HTTP(S)_PROXY says.
            .no_proxy()
            .build()
            .context("cannot build the browser client")?;
        Ok(Shared {
            channels: app.channels.clone(),
            browser,
            bearer: format!("Bearer {API_KEY}")
                .parse()
                .context("API key as a header")?,
            returning_users: returning_users.max(1),
            next_new: AtomicU64::new(0),
            next_returning: AtomicU64::new(0),
        })
    }
}

/// One caller: its own clients over one of the shared channels (round-robin
/// by caller number, so N callers spread over the HTTP/2 connections).
pub struct Caller {
    shared: Arc<Shared>,
    health: HealthClient<Channel>,
    login: LoginServiceClient<Channel>,
}

impl Caller {
    pub fn new(shared: &Arc<Shared>, number: usize) -> Caller {
        let channel = shared.channels[number % shared.channels.len()].clone();
        Caller {
            shared: shared.clone(),
            health: HealthClient::new(channel.clone()),
            login: LoginServiceClient::new(channel),
        }
    }

    /// One call of `scenario`. Full logins also say where their time went.
    pub async fn call(&mut self, scenario: Scenario) -> Result<Option<LoginTimes>, String> {
        match scenario {
            Scenario::Health => self.health().await.map(|()| None),
            Scenario::BeginLogin => self.begin().await.map(|_| None),
            Scenario::NewUser => {
                let n = self.shared.next_new.fetch_add(1, Ordering::Relaxed);
                self.full_login(&format!("n{n}"), Outcome::UserCreated)
                    .await
                    .map(Some)
            }
            Scenario::ReturningUser => {
                let n = self.shared.next_returning.fetch_add(1, Ordering::Relaxed);
                let user = returning_user(n % self.shared.returning_users as u64);
                self.full_login(&user, Outcome::SignedIn).await.map(Some)
            }
        }
    }

    async fn health(&mut self) -> Result<(), String> {
        let answer = self
            .health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|s| describe_status("Health/Check", &s))?;
        match answer.get_ref().status() {
            ServingStatus::Serving => Ok(()),
            other => Err(format!("Health/Check: status {other:?}")),
        }
    }

    fn authed<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.shared.bearer.clone());
        request
    }

    async fn begin(&mut self) -> Result<BeginLoginResponse, String> {
        let request = self.authed(BeginLoginRequest {
            provider: "sandbox".into(),
            ..Default::default()
        });
        self.login
            .begin_login(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| describe_status("BeginLogin", &s))
    }

    /// BeginLogin → the sandbox's authorize page as `user` → CompleteLogin.
    async fn full_login(&mut self, user: &str, expect: Outcome) -> Result<LoginTimes, String> {
        let started = Instant::now();
        let begun = self.begin().await?;
        let begin = started.elapsed();

        let started = Instant::now();
        let (code, state) = self.authorize(&begun.authorize_url, user).await?;
        let browser = started.elapsed();
        if state != begun.state {
            return Err("authorize: the 302 carries a different state".into());
        }

        let started = Instant::now();
        let request = self.authed(CompleteLoginRequest {
            state,
            code,
            ..Default::default()
        });
        let completed = self
            .login
            .complete_login(request)
            .await
            .map_err(|s| describe_status("CompleteLogin", &s))?
            .into_inner();
        let complete = started.elapsed();
        if completed.outcome() != expect {
            return Err(format!(
                "CompleteLogin: outcome {:?}, expected {expect:?} (user {user})",
                completed.outcome()
            ));
        }
        Ok(LoginTimes {
            begin,
            browser,
            complete,
        })
    }

    /// The user's browser: GET the authorize URL, which the sandbox approves
    /// at once with a 302 to the redirect URI; returns (code, state).
    async fn authorize(&self, authorize_url: &str, user: &str) -> Result<(String, String), String> {
        let response = self
            .shared
            .browser
            .get(format!("{authorize_url}&sandbox_user={user}"))
            .send()
            .await
            .map_err(|e| format!("authorize: {e}"))?;
        let status = response.status();
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // Read the (empty) body so the connection goes back to the pool.
        let _ = response.bytes().await;
        let location = match (status.as_u16(), location) {
            (302, Some(l)) if l.starts_with(REDIRECT_URI) => l,
            (code, l) => return Err(format!("authorize: HTTP {code}, Location {l:?}")),
        };
        let url = url::Url::parse(&location).map_err(|e| format!("authorize: Location: {e}"))?;
        let param = |name: &str| {
            url.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
                .ok_or_else(|| format!("authorize: no {name} in the Location"))
        };
        Ok((param("code")?, param("state")?))
    }
}

fn returning_user(i: u64) -> String {
    format!("r{i}")
}

/// Logs every pool user in once, `concurrency` at a time, so the returning
/// scenario finds them bound. Any failure aborts: the scenario would be wrong.
pub async fn create_returning_users(
    shared: &Arc<Shared>,
    concurrency: usize,
) -> anyhow::Result<()> {
    futures::stream::iter(0..shared.returning_users)
        .map(|i| {
            let mut caller = Caller::new(shared, i);
            async move {
                caller
                    .full_login(&returning_user(i as u64), Outcome::UserCreated)
                    .await
                    .map_err(|e| anyhow::anyhow!("creating returning user {i}: {e}"))
            }
        })
        .buffer_unordered(concurrency)
        .try_for_each(|_| std::future::ready(Ok(())))
        .await
}

/// `STEP: CODE REASON: message`, with the `ErrorInfo` reason when present.
fn describe_status(step: &str, status: &Status) -> String {
    let reason = status
        .get_details_error_info()
        .map_or_else(|| "(no ErrorInfo)".to_string(), |info| info.reason);
    let mut message = status.message().to_string();
    if message.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|&i| message.is_char_boundary(i))
            .unwrap_or(0);
        message.truncate(cut);
        message.push('…');
    }
    format!("{step}: {:?} {reason}: {message}", status.code())
}
