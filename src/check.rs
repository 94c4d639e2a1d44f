//! Whether settings make a working setup: config's own `validate()`, plus
//! the checks only the modules that use a setting can make — the TLS PEM
//! files, a Postgres URL's parameters, provider URLs in clear. It sits above
//! them all so that `config` stays at the bottom of the module graph.

use crate::{
    config::{Mode, Settings, StateBackend},
    http::in_clear_off_loopback,
    store::postgres::parse_url,
};

/// Every problem at once: config's own first, then the rest.
pub fn settings(settings: &Settings, mode: Mode) -> Vec<String> {
    let mut problems = settings.validate(mode);
    problems.extend(postgres_urls(settings));
    if let Some(tls) = &settings.server.tls {
        problems.extend(crate::tls::check(tls));
    }
    if mode == Mode::Serve {
        problems.extend(providers_in_clear(settings));
    }
    problems
}

/// Postgres URLs' parameters, `sslmode` and a readable `sslrootcert` among
/// them. Whether a URL is Postgres at all is config's to say.
fn postgres_urls(settings: &Settings) -> Vec<String> {
    let is_postgres =
        |url: &str| url.starts_with("postgres://") || url.starts_with("postgresql://");
    let mut problems = Vec::new();
    let db = &settings.database.url;
    if is_postgres(db)
        && let Err(why) = parse_url(db)
    {
        problems.push(format!("database.url: {why}"));
    }
    // An unset state.url is database.url, checked above under its own name.
    if settings.state.backend == StateBackend::Postgres
        && let Some(url) = settings.state.url.as_deref()
        && is_postgres(url)
        && let Err(why) = parse_url(url)
    {
        problems.push(format!("state.url: {why}"));
    }
    problems
}

