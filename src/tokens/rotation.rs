//! `authbroker rotate-keys`: re-seals every stored provider token that is
//! not sealed with the vault's newest key. It needs only the tokens' store
//! and the key ring, and runs beside live servers.

use crate::{
    domain::SealedToken,
    store::{Conflict, StoreError, TokenStore},
    vault::Vault,
};

/// Rows per `list_tokens` page.
const PAGE: u32 = 500;
/// Compare-and-swap attempts per row before `rotate` gives up (the row is
/// being rewritten faster than we can re-read it; rerunning is safe).
const ATTEMPTS: usize = 5;

/// What `rotate` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// Re-sealed with the newest key.
    pub rotated: u64,
    /// Already sealed with the newest key (including rows a concurrent
    /// refresh rewrote while we worked).
    pub already_current: u64,
    /// Sealed with a key that is not configured, or not opening with the
    /// configured one. Left untouched and logged (provider, subject, key id).
    pub undecryptable: u64,
}

/// `authbroker rotate-keys`: re-seals every stored token not sealed with the
/// newest key, walking `list_tokens` pages. Each row is written with
/// compare-and-swap on the version read, so a concurrent refresh is never
/// overwritten: on `Conflict::StaleToken` the row is re-read and retried (a
/// row refreshed by a server that already has the new key is simply
/// current). Rows no configured key opens are counted, never dropped.
/// Idempotent; safe to run beside live servers and to rerun after an error.
pub async fn rotate(store: &dyn TokenStore, vault: &Vault) -> Result<RotationReport, StoreError> {
    rotate_paged(store, vault, PAGE).await
}

async fn rotate_paged(
    store: &dyn TokenStore,
    vault: &Vault,
    page_size: u32,
) -> Result<RotationReport, StoreError> {
    let mut report = RotationReport::default();
    let mut after: Option<(String, String)> = None;
    loop {
        let page = store
            .list_tokens(
                after.as_ref().map(|(p, s)| (p.as_str(), s.as_str())),
                page_size,
            )
            .await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some((last.provider.clone(), last.subject.clone()));
        for row in page {
            rotate_row(
                store,
                vault,
                &row.provider,
                &row.subject,
                row.token,
                &mut report,
            )
            .await?;
        }
    }
    Ok(report)
}

