//! The common logins, each in one statement (one round trip, an implicit
//! transaction): a returning login, and the first login of an identity
//! whose policy has no linking rule to look up. Everything else — a lookup
//! by union id or verified email, a race lost to a concurrent binder — goes
//! the full way in `bind_attempt` (gather the facts under locks, decide,
//! apply in one explicit transaction).
//!
//! Still "gather facts, apply decision", with the decision the caller's
//! `Decide`:
//! - For a bound identity every policy decides the same: the existing user,
//!   by `Rule::ExistingBinding`, auditing one `login_succeeded` (a unit test
//!   of `login::binding::decide` holds it to that). So `RETURNING_LOGIN`
//!   applies that answer in SQL while it finds the binding, and the result
//!   is built from `decide`'s answer for the binding found; a debug build
//!   checks that its audit is the one the statement wrote.
//! - For an unbound identity and a policy without lookups, the facts are
//!   complete once the binding is known to be absent: `decide` is asked,
//!   and `FIRST_LOGIN` applies its `New` decision, audit events in order.

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;

use super::{Failure, truncate_to_micros};
use crate::domain::binding::{self, AuditNote, BindPolicy, Decide, Facts, UserChoice};
use crate::domain::{AuditKind, Identity, SealedToken};
use crate::store::{BindResult, LoginRecord};

/// A returning login: refresh the profile and `last_login_at` (the row is
/// rewritten for `last_login_at` anyway; with `union_id` and `email`
/// unchanged it is a HOT update that touches no index), replace the token
/// when one is given, audit `login_succeeded`. The UPDATE's row lock
/// serialises concurrent logins of one identity as `FOR UPDATE` did: the
/// second waits for the first to commit, then rewrites the row it left.
/// No row: the identity is unbound and nothing was written.
///
/// Parameters: the login's (`LoginParams`).
const RETURNING_LOGIN: &str = "\
WITH touched AS (
    UPDATE identities SET union_id = $3, username = $4, display_name = $5,
        avatar_url = $6, email = $7, email_verified = $8, last_login_at = $9
    WHERE provider = $1 AND subject = $2
    RETURNING user_id, created_at
), token AS (
    INSERT INTO provider_tokens
        (provider, subject, key_id, nonce, ciphertext, version, usable, updated_at)
    SELECT $1, $2, $12::text, $13::bytea, $14::bytea, 1, TRUE, $15::timestamptz
    FROM touched WHERE $12::text IS NOT NULL
    ON CONFLICT (provider, subject) DO UPDATE SET key_id = EXCLUDED.key_id,
        nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext,
        version = provider_tokens.version + 1, usable = TRUE,
        updated_at = EXCLUDED.updated_at
), audit AS (
    INSERT INTO audit_events
        (at, kind, actor, provider, subject, user_id, reason, detail, login_id)
    SELECT $9, 'login_succeeded', $10::text, $1, $2, user_id, NULL, NULL, $11::text
    FROM touched
)
SELECT user_id, created_at FROM touched";

/// A first login that creates its user: the identity (unless a concurrent
/// login bound it first: then no row, and nothing written), the user, the
/// token, and the decision's audit events in order. The user is inserted
/// from the identity's RETURNING, so a lost race leaves no user behind;
/// the foreign key from the identity to it is checked at the statement's
/// end, when both exist.
///
/// Parameters: the login's (`LoginParams`), then $16 the new user's id,
/// $17 the audit kinds and $18 their details.
const FIRST_LOGIN: &str = "\
WITH bound AS (
    INSERT INTO identities (provider, subject, user_id, union_id, username,
        display_name, avatar_url, email, email_verified, created_at, last_login_at)
    VALUES ($1, $2, $16, $3, $4, $5, $6, $7, $8, $9, $9)
    ON CONFLICT (provider, subject) DO NOTHING
    RETURNING user_id
), made AS (
    INSERT INTO users (id, created_at) SELECT user_id, $9 FROM bound
), token AS (
    INSERT INTO provider_tokens
        (provider, subject, key_id, nonce, ciphertext, version, usable, updated_at)
    SELECT $1, $2, $12::text, $13::bytea, $14::bytea, 1, TRUE, $15::timestamptz
    FROM bound WHERE $12::text IS NOT NULL
), audit AS (
    INSERT INTO audit_events
        (at, kind, actor, provider, subject, user_id, reason, detail, login_id)
    SELECT $9, n.kind, $10::text, $1, $2, bound.user_id, NULL, n.detail, $11::text
    FROM bound, unnest($17::text[], $18::text[]) WITH ORDINALITY AS n (kind, detail, ord)
    ORDER BY n.ord
)
SELECT user_id FROM bound";