/// What `serve` runs only when opted into by name: `http://` provider URLs
/// off loopback, which would carry the client secret and tokens in clear.
fn providers_in_clear(settings: &Settings) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, p) in settings.providers.iter() {
        if !p.enabled || p.allow_insecure_http {
            continue;
        }
        let at = format!("providers.{name}");
        for (key, url) in p.configured_urls() {
            if let Ok(url) = url::Url::parse(url)
                && in_clear_off_loopback(&url)
            {
                problems.push(format!(
                    "{at}.{key}: {} is http:// on a host other than loopback, so the client \
                     secret and tokens would cross the network in clear; use https://, or set \
                     {at}.allow_insecure_http = true",
                    url.origin().ascii_serialization()
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use figment::{
        Figment,
        providers::{Format, Serialized, Toml},
    };

    use super::*;

    fn from_toml(s: &str) -> Settings {
        Settings::from_figment(
            Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(s)),
        )
        .unwrap()
    }

    /// `check::settings(Dev)`'s problems under `[server]` and `[auth]`.
    fn listener_problems(toml: &str) -> Vec<String> {
        settings(&from_toml(toml), Mode::Dev)
            .into_iter()
            .filter(|p| p.starts_with("server.") || p.starts_with("auth."))
            .collect()
    }

    #[test]
    fn postgres_url_parameters_are_checked() {
        let problems = |toml: &str| -> Vec<String> {
            settings(&from_toml(toml), Mode::Dev)
                .into_iter()
                .filter(|p| p.starts_with("database.url") || p.starts_with("state.url"))
                .collect()
        };
        let ok = "[database]\nurl = \"postgres://u:secret@db/app?sslmode=require\"";
        assert!(problems(ok).is_empty(), "{:?}", problems(ok));
        let p = problems("[database]\nurl = \"postgres://u:secret@db/app?sslmode=verify\"");
        assert!(p.len() == 1 && p[0].contains("sslmode=\"verify\""), "{p:?}");
        assert!(!p[0].contains("secret"), "{p:?}");
        let p = problems(
            "[database]\nurl = \"postgres://db/app?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem\"",
        );
        assert!(
            p[0].starts_with("database.url: sslrootcert: cannot read"),
            "{p:?}"
        );
        let p = problems(
            "[state]\nbackend = \"postgres\"\nurl = \"postgres://db/state?sslmode=verify-ca\"",
        );
        assert!(
            p.len() == 1 && p[0].starts_with("state.url: sslmode=verify-ca needs sslrootcert"),
            "{p:?}"
        );
    }

    #[test]
    fn serve_refuses_unsafe_setups_unless_opted_in_by_name() {
        let unsafe_setups: &[(&str, &str, &str)] = &[
            (
                "[providers.sb]\nkind = \"sandbox\"",
                "providers.sb.allow_sandbox",
                "[providers.sb]\nallow_sandbox = true",
            ),
            (
                "[providers.gh]\nkind = \"github\"\n\
                 [providers.gh.endpoints]\ntoken_url = \"http://idp.example:8080/t?x=1\"",
                "providers.gh.endpoints.token_url: http://idp.example:8080 is http://",
                "[providers.gh]\nallow_insecure_http = true",
            ),
            (
                "[providers.corp]\nkind = \"oidc\"\n\
                 [providers.corp.endpoints]\nissuer = \"http://10.0.0.7\"",
                "providers.corp.endpoints.issuer: http://10.0.0.7 is http://",
                "[providers.corp]\nallow_insecure_http = true",
            ),
            (
                "[providers.own]\nkind = \"oauth2\"\n\
                 [providers.own.spec.endpoints]\nauthorize_url = \"http://sso.example/a\"",
                "providers.own.spec.endpoints.authorize_url: http://sso.example is http://",
                "[providers.own]\nallow_insecure_http = true",
            ),
            (
                "[server]\nlisten = \"0.0.0.0:50051\"\n[auth]\nallow_unauthenticated = true",
                "auth.allow_unauthenticated_remote: open mode (no API keys or client \
                 certificates) on 0.0.0.0:50051",
                "[auth]\nallow_unauthenticated_remote = true",
            ),
        ];
        // Each opt-in is a second file merged over the first, as an
        // environment override would be.
        let opt_in_problems = |toml: &str, opt_in: &str, mode| -> Vec<String> {
            let s = Settings::from_figment(
                Figment::from(Serialized::defaults(Settings::default()))
                    .merge(Toml::string(toml))
                    .merge(Toml::string(opt_in)),
            )
            .unwrap();
            settings(&s, mode)
                .into_iter()
                .filter(|p| p.contains("allow_"))
                .filter(|p| !p.starts_with("auth.api_keys"))
                .collect()
        };
        for (setup, refusal, opt_in) in unsafe_setups {
            let problems = opt_in_problems(setup, "", Mode::Serve);
            assert_eq!(problems.len(), 1, "{setup}: {problems:#?}");
            assert!(problems[0].starts_with(refusal), "{setup}: {problems:#?}");
            let named = opt_in
                .lines()
                .next_back()
                .unwrap()
                .split(" = ")
                .next()
                .unwrap();
            assert!(problems[0].contains(named), "{} names {named}", problems[0]);
            assert!(!problems[0].contains("x=1"), "no query strings in messages");
            let opted = opt_in_problems(setup, opt_in, Mode::Serve);
            assert!(opted.is_empty(), "{setup} with {opt_in}: {opted:#?}");
            assert!(
                opt_in_problems(setup, "", Mode::Dev).is_empty(),
                "dev: {setup}"
            );
        }

        // Loopback stays allowed without a word; so do disabled providers.
        for fine in [
            "[providers.gh]\nkind = \"github\"\n[providers.gh.endpoints]\n\
             token_url = \"http://127.0.0.1:9/t\"\nuserinfo_url = \"http://localhost:9/u\"\n\
             emails_url = \"http://[::1]:9/e\"\nauthorize_url = \"https://x.example/a\"",
            "[providers.sb]\nkind = \"sandbox\"\nenabled = false",
            "[server]\nlisten = \"[::1]:50051\"\n[auth]\nallow_unauthenticated = true",
        ] {
            assert!(opt_in_problems(fine, "", Mode::Serve).is_empty(), "{fine}");
        }
        // With API keys, a network address is what serve is for.
        let keyed = from_toml(
            "[server]\nlisten = \"0.0.0.0:50051\"\n[auth]\nallow_unauthenticated = true\n\
             [[auth.api_keys]]\nname = \"web\"\nrole = \"login\"\nsha256 = \"aa\"",
        );
        assert!(
            settings(&keyed, Mode::Serve)
                .iter()
                .all(|p| !p.contains("allow_unauthenticated_remote"))
        );
    }

    #[test]
    fn tls_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let tls = |cert: &str, key: &str, ca: &str, extra: &str| {
            format!(
                "[server.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nclient_ca_file = {ca:?}\n{extra}"
            )
        };

        // Missing files: each named by its key.
        let problems = listener_problems(&tls(
            &path("no.crt"),
            &path("no.key"),
            &path("no-ca.crt"),
            "",
        ));
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].starts_with("server.tls.cert_file: cannot read"));
        assert!(problems[1].starts_with("server.tls.key_file: cannot read"));
        assert!(problems[2].starts_with("server.tls.client_ca_file: cannot read"));

        // Not PEM.
        std::fs::write(path("junk"), "not a certificate").unwrap();
        let problems = listener_problems(&tls(&path("junk"), &path("junk"), &path("junk"), ""));
        assert!(
            problems[0].contains("holds no PEM certificate"),
            "{problems:#?}"
        );
        assert!(problems[1].contains("no PEM private key"), "{problems:#?}");
        assert_eq!(problems.len(), 3, "{problems:#?}");

        // Two good pairs: right together, wrong crossed.
        let one = rcgen::generate_simple_self_signed(vec!["one.test".into()]).unwrap();
        let two = rcgen::generate_simple_self_signed(vec!["two.test".into()]).unwrap();
        std::fs::write(path("one.crt"), one.cert.pem()).unwrap();
        std::fs::write(path("one.key"), one.signing_key.serialize_pem()).unwrap();
        std::fs::write(path("two.key"), two.signing_key.serialize_pem()).unwrap();
        let secret = two.signing_key.serialize_pem();
        assert!(
            listener_problems(&tls(
                &path("one.crt"),
                &path("one.key"),
                &path("one.crt"),
                ""
            ))
            .is_empty()
        );
        let problems = listener_problems(&tls(
            &path("one.crt"),
            &path("two.key"),
            &path("one.crt"),
            "",
        ));
        assert_eq!(
            problems,
            ["server.tls.key_file: is not the key of the certificate in server.tls.cert_file"]
        );
        assert!(!problems[0].contains(&secret[40..80]));

        // The healthcheck's own files.
        let extra = format!(
            "[server.tls.healthcheck]\nca_file = {:?}\nserver_name = \"not a name!\"\ncert_file = {:?}",
            path("no-ca.crt"),
            path("one.crt")
        );
        let problems = listener_problems(&tls(
            &path("one.crt"),
            &path("one.key"),
            &path("one.crt"),
            &extra,
        ));
        assert!(problems[0].starts_with("server.tls.healthcheck.ca_file: cannot read"));
        assert!(problems[1].starts_with("server.tls.healthcheck.server_name"));
        assert!(
            problems[2].starts_with("server.tls.healthcheck: cert_file and key_file go together")
        );
        assert_eq!(problems.len(), 3, "{problems:#?}");
    }
}
