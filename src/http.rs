//! The one outbound HTTP client every provider call goes through: connect and
//! total timeouts, a response-size cap, and no redirects (a token endpoint that
//! redirects is misconfigured or hijacked, never something to follow).

use std::time::Duration;

use reqwest::{Response, StatusCode, header::HeaderMap};

use crate::config::HttpSettings;

#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    max_body: usize,
}

/// A fully read answer.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Why an outbound call produced no usable answer. Messages never contain
/// URLs with query strings (they may hold codes or tokens).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("timed out")]
    Timeout,
    #[error("could not connect")]
    Connect,
    #[error("transport error")]
    Transport(#[source] reqwest::Error),
    #[error("answer larger than {limit} bytes")]
    TooLarge { limit: usize },
}

impl HttpClient {
    pub fn new(settings: &HttpSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(settings.user_agent.clone())
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(HttpClient {
            client,
            max_body: settings.max_response_bytes,
        })
    }

    pub fn request(&self, method: reqwest::Method, url: url::Url) -> reqwest::RequestBuilder {
        self.client.request(method, url)
    }

    /// Sends and reads the whole body, refusing bodies over the cap.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Result<HttpAnswer, HttpError> {
        let response = request.send().await.map_err(classify)?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = read_capped(response, self.max_body).await?;
        Ok(HttpAnswer {
            status,
            headers,
            body,
        })
    }
}

fn classify(e: reqwest::Error) -> HttpError {
    // reqwest's Display includes the URL, query and all; drop it so a code in
    // a query string can never reach a log line.
    let e = e.without_url();
    if e.is_timeout() {
        HttpError::Timeout
    } else if e.is_connect() {
        HttpError::Connect
    } else {
        HttpError::Transport(e)
    }
}

/// Reads the body, refusing it as soon as it passes `limit` (the declared
/// length is not trusted: chunked answers have none).
async fn read_capped(mut response: Response, limit: usize) -> Result<Vec<u8>, HttpError> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(HttpError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        if body.len() + chunk.len() > limit {
            return Err(HttpError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
