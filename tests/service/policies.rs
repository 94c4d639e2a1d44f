//! Binding policies over gRPC: link_required with link tickets and
//! LinkIdentity, link_by_union_id across a union group, and
//! link_by_verified_email, with their errors and races.

use std::{collections::HashMap, sync::Arc, time::Duration};

use crate::support::{
    emulators::{Emulator, qq::QqEmulator},
    *,
};
use authbroker::{config::Policy, grpc::pb::Outcome};
use tonic::Code;

fn link_required(s: &mut authbroker::config::Settings) {
    s.login.policy = Policy::LinkRequired;
}

#[tokio::test]
async fn link_required_persists_nothing_until_the_app_links() {
    let app = spawn_app(link_required).await;
    let done = app.sandbox_login("alice").await;
    assert_eq!(done.outcome(), Outcome::LinkRequired);
    assert!(done.binding.is_none(), "nothing is bound yet");
    assert_eq!(done.link_ticket.len(), 43);
    let identity = done.identity.clone().unwrap();
    assert_eq!(identity.username, "alice");
    assert_eq!(app.store.count_users().await.unwrap(), 0);
    assert!(
        app.store
            .list_audit_events(&Default::default())
            .await
            .unwrap()
            .is_empty(),
        "link_required writes nothing, not even audit"
    );

    let linked = app.link(&done.link_ticket, "app-user-1").await.unwrap();
    let binding = linked.binding.unwrap();
    assert_eq!(
        binding.user_id, "app-user-1",
        "the app's own id is the user id"
    );
    assert_eq!(binding.subject, identity.subject);
    assert_eq!(linked.identity.unwrap().subject, identity.subject);
    assert_eq!(app.store.count_users().await.unwrap(), 1);

    // The ticket works once.
    let err = app.link(&done.link_ticket, "app-user-1").await.unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "LINK_TICKET_ALREADY_USED");

    // Once bound, the identity signs in without a ticket.
    let again = app.sandbox_login("alice").await;
    assert_eq!(again.outcome(), Outcome::SignedIn);
    assert_eq!(again.binding.unwrap().user_id, "app-user-1");
    assert!(again.link_ticket.is_empty());

    // One identity per provider per user.
    let bob = app.sandbox_login("bob").await;
    let err = app.link(&bob.link_ticket, "app-user-1").await.unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "PROVIDER_ALREADY_LINKED");
    assert!(
        app.store
            .find_binding("sandbox", &bob.identity.unwrap().subject)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn an_identity_bound_elsewhere_cannot_be_linked_again() {
    let app = spawn_app(link_required).await;
    // Two logins of carol before either is linked: two tickets.
    let first = app.sandbox_login("carol").await;
    let second = app.sandbox_login("carol").await;
    app.link(&first.link_ticket, "u1").await.unwrap();
    let err = app.link(&second.link_ticket, "u2").await.unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "IDENTITY_LINKED_ELSEWHERE");
    let subject = first.identity.unwrap().subject;
    let bound = app
        .store
        .find_binding("sandbox", &subject)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bound.user_id, "u1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_links_of_one_identity_leave_one_binding() {
    let app = Arc::new(spawn_app(link_required).await);
    let mut tickets = Vec::new();
    for _ in 0..8 {
        tickets.push(app.sandbox_login("dora").await.link_ticket);
    }
    let calls: Vec<_> = tickets
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let app = app.clone();
            tokio::spawn(async move { app.link(&t, &format!("user-{i}")).await })
        })
        .collect();
    let mut winners = Vec::new();
    for c in calls {
        match c.await.unwrap() {
            Ok(l) => winners.push(l.binding.unwrap().user_id),
            Err(e) => {
                assert_error(&e, Code::FailedPrecondition, "IDENTITY_LINKED_ELSEWHERE");
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one link wins: {winners:?}");
}

#[tokio::test]
async fn link_ticket_and_user_id_are_checked() {
    let app = spawn_app(|s| {
        link_required(s);
        s.login.link_ticket_ttl = Duration::from_millis(300);
    })
    .await;
    let done = app.sandbox_login("erin").await;
    for (user_id, reason) in [
        ("", "MISSING_FIELD"),
        (&*"x".repeat(129), "FIELD_TOO_LONG"),
        ("bad\nid", "INVALID_FIELD"),
        (" padded", "INVALID_FIELD"),
    ] {
        let err = app.link(&done.link_ticket, user_id).await.unwrap_err();
        assert_error(&err, Code::InvalidArgument, reason);
        assert_eq!(violation_field(&err), "user_id");
    }
    let err = app.link("not-a-ticket", "u").await.unwrap_err();
    assert_error(&err, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(violation_field(&err), "link_ticket");
    let err = app.link(&"A".repeat(43), "u").await.unwrap_err();
    assert_error(&err, Code::NotFound, "LINK_TICKET_UNKNOWN");

    // Bad input above did not consume the ticket; time does.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = app.link(&done.link_ticket, "u").await.unwrap_err();
    assert_error(&err, Code::FailedPrecondition, "LINK_TICKET_EXPIRED");
    assert_eq!(app.store.count_users().await.unwrap(), 0);
}

#[tokio::test]
async fn per_provider_policy_overrides_the_default() {
    let app = spawn_app(|s| {
        link_required(s);
        let mut open = provider("sandbox", "", "");
        open.policy = Some(Policy::AutoCreate);
        s.providers.insert("open".into(), open);
    })
    .await;
    assert_eq!(
        app.sandbox_login("fay").await.outcome(),
        Outcome::LinkRequired
    );
    let begun = app.begin_with("open").await;
    let (code, state) = app.sandbox_authorize(&begun.authorize_url, "fay").await;
    let done = app.complete(&state, &code).await.unwrap();
    assert_eq!(done.outcome(), Outcome::UserCreated);
}

async fn qq_login(
    app: &TestApp,
    emu: &QqEmulator,
    provider: &str,
    seed: &str,
) -> authbroker::grpc::pb::CompleteLoginResponse {
    let begun = app.begin_with(provider).await;
    let q: HashMap<String, String> = emu
        .approve(&begun.authorize_url, seed)
        .unwrap()
        .into_iter()
        .collect();
    app.complete(&begun.state, &q["code"]).await.unwrap()
}

#[tokio::test]
async fn union_id_links_apps_of_one_developer_account() {
    let emu = QqEmulator::start().await;
    emu.set_union_id_enabled(true);
    let app = spawn_app(|s| {
        s.login.link_by_union_id = true;
        for name in ["qq_web", "qq_mobile"] {
            let mut c = emu.provider_config();
            c.union_id = true;
            c.union_group = Some("tencent".into());
            s.providers.insert(name.into(), c);
        }
        // Same union ids, but not in the group: must not link.
        let mut other = emu.provider_config();
        other.union_id = true;
        other.union_group = Some("elsewhere".into());
        s.providers.insert("qq_other".into(), other);
    })
    .await;
    emu.add_user("gao");
    let web = qq_login(&app, &emu, "qq_web", "gao").await;
    assert_eq!(web.outcome(), Outcome::UserCreated);
    let mobile = qq_login(&app, &emu, "qq_mobile", "gao").await;
    assert_eq!(mobile.outcome(), Outcome::SignedIn, "linked by union id");
    assert_eq!(
        mobile.binding.as_ref().unwrap().user_id,
        web.binding.as_ref().unwrap().user_id
    );
    let other = qq_login(&app, &emu, "qq_other", "gao").await;
    assert_eq!(
        other.outcome(),
        Outcome::UserCreated,
        "another group is another user"
    );

    let events = app
        .store
        .list_audit_events(&Default::default())
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .any(|r| r.event.kind.as_str() == "identity_linked"
                && r.event.detail.as_deref() == Some("union_id")
                && r.event.provider.as_deref() == Some("qq_mobile"))
    );
}

#[tokio::test]
async fn verified_email_links_only_between_trusted_providers() {
    let app = spawn_app(|s| {
        for name in ["linking", "linking2"] {
            let mut linking = provider("sandbox", "", "");
            linking.link_by_verified_email = Some(true);
            s.providers.insert(name.into(), linking);
        }
        s.providers
            .insert("separate".into(), provider("sandbox", "", ""));
    })
    .await;
    // `sandbox` and `separate` are not trusted for email linking.
    let first = app.sandbox_login("gina").await;
    let login_at = |p: &'static str| {
        let app = &app;
        async move {
            let begun = app.begin_with(p).await;
            let (code, state) = app.sandbox_authorize(&begun.authorize_url, "gina").await;
            app.complete(&state, &code).await.unwrap()
        }
    };
    let separate = login_at("separate").await;
    assert_eq!(separate.outcome(), Outcome::UserCreated, "off by default");
    // The takeover of issue 9: untrusted providers vouched for gina's email
    // first, but a trusted provider's login does not join their users.
    let linked = login_at("linking").await;
    assert_eq!(linked.outcome(), Outcome::UserCreated);
    assert!(linked.identity.as_ref().unwrap().email_verified);
    let linked_user = linked.binding.unwrap().user_id;
    for other in [first.binding.unwrap(), separate.binding.unwrap()] {
        assert_ne!(linked_user, other.user_id, "no takeover");
    }
    // Another trusted provider joins the trusted provider's user.
    let joined = login_at("linking2").await;
    assert_eq!(joined.outcome(), Outcome::SignedIn);
    assert_eq!(joined.binding.unwrap().user_id, linked_user);
}