async fn rotate_row(
    store: &dyn TokenStore,
    vault: &Vault,
    provider: &str,
    subject: &str,
    mut token: SealedToken,
    report: &mut RotationReport,
) -> Result<(), StoreError> {
    for _ in 0..ATTEMPTS {
        if vault.is_current(&token) {
            report.already_current += 1;
            return Ok(());
        }
        let tokens = match vault.open(provider, subject, &token) {
            Ok(tokens) => tokens,
            Err(e) => {
                tracing::warn!(
                    provider,
                    subject,
                    key_id = %token.key_id,
                    error = %e,
                    "stored token does not open with any configured key; left as is"
                );
                report.undecryptable += 1;
                return Ok(());
            }
        };
        // A rotation is not a refresh: keep the time the tokens were last
        // written by a login or refresh.
        let resealed = vault
            .seal(provider, subject, &tokens, token.updated_at)
            .map_err(|e| {
                StoreError::Internal(anyhow::Error::new(e).context("re-sealing a token"))
            })?;
        match store
            .put_token(provider, subject, &resealed, Some(token.version))
            .await
        {
            Ok(new_version) => {
                // `put_token` marks the row usable; a token the provider
                // already refused must stay refused. Between the two writes
                // a reader may briefly see it usable and try one refresh,
                // which the provider refuses again: harmless.
                if !token.usable {
                    match store
                        .mark_token_unusable(provider, subject, new_version)
                        .await
                    {
                        // A newer write (a fresh login) won; it is usable by right.
                        Ok(()) | Err(StoreError::Conflict(Conflict::StaleToken)) => {}
                        Err(StoreError::NotFound) => {}
                        Err(e) => return Err(e),
                    }
                }
                report.rotated += 1;
                return Ok(());
            }
            Err(StoreError::Conflict(Conflict::StaleToken)) => {
                match store.get_token(provider, subject).await? {
                    Some(fresh) => token = fresh,
                    // Deleted meanwhile (unlink, user deletion): nothing to rotate.
                    None => return Ok(()),
                }
            }
            // The identity went away meanwhile.
            Err(StoreError::NotFound) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    tracing::warn!(
        provider,
        subject,
        attempts = ATTEMPTS,
        "stored token kept changing during rotation; run rotate-keys again"
    );
    Err(StoreError::Conflict(Conflict::StaleToken))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use secrecy::{ExposeSecret, zeroize::Zeroizing};
    use time::OffsetDateTime;

    use super::*;
    use crate::{
        config::{KeyMaterial, VAULT_KEY_LEN},
        domain::{Identity, now_micros},
        store::{
            BindingStore, Database, SqliteStore, Store,
            interposed::{Hooks, Interposed},
        },
        vault::VaultTokens,
    };

    /// A ring of `(id, every byte of the key)`, oldest first.
    fn vault(keys: &[(&str, u8)]) -> Vault {
        let keys = keys.iter().map(|(id, byte)| KeyMaterial {
            id: id.to_string(),
            bytes: Zeroizing::new([*byte; VAULT_KEY_LEN]),
        });
        Vault::from_keys(keys.collect()).unwrap()
    }

    fn tokens() -> VaultTokens {
        VaultTokens {
            access_token: "access".into(),
            refresh_token: Some("refresh".into()),
            token_type: Some("bearer".into()),
            scopes: vec!["read:user".into()],
            expires_at: Some(OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap()),
        }
    }

    fn assert_same(a: &VaultTokens, b: &VaultTokens) {
        let secrets = |t: &VaultTokens| {
            (
                t.access_token.expose_secret().to_string(),
                t.refresh_token
                    .as_ref()
                    .map(|r| r.expose_secret().to_string()),
            )
        };
        assert_eq!(secrets(a), secrets(b));
        assert_eq!(
            (&a.token_type, &a.scopes, a.expires_at),
            (&b.token_type, &b.scopes, b.expires_at)
        );
    }

    fn identity(provider: &str, subject: &str) -> Identity {
        Identity {
            provider: provider.into(),
            subject: subject.into(),
            ..Default::default()
        }
    }

    /// SQLite with an identity (and no token yet) for each row.
    async fn seeded_store(rows: &[(&str, &str)]) -> SqliteStore {
        let store = SqliteStore::open_in_memory().unwrap();
        store.migrate().await.unwrap();
        for (p, s) in rows {
            let user = format!("user-{p}-{s}");
            store
                .link_identity(&user, &identity(p, s), None, None, now_micros())
                .await
                .unwrap();
        }
        store
    }

    fn tokens_for(p: &str, s: &str) -> VaultTokens {
        VaultTokens {
            access_token: format!("access-{p}-{s}").into(),
            ..tokens()
        }
    }

    #[tokio::test]
    async fn rotate_reseals_old_rows_and_reports_the_rest() {
        let rows = [
            ("github", "1"),
            ("github", "2"),
            ("github", "3"),
            ("github", "4"),
            ("gitlab", "1"),
        ];
        let store = seeded_store(&rows).await;
        let a = vault(&[("a", 1)]);
        let z = vault(&[("z", 26)]);
        let ab = vault(&[("a", 1), ("b", 2)]);
        let write =
            |v: &Vault, p: &str, s: &str| v.seal(p, s, &tokens_for(p, s), now_micros()).unwrap();
        let mut versions = Vec::new();
        for (p, s) in rows {
            let sealer = match (p, s) {
                ("github", "3") => &z,  // no configured key opens it
                ("github", "4") => &ab, // already current
                _ => &a,
            };
            versions.push(
                store
                    .put_token(p, s, &write(sealer, p, s), None)
                    .await
                    .unwrap(),
            );
        }
        // ("github", "2") was refused by the provider.
        store
            .mark_token_unusable("github", "2", versions[1])
            .await
            .unwrap();
        let z_row = store.get_token("github", "3").await.unwrap().unwrap();

        // Page size 2 walks three pages.
        let report = rotate_paged(&store, &ab, 2).await.unwrap();
        assert_eq!(
            report,
            RotationReport {
                rotated: 3,
                already_current: 1,
                undecryptable: 1
            }
        );
        for (p, s) in rows {
            let row = store.get_token(p, s).await.unwrap().unwrap();
            if (p, s) == ("github", "3") {
                assert_eq!(row, z_row, "undecryptable rows are left untouched");
                continue;
            }
            assert_eq!(row.key_id, "b", "{p}/{s}");
            assert_eq!(row.usable, (p, s) != ("github", "2"), "{p}/{s}");
            assert_same(&ab.open(p, s, &row).unwrap(), &tokens_for(p, s));
        }

        // Rerunning finds nothing to do.
        let again = rotate(&store, &ab).await.unwrap();
        assert_eq!(
            again,
            RotationReport {
                rotated: 0,
                already_current: 4,
                undecryptable: 1
            }
        );
        // An empty store is fine.
        let empty = seeded_store(&[]).await;
        assert_eq!(
            rotate(&empty, &ab).await.unwrap(),
            RotationReport::default()
        );
    }

    /// The "concurrent refresh" made just before rotation's first
    /// compare-and-swap write to github/1: the row is rewritten with `racer`.
    struct Racing {
        racer: Mutex<Option<SealedToken>>,
    }

    #[async_trait]
    impl Hooks for Racing {
        async fn before_put_token(
            &self,
            store: &dyn Store,
            p: &str,
            s: &str,
            expected_version: Option<i64>,
        ) -> Result<(), StoreError> {
            let racer = match (p, s, expected_version) {
                ("github", "1", Some(_)) => self.racer.lock().unwrap().take(),
                _ => None,
            };
            if let Some(racer) = racer {
                store.put_token(p, s, &racer, None).await?;
            }
            Ok(())
        }
    }

    /// Rotates github/1, sealed under key "a", to ring `ab` while a server
    /// with ring `refresher` refreshes it; the report and the row after.
    async fn rotate_during_refresh(
        refresher: &Vault,
        ab: &Vault,
        refreshed: &VaultTokens,
    ) -> (RotationReport, SealedToken) {
        let racer = refresher
            .seal("github", "1", refreshed, now_micros())
            .unwrap();
        let inner = Arc::new(seeded_store(&[("github", "1")]).await);
        let old = vault(&[("a", 1)])
            .seal("github", "1", &tokens(), now_micros())
            .unwrap();
        inner.put_token("github", "1", &old, None).await.unwrap();
        let racing = Racing {
            racer: Mutex::new(Some(racer)),
        };
        let store = Interposed::new(inner, Arc::new(racing));
        let report = rotate(&store, ab).await.unwrap();
        let row = store.get_token("github", "1").await.unwrap().unwrap();
        (report, row)
    }

    #[tokio::test]
    async fn rotate_never_overwrites_a_concurrent_refresh() {
        let a = vault(&[("a", 1)]);
        let ab = vault(&[("a", 1), ("b", 2)]);
        let refreshed = VaultTokens {
            access_token: "access-after-refresh".into(),
            ..tokens()
        };

        // A server still on the old key set refreshes the row mid-rotation:
        // rotate re-reads it and re-seals the refreshed tokens.
        let (report, row) = rotate_during_refresh(&a, &ab, &refreshed).await;
        let rotated = RotationReport {
            rotated: 1,
            ..Default::default()
        };
        assert_eq!(report, rotated);
        assert_eq!(row.key_id, "b");
        assert_same(&ab.open("github", "1", &row).unwrap(), &refreshed);

        // A server that already has the new key refreshes it: simply current.
        let (report, row) = rotate_during_refresh(&ab, &ab, &refreshed).await;
        let current = RotationReport {
            already_current: 1,
            ..Default::default()
        };
        assert_eq!(report, current);
        assert_same(&ab.open("github", "1", &row).unwrap(), &refreshed);
    }
}
