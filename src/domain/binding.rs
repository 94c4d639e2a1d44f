//! The binding policy's value types: what a provider's `BindPolicy` allows,
//! the `Facts` a store gathers under its locks, and the `Decision` it
//! applies. Which decision the facts lead to is not here: that is
//! `login::binding::decide`, which the login use case hands to the store as
//! a `Decide` (dex's updater functions: the storage owns the transaction,
//! the server owns the decision). So `store` depends on `domain` only, never
//! on `login`.

use time::OffsetDateTime;

use super::{AuditEvent, AuditKind, Binding, Identity, Outcome};

/// The binding policy, as `BindingStore::bind_login` calls it inside its
/// transaction: from the login's identity, its provider's policy and the
/// facts read under the store's locks to the decision to apply. Pure: no
/// I/O, so a store may call it while holding locks.
pub type Decide = fn(&Identity, &BindPolicy, &Facts) -> Decision;

/// How a first login of an unbound identity may be resolved, in the order
/// tried: union id, verified email, then create or ask the app to link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BindPolicy {
    /// `auto_create`: make a user when no rule links the identity. False is
    /// `link_required`: nothing is written and the app must link.
    pub create_user: bool,
    /// Providers sharing the login provider's `union_group` (itself
    /// included). An identity of one of them with the same union id binds
    /// the new identity to its user. Empty: off.
    pub union_group: Vec<String>,
    /// Providers trusted for email linking (`link_by_verified_email`), the
    /// login's own included. A verified email of this login binds it to the
    /// user of an identity with the same verified email at one of these
    /// providers, and only these: an untrusted provider's "verified" email
    /// must never become a way into another user. Empty: off (always empty
    /// when the login's own provider is not trusted).
    pub verified_email_providers: Vec<String>,
}

/// A candidate search a store runs for an unbound identity: the oldest
/// identity (by `created_at`, then provider, then subject) at one of
/// `providers` whose union id, or verified email ignoring case, is `value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup<'a> {
    pub value: &'a str,
    pub providers: &'a [String],
}

impl BindPolicy {
    /// The union-id search, if the rule is on and the login has a union id.
    pub fn union_lookup<'a>(&'a self, identity: &'a Identity) -> Option<Lookup<'a>> {
        let value = identity.union_id.as_deref()?;
        (!self.union_group.is_empty()).then_some(Lookup {
            value,
            providers: &self.union_group,
        })
    }

    /// The email search, if the rule is on and the login's email is
    /// verified: an unverified address is a claim, not a proof.
    pub fn email_lookup<'a>(&'a self, identity: &'a Identity) -> Option<Lookup<'a>> {
        let value = identity
            .email
            .as_deref()
            .filter(|_| identity.email_verified)?;
        (!self.verified_email_providers.is_empty()).then_some(Lookup {
            value,
            providers: &self.verified_email_providers,
        })
    }
}

/// What the decision rests on, as a store read it inside the transaction
/// that will apply the decision. The candidates are only looked for when
/// the identity is unbound, and each only when its `Lookup` is `Some`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The user the identity is already bound to.
    pub bound_to: Option<String>,
    /// What `BindPolicy::union_lookup` found.
    pub union_candidate: Option<Candidate>,
    /// What `BindPolicy::email_lookup` found.
    pub email_candidate: Option<Candidate>,
}

/// The user of the identity a lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub user_id: String,
    /// The provider of the identity that matched.
    pub provider: String,
    /// The user already has an identity at the login's provider. A user has
    /// at most one identity per provider, so the rule cannot link this one;
    /// it does not move on to another candidate either.
    pub has_provider_identity: bool,
}

/// Which user the login ends with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserChoice {
    /// A user that exists: the identity's own, or the one a rule linked.
    Existing(String),
    /// A user the store creates for the identity.
    New,
    /// None: nothing is written, the app must link the identity itself.
    LinkRequired,
}

/// The rule that settled the login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The identity was bound already: a returning login.
    ExistingBinding,
    UnionId,
    VerifiedEmail,
    /// No rule linked it and the policy creates users.
    Created,
}

impl Rule {
    /// The linking rules, as recorded.
    const LINKING: [Rule; 2] = [Rule::UnionId, Rule::VerifiedEmail];

    /// The name a linking rule is recorded under (`BindResult::linked_by`
    /// and the `identity_linked` event's detail); `None` for the others.
    pub fn linked_by(self) -> Option<&'static str> {
        match self {
            Rule::UnionId => Some("union_id"),
            Rule::VerifiedEmail => Some("verified_email"),
            Rule::ExistingBinding | Rule::Created => None,
        }
    }

    /// The linking rule recorded as `name`.
    pub fn from_linked_by(name: &str) -> Option<Rule> {
        Rule::LINKING
            .into_iter()
            .find(|rule| rule.linked_by() == Some(name))
    }
}

/// An audit event to write about the login's binding, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditNote {
    pub kind: AuditKind,
    pub detail: Option<&'static str>,
}

/// What `decide` asks the store to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub user: UserChoice,
    /// `None` exactly when the user is `LinkRequired`.
    pub rule: Option<Rule>,
    /// Empty when the user is `LinkRequired`: that writes nothing at all.
    pub audit: Vec<AuditNote>,
}

impl Decision {
    /// The decision binding the login to `user` by `rule`, with the audit
    /// events that rule writes.
    pub fn new(user: UserChoice, rule: Rule) -> Self {
        let note = |kind, detail| AuditNote { kind, detail };
        let mut audit = Vec::with_capacity(2);
        match rule {
            Rule::ExistingBinding => {}
            Rule::Created => audit.push(note(AuditKind::UserCreated, None)),
            Rule::UnionId | Rule::VerifiedEmail => {
                audit.push(note(AuditKind::IdentityLinked, rule.linked_by()));
            }
        }
        audit.push(note(AuditKind::LoginSucceeded, None));
        Decision {
            user,
            rule: Some(rule),
            audit,
        }
    }

    /// Nothing bound and nothing written: the app links the identity.
    pub fn link_required() -> Self {
        Decision {
            user: UserChoice::LinkRequired,
            rule: None,
            audit: Vec::new(),
        }
    }

    /// The identity is unbound and this decision binds it (to an existing
    /// user or a new one); the store inserts it rather than refreshing it.
    pub fn binds_identity(&self) -> bool {
        matches!(
            self.rule,
            Some(Rule::UnionId | Rule::VerifiedEmail | Rule::Created)
        )
    }

    pub fn outcome(&self) -> Outcome {
        match self.user {
            UserChoice::Existing(_) => Outcome::SignedIn,
            UserChoice::New => Outcome::UserCreated,
            UserChoice::LinkRequired => Outcome::LinkRequired,
        }
    }

    pub fn linked_by(&self) -> Option<&'static str> {
        self.rule.and_then(Rule::linked_by)
    }

    /// The audit events, about `binding` (the identity as bound once the
    /// decision is applied) and by `actor`.
    pub fn audit_events<'a>(
        &'a self,
        binding: &'a Binding,
        actor: Option<&'a str>,
    ) -> impl Iterator<Item = AuditEvent> + 'a {
        self.audit
            .iter()
            .map(move |note| AuditEvent::about(note.kind, binding, actor, note.detail))
    }
}

/// The binding of an identity, as applying a decision leaves it: a new
/// binding dates from `now`, an existing one from `bound_since`.
pub fn binding_after(
    identity: &Identity,
    user_id: String,
    bound_since: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Binding {
    Binding {
        user_id,
        provider: identity.provider.clone(),
        subject: identity.subject.clone(),
        created_at: bound_since.unwrap_or(now),
        last_login_at: now,
    }
}