/// What one statement did.
pub(super) enum Applied {
    Done(BindResult),
    /// A concurrent first login bound the identity first: look again.
    Raced,
    /// Not a case for one statement: take the full path.
    Declined,
}

/// One login as a single statement where it can be: see the module doc.
/// `now` is already truncated to microseconds.
#[allow(clippy::too_many_arguments)]
pub(super) async fn bind<C: GenericClient>(
    client: &C,
    identity: &Identity,
    policy: &BindPolicy,
    decide: Decide,
    record: LoginRecord<'_>,
) -> Result<Applied, Failure> {
    let LoginRecord {
        tokens, actor, now, ..
    } = record;
    let login_id = record.login.map(|k| k.id);
    let token = TokenParams::of(tokens);
    let login = login_params(identity, &now, &actor, &login_id, &token);
    let returning = client.prepare_cached(RETURNING_LOGIN).await?;
    let found = client.query_opt(&returning, &login).await?;
    if let Some(row) = found {
        let user_id: String = row.try_get(0)?;
        let facts = Facts {
            bound_to: Some(user_id.clone()),
            ..Facts::default()
        };
        let decision = decide(identity, policy, &facts);
        debug_assert_eq!(
            decision.audit,
            [AuditNote {
                kind: AuditKind::LoginSucceeded,
                detail: None
            }],
            "RETURNING_LOGIN audits what decide answers for a bound identity"
        );
        let binding = binding::binding_after(identity, user_id, Some(row.try_get(1)?), now);
        return Ok(Applied::Done(crate::store::applied(&decision, binding)));
    }
    if policy.union_lookup(identity).is_some() || policy.email_lookup(identity).is_some() {
        return Ok(Applied::Declined);
    }
    // Unbound, and no lookup to run: these are all the facts there are.
    let decision = decide(identity, policy, &Facts::default());
    match decision.user {
        UserChoice::New => {}
        UserChoice::LinkRequired => return Ok(Applied::Done(BindResult::LinkRequired)),
        UserChoice::Existing(_) => return Ok(Applied::Declined),
    }
    // Time-ordered ids keep the users primary key append-mostly.
    let user_id = uuid::Uuid::now_v7().to_string();
    let kinds: Vec<&str> = decision.audit.iter().map(|n| n.kind.as_str()).collect();
    let details: Vec<Option<&str>> = decision.audit.iter().map(|n| n.detail).collect();
    let first = client.prepare_cached(FIRST_LOGIN).await?;
    let mut params = login.to_vec();
    params.extend([&user_id as &(dyn ToSql + Sync), &kinds, &details]);
    if client.query_opt(&first, &params).await?.is_none() {
        return Ok(Applied::Raced);
    }
    let binding = binding::binding_after(identity, user_id, None, now);
    Ok(Applied::Done(crate::store::applied(&decision, binding)))
}

/// $1 provider, $2 subject, $3–$8 profile, $9 now, $10 actor, $11 login
/// id, $12–$15 token (key id NULL: none): what both statements start with.
type LoginParams<'a> = [&'a (dyn ToSql + Sync); 15];

fn login_params<'a>(
    identity: &'a Identity,
    now: &'a OffsetDateTime,
    actor: &'a Option<&str>,
    login_id: &'a Option<&str>,
    token: &'a TokenParams<'_>,
) -> LoginParams<'a> {
    [
        &identity.provider,
        &identity.subject,
        &identity.union_id,
        &identity.username,
        &identity.display_name,
        &identity.avatar_url,
        &identity.email,
        &identity.email_verified,
        now,
        actor,
        login_id,
        &token.key_id,
        &token.nonce,
        &token.ciphertext,
        &token.updated_at,
    ]
}

/// A token as statement parameters, all NULL when there is none.
struct TokenParams<'a> {
    key_id: Option<&'a str>,
    nonce: Option<&'a [u8]>,
    ciphertext: Option<&'a [u8]>,
    updated_at: Option<OffsetDateTime>,
}

impl<'a> TokenParams<'a> {
    fn of(token: Option<&'a SealedToken>) -> Self {
        TokenParams {
            key_id: token.map(|t| t.key_id.as_str()),
            nonce: token.map(|t| t.nonce.as_slice()),
            ciphertext: token.map(|t| t.ciphertext.as_slice()),
            updated_at: token.map(|t| truncate_to_micros(t.updated_at)),
        }
    }
}
