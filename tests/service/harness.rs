//! The harness itself: where the tests' Postgres comes from (see
//! `support::db`), each branch of the choice without the servers it
//! chooses between.

use crate::support::db::{Facts, Source, choose};

fn facts() -> Facts {
    Facts::default()
}

#[test]
fn test_database_url_comes_first() {
    let chosen = choose(Facts {
        database_url: Some("postgres://db.example:5433".into()),
        local_answers: true,
        server_binaries: Some("/usr/lib/postgresql/17/bin".into()),
        docker_answers: true,
    });
    assert_eq!(chosen, Ok(Source::Url("postgres://db.example:5433".into())));
}

#[test]
fn a_local_server_that_answers_comes_before_a_cluster_of_our_own() {
    let chosen = choose(Facts {
        local_answers: true,
        server_binaries: Some("/usr/lib/postgresql/17/bin".into()),
        docker_answers: true,
        ..facts()
    });
    assert_eq!(chosen, Ok(Source::Local));
}

#[test]
fn server_binaries_come_before_docker() {
    let chosen = choose(Facts {
        server_binaries: Some("/usr/lib/postgresql/17/bin".into()),
        docker_answers: true,
        ..facts()
    });
    assert_eq!(
        chosen,
        Ok(Source::Throwaway("/usr/lib/postgresql/17/bin".into()))
    );
}

#[test]
fn docker_alone_means_a_container() {
    let chosen = choose(Facts {
        docker_answers: true,
        ..facts()
    });
    assert_eq!(chosen, Ok(Source::Container));
}

#[test]
fn nothing_found_fails_saying_how_to_provide_postgres() {
    let how = choose(facts()).unwrap_err();
    for way in ["TEST_DATABASE_URL", "PG", "initdb", "Docker"] {
        assert!(how.contains(way), "{way} missing from: {how}");
    }
}
