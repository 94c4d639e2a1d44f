//! The binding policy as one pure function: given a login's identity, the
//! provider's `BindPolicy` and the `Facts` a store gathered, `decide` says
//! which user the identity belongs to, by which rule, and what to audit.
//!
//! dex's split: the store owns the transaction (it gathers the facts under
//! its locks and applies the decision in the same transaction), this module
//! owns the decision. The login use case passes `decide` to
//! `BindingStore::bind_login` as a `domain::binding::Decide`, so the stores
//! never import `login`. The value types (`BindPolicy`, `Facts`,
//! `Decision` …) live in `domain::binding`. No SQL and no I/O here, so every
//! rule is written once and tested without a database.

use crate::domain::Identity;
use crate::domain::binding::{BindPolicy, Candidate, Decision, Facts, Lookup, Rule, UserChoice};

/// The login's user under `policy`: its existing binding; else the union
/// id's candidate, then the verified email's, each only if its user has no
/// identity at this provider yet; else a new user, or `LinkRequired`.
pub fn decide(identity: &Identity, policy: &BindPolicy, facts: &Facts) -> Decision {
    if let Some(user_id) = &facts.bound_to {
        return Decision::new(UserChoice::Existing(user_id.clone()), Rule::ExistingBinding);
    }
    // The candidate's provider is checked again here, so a store that
    // searched too widely still cannot link through an untrusted provider.
    let linkable = |lookup: Option<Lookup<'_>>, candidate: &Option<Candidate>| {
        let (lookup, candidate) = (lookup?, candidate.as_ref()?);
        (lookup.providers.contains(&candidate.provider) && !candidate.has_provider_identity)
            .then(|| UserChoice::Existing(candidate.user_id.clone()))
    };
    if let Some(user) = linkable(policy.union_lookup(identity), &facts.union_candidate) {
        return Decision::new(user, Rule::UnionId);
    }
    if let Some(user) = linkable(policy.email_lookup(identity), &facts.email_candidate) {
        return Decision::new(user, Rule::VerifiedEmail);
    }
    if policy.create_user {
        Decision::new(UserChoice::New, Rule::Created)
    } else {
        Decision::link_required()
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;
    use crate::domain::binding::{AuditNote, binding_after};
    use crate::domain::{AuditEvent, AuditKind, Outcome};

    fn identity(provider: &str, subject: &str) -> Identity {
        Identity {
            provider: provider.into(),
            subject: subject.into(),
            ..Identity::default()
        }
    }

    fn with_union(provider: &str, subject: &str, union_id: &str) -> Identity {
        Identity {
            union_id: Some(union_id.into()),
            ..identity(provider, subject)
        }
    }

    fn with_email(provider: &str, subject: &str, email: &str, verified: bool) -> Identity {
        Identity {
            email: Some(email.into()),
            email_verified: verified,
            ..identity(provider, subject)
        }
    }

    fn names(providers: &[&str]) -> Vec<String> {
        providers.iter().map(|p| p.to_string()).collect()
    }

    fn union_policy(group: &[&str], create_user: bool) -> BindPolicy {
        BindPolicy {
            create_user,
            union_group: names(group),
            ..BindPolicy::default()
        }
    }

    fn email_policy(trusted: &[&str], create_user: bool) -> BindPolicy {
        BindPolicy {
            create_user,
            verified_email_providers: names(trusted),
            ..BindPolicy::default()
        }
    }

    fn free(user_id: &str, provider: &str) -> Option<Candidate> {
        Some(Candidate {
            user_id: user_id.into(),
            provider: provider.into(),
            has_provider_identity: false,
        })
    }

    fn taken(user_id: &str, provider: &str) -> Option<Candidate> {
        Some(Candidate {
            has_provider_identity: true,
            ..free(user_id, provider)?
        })
    }

    fn union_facts(candidate: Option<Candidate>) -> Facts {
        Facts {
            union_candidate: candidate,
            ..Facts::default()
        }
    }

    fn email_facts(candidate: Option<Candidate>) -> Facts {
        Facts {
            email_candidate: candidate,
            ..Facts::default()
        }
    }

    /// The user and rule of a decision that binds.
    fn chosen(decision: &Decision) -> (UserChoice, Option<Rule>) {
        (decision.user.clone(), decision.rule)
    }

    fn existing(user_id: &str) -> UserChoice {
        UserChoice::Existing(user_id.into())
    }

    fn note(kind: AuditKind, detail: Option<&'static str>) -> AuditNote {
        AuditNote { kind, detail }
    }

    /// The Postgres store's one-statement returning login applies exactly
    /// this answer in SQL (`store::postgres::one_statement`).
    #[test]
    fn an_existing_binding_signs_in_whatever_the_policy() {
        let facts = Facts {
            bound_to: Some("u1".into()),
            union_candidate: free("u2", "wx"),
            email_candidate: free("u3", "github"),
        };
        for policy in [
            BindPolicy::default(),
            union_policy(&["wx", "wx-app"], true),
            email_policy(&["github", "wx-app"], false),
        ] {
            let identity = Identity {
                email: Some("a@example.com".into()),
                email_verified: true,
                ..with_union("wx-app", "1", "union")
            };
            let decision = decide(&identity, &policy, &facts);
            assert_eq!(
                chosen(&decision),
                (existing("u1"), Some(Rule::ExistingBinding))
            );
            assert_eq!(decision.audit, [note(AuditKind::LoginSucceeded, None)]);
            assert_eq!(decision.outcome(), Outcome::SignedIn);
            assert_eq!(decision.linked_by(), None);
            assert!(!decision.binds_identity());
        }
    }

    #[test]
    fn a_first_login_creates_a_user_under_auto_create() {
        let decision = decide(
            &identity("github", "1"),
            &union_policy(&[], true),
            &Facts::default(),
        );
        assert_eq!(chosen(&decision), (UserChoice::New, Some(Rule::Created)));
        assert_eq!(
            decision.audit,
            [
                note(AuditKind::UserCreated, None),
                note(AuditKind::LoginSucceeded, None)
            ]
        );
        assert_eq!(decision.outcome(), Outcome::UserCreated);
        assert!(decision.binds_identity());
    }

    // From the store scenario union_id_links_within_the_group.
    #[test]
    fn union_id_links_within_the_group() {
        let group = union_policy(&["wx-web", "wx-app"], true);
        let second = with_union("wx-app", "openid-app", "union");
        let decision = decide(&second, &group, &union_facts(free("owner", "wx-web")));
        assert_eq!(chosen(&decision), (existing("owner"), Some(Rule::UnionId)));
        assert_eq!(
            decision.audit,
            [
                note(AuditKind::IdentityLinked, Some("union_id")),
                note(AuditKind::LoginSucceeded, None)
            ]
        );
        assert_eq!(decision.outcome(), Outcome::SignedIn);
        assert_eq!(decision.linked_by(), Some("union_id"));
        assert!(decision.binds_identity());

        // A candidate at a provider outside the group links nothing.
        let outsider = union_policy(&["wx-outside"], true);
        let decision = decide(
            &with_union("wx-outside", "x", "union"),
            &outsider,
            &union_facts(free("owner", "wx-web")),
        );
        assert_eq!(chosen(&decision), (UserChoice::New, Some(Rule::Created)));

        // An empty group turns the rule off: there is nothing to look up,
        // and a candidate handed over anyway is ignored.
        let mini = with_union("wx-mini", "m", "union");
        assert_eq!(BindPolicy::default().union_lookup(&mini), None);
        let decision = decide(
            &mini,
            &union_policy(&[], true),
            &union_facts(free("owner", "wx-web")),
        );
        assert_eq!(decision.rule, Some(Rule::Created));

        // No union id: nothing to look up, nothing links.
        let plain = identity("wx-app", "no-union");
        assert_eq!(group.union_lookup(&plain), None);
        let decision = decide(&plain, &group, &union_facts(free("owner", "wx-web")));
        assert_eq!(decision.rule, Some(Rule::Created));

        // The lookup a store runs: the login's union id among the group.
        assert_eq!(
            group.union_lookup(&second),
            Some(Lookup {
                value: "union",
                providers: &group.union_group
            })
        );
    }

    // From union_id_takes_the_oldest_binding_and_skips_taken_users: which
    // binding is the oldest is the store's lookup (its conformance suite).
    #[test]
    fn a_taken_union_candidate_does_not_link() {
        let login = with_union("uc", "4", "union");
        let facts = union_facts(taken("older", "ub"));
        let decision = decide(&login, &union_policy(&["ua", "ub", "uc"], false), &facts);
        assert_eq!(decision, Decision::link_required());
        assert_eq!(decision.outcome(), Outcome::LinkRequired);
        assert!(decision.audit.is_empty());
        assert!(!decision.binds_identity());
        let decision = decide(&login, &union_policy(&["ua", "ub", "uc"], true), &facts);
        assert_eq!(chosen(&decision), (UserChoice::New, Some(Rule::Created)));
    }

    // From verified_email_links_case_insensitively (case folding is the
    // store's lookup).
    #[test]
    fn verified_email_links_and_comes_after_union_id() {
        let login = with_email("gitee", "77", "Ada@eXample.com", true);
        let policy = email_policy(&["github", "gitee"], false);
        let decision = decide(&login, &policy, &email_facts(free("owner", "github")));
        assert_eq!(
            chosen(&decision),
            (existing("owner"), Some(Rule::VerifiedEmail))
        );
        assert_eq!(
            decision.audit,
            [
                note(AuditKind::IdentityLinked, Some("verified_email")),
                note(AuditKind::LoginSucceeded, None)
            ]
        );
        assert_eq!(
            policy.email_lookup(&login),
            Some(Lookup {
                value: "Ada@eXample.com",
                providers: &policy.verified_email_providers
            })
        );

        // With the rule off, the same email makes a new user.
        let decision = decide(
            &login,
            &email_policy(&[], true),
            &email_facts(free("owner", "github")),
        );
        assert_eq!(decision.rule, Some(Rule::Created));

        // The candidate already has an identity at the login's provider.
        let decision = decide(
            &with_email("github", "2", "ada@example.com", true),
            &email_policy(&["github"], true),
            &email_facts(taken("owner", "github")),
        );
        assert_eq!(decision.rule, Some(Rule::Created));

        // Union id is tried before email; when its user is taken, email next.
        let both = Identity {
            union_id: Some("union".into()),
            ..with_email("wx-app", "b", "ada@example.com", true)
        };
        let policy = BindPolicy {
            create_user: false,
            union_group: names(&["wx", "wx-app"]),
            verified_email_providers: names(&["github", "wx-app"]),
        };
        let mut facts = Facts {
            bound_to: None,
            union_candidate: free("union-owner", "wx"),
            email_candidate: free("owner", "github"),
        };
        assert_eq!(
            chosen(&decide(&both, &policy, &facts)),
            (existing("union-owner"), Some(Rule::UnionId))
        );
        facts.union_candidate = taken("union-owner", "wx");
        assert_eq!(
            chosen(&decide(&both, &policy, &facts)),
            (existing("owner"), Some(Rule::VerifiedEmail))
        );
    }

    // From verified_email_links_only_to_trusted_providers: the takeover that
    // email linking must not allow (issue 9).
    #[test]
    fn verified_email_links_only_to_trusted_providers() {
        let victim = with_email("trusted", "victim", "VICTIM@example.com", true);
        let policy = |create_user| email_policy(&["trusted", "also-trusted"], create_user);
        let attacker = email_facts(free("attacker", "untrusted"));
        assert_eq!(
            decide(&victim, &policy(false), &attacker),
            Decision::link_required(),
            "an untrusted provider's identity is no candidate"
        );
        assert_eq!(
            decide(&victim, &policy(true), &attacker).rule,
            Some(Rule::Created)
        );
        // A trusted provider's identity links.
        let decision = decide(
            &with_email("also-trusted", "victim", "victim@example.com", true),
            &policy(false),
            &email_facts(free("victim", "trusted")),
        );
        assert_eq!(
            chosen(&decision),
            (existing("victim"), Some(Rule::VerifiedEmail))
        );
        // An untrusted login provider has email linking off altogether.
        let untrusted = with_email("untrusted", "x", "victim@example.com", true);
        assert_eq!(email_policy(&[], false).email_lookup(&untrusted), None);
    }

    // From unverified_emails_never_link (an unverified candidate is never
    // found by the store's lookup).
    #[test]
    fn unverified_or_missing_emails_never_link() {
        let policy = email_policy(&["p1", "p2"], false);
        let facts = email_facts(free("carol", "p1"));
        let unverified = with_email("p2", "2", "carol@example.com", false);
        assert_eq!(policy.email_lookup(&unverified), None);
        assert_eq!(
            decide(&unverified, &policy, &facts),
            Decision::link_required()
        );
        let none = identity("p2", "3");
        assert_eq!(policy.email_lookup(&none), None);
        assert_eq!(decide(&none, &policy, &facts), Decision::link_required());
        // Verified on both sides it does link (the setup above is right).
        let verified = with_email("p2", "2", "carol@example.com", true);
        assert_eq!(
            decide(&verified, &policy, &facts).rule,
            Some(Rule::VerifiedEmail)
        );
    }

    // From link_required_writes_nothing: candidates for both rules, both
    // taken, under link_required.
    #[test]
    fn link_required_asks_for_nothing_to_be_written() {
        let policy = BindPolicy {
            create_user: false,
            union_group: names(&["web", "app"]),
            verified_email_providers: names(&["web", "app"]),
        };
        let login = Identity {
            union_id: Some("union".into()),
            ..with_email("app", "2", "dave@example.com", true)
        };
        let facts = Facts {
            bound_to: None,
            union_candidate: taken("owner", "web"),
            email_candidate: taken("owner", "web"),
        };
        let decision = decide(&login, &policy, &facts);
        assert_eq!(
            decision,
            Decision {
                user: UserChoice::LinkRequired,
                rule: None,
                audit: Vec::new(),
            }
        );
        assert_eq!(decision.linked_by(), None);
        assert_eq!(
            decide(
                &identity("app", "1"),
                &BindPolicy::default(),
                &Facts::default()
            ),
            decision
        );
    }

    #[test]
    fn linking_rules_round_trip_their_recorded_names() {
        for rule in [
            Rule::ExistingBinding,
            Rule::UnionId,
            Rule::VerifiedEmail,
            Rule::Created,
        ] {
            let back = rule.linked_by().and_then(Rule::from_linked_by);
            assert_eq!(back, rule.linked_by().map(|_| rule));
        }
        assert_eq!(Rule::from_linked_by("admin"), None);
    }

    #[test]
    fn audit_events_are_about_the_binding_in_order() {
        let at = OffsetDateTime::UNIX_EPOCH;
        let login = with_union("app", "1", "union");
        let decision = decide(
            &login,
            &union_policy(&["web", "app"], true),
            &union_facts(free("u", "web")),
        );
        let binding = binding_after(&login, "u".into(), None, at);
        let events: Vec<AuditEvent> = decision.audit_events(&binding, Some("web")).collect();
        assert_eq!(
            events,
            [
                AuditEvent::about(
                    AuditKind::IdentityLinked,
                    &binding,
                    Some("web"),
                    Some("union_id")
                ),
                AuditEvent::about(AuditKind::LoginSucceeded, &binding, Some("web"), None),
            ]
        );
        let since = at - time::Duration::days(1);
        let returning = binding_after(&login, "u".into(), Some(since), at);
        assert_eq!((returning.created_at, returning.last_login_at), (since, at));
    }
}
