//! The common logins in one statement (one round trip, an implicit
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
//!   of `login::binding::decide` holds it to that). So `LOGIN` applies that
//!   answer in SQL when it finds the binding, and the result is built from
//!   `decide`'s answer for the binding found; a debug build checks that its
//!   audit is the one the statement wrote.
//! - For an unbound identity and a policy without lookups, "no binding" is
//!   the only other fact there can be, so `decide` is asked before the
//!   statement runs. When it answers `New`, `LOGIN` applies that decision,
//!   audit events in order, in the same statement, if it finds no binding:
//!   a new user costs one round trip, as a returning one does.

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;

use super::{Failure, truncate_to_micros};
use crate::domain::binding::{self, AuditNote, BindPolicy, Decide, Decision, Facts, UserChoice};
use crate::domain::{AuditKind, Identity, SealedToken};
use crate::store::{BindResult, LoginRecord};

/// A login, returning or (when `$16`) first.
///
/// Returning: refresh the profile and `last_login_at` (the row is rewritten
/// for `last_login_at` anyway; with `union_id` and `email` unchanged it is
/// a HOT update that touches no index), replace the token when one is
/// given, audit `login_succeeded`. The UPDATE's row lock serialises
/// concurrent logins of one identity as `FOR UPDATE` did: the second waits
/// for the first to commit, then rewrites the row it left.
///
/// First (the UPDATE found nothing and `$16` is true): the identity (unless
/// a concurrent login bound it first: then no row, and nothing written),
/// the user, the token, and the decision's audit events in order. The user
/// is inserted from the identity's RETURNING, so a lost race leaves no user
/// behind; the foreign key from the identity to it is checked at the
/// statement's end, when both exist. Every sub-statement sees the snapshot
/// the statement started with, so the INSERT cannot see the UPDATE's row:
/// `NOT EXISTS (touched)` is what keeps a returning login from inserting.
///
/// The answer: the user and the binding's `created_at` for a returning
/// login, the user and NULL for a first one, no row when nothing was
/// written.
///
/// Parameters: the login's (`LoginParams`).
const LOGIN: &str = "\
WITH touched AS (
    UPDATE identities SET union_id = $3, username = $4, display_name = $5,
        avatar_url = $6, email = $7, email_verified = $8, last_login_at = $9
    WHERE provider = $1 AND subject = $2
    RETURNING user_id, created_at
), bound AS (
    INSERT INTO identities (provider, subject, user_id, union_id, username,
        display_name, avatar_url, email, email_verified, created_at, last_login_at)
    SELECT $1, $2, $17, $3, $4, $5, $6, $7, $8, $9, $9
    WHERE $16::boolean AND NOT EXISTS (SELECT FROM touched)
    ON CONFLICT (provider, subject) DO NOTHING
    RETURNING user_id
), made AS (
    INSERT INTO users (id, created_at) SELECT user_id, $9 FROM bound
), token AS (
    INSERT INTO provider_tokens
        (provider, subject, key_id, nonce, ciphertext, version, usable, updated_at)
    SELECT $1, $2, $12::text, $13::bytea, $14::bytea, 1, TRUE, $15::timestamptz
    FROM (SELECT FROM touched UNION ALL SELECT FROM bound) AS login
    WHERE $12::text IS NOT NULL
    ON CONFLICT (provider, subject) DO UPDATE SET key_id = EXCLUDED.key_id,
        nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext,
        version = provider_tokens.version + 1, usable = TRUE,
        updated_at = EXCLUDED.updated_at
), audit AS (
    INSERT INTO audit_events
        (at, kind, actor, provider, subject, user_id, reason, detail, login_id)
    SELECT $9, n.kind, $10::text, $1, $2, n.user_id, NULL, n.detail, $11::text
    FROM (
        SELECT 'login_succeeded' AS kind, NULL::text AS detail, user_id, 0::bigint AS ord
        FROM touched
        UNION ALL
        SELECT n.kind, n.detail, bound.user_id, n.ord
        FROM bound, unnest($18::text[], $19::text[]) WITH ORDINALITY AS n (kind, detail, ord)
    ) AS n
    ORDER BY n.ord
)
SELECT user_id, created_at FROM touched
UNION ALL
SELECT user_id, NULL::timestamptz FROM bound";

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
    // Unbound, and no lookup to run: "no binding" would be all the facts.
    let unbound = (policy.union_lookup(identity).is_none()
        && policy.email_lookup(identity).is_none())
    .then(|| decide(identity, policy, &Facts::default()));
    let first = unbound
        .as_ref()
        .filter(|d| matches!(d.user, UserChoice::New));
    let create = first.is_some();
    // Time-ordered ids keep the users primary key append-mostly.
    let user_id = uuid::Uuid::now_v7().to_string();
    let notes = first.map_or(&[][..], |d| d.audit.as_slice());
    let kinds: Vec<&str> = notes.iter().map(|n| n.kind.as_str()).collect();
    let details: Vec<Option<&str>> = notes.iter().map(|n| n.detail).collect();
    let params: LoginParams = [
        &identity.provider,
        &identity.subject,
        &identity.union_id,
        &identity.username,
        &identity.display_name,
        &identity.avatar_url,
        &identity.email,
        &identity.email_verified,
        &now,
        &actor,
        &login_id,
        &token.key_id,
        &token.nonce,
        &token.ciphertext,
        &token.updated_at,
        &create,
        &user_id,
        &kinds,
        &details,
    ];
    let statement = client.prepare_cached(LOGIN).await?;
    let Some(row) = client.query_opt(&statement, &params).await? else {
        return Ok(match unbound {
            // The INSERT met a binding a concurrent login committed after
            // this statement's snapshot.
            _ if create => Applied::Raced,
            Some(Decision {
                user: UserChoice::LinkRequired,
                ..
            }) => Applied::Done(BindResult::LinkRequired),
            _ => Applied::Declined,
        });
    };
    let bound_to: String = row.try_get(0)?;
    let bound_since: Option<OffsetDateTime> = row.try_get(1)?;
    let decision = match (bound_since, unbound) {
        // A row without `created_at` is the user the statement created.
        (None, Some(first)) if create => first,
        _ => {
            let facts = Facts {
                bound_to: Some(bound_to.clone()),
                ..Facts::default()
            };
            let decision = decide(identity, policy, &facts);
            debug_assert_eq!(
                decision.audit,
                [AuditNote {
                    kind: AuditKind::LoginSucceeded,
                    detail: None
                }],
                "LOGIN audits what decide answers for a bound identity"
            );
            decision
        }
    };
    let binding = binding::binding_after(identity, bound_to, bound_since, now);
    Ok(Applied::Done(crate::store::applied(&decision, binding)))
}

/// $1 provider, $2 subject, $3–$8 profile, $9 now, $10 actor, $11 login
/// id, $12–$15 token (key id NULL: none), $16 whether to create the user
/// if unbound, $17 that user's id, $18 and $19 the audit kinds and details
/// of its decision.
type LoginParams<'a> = [&'a (dyn ToSql + Sync); 19];

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
