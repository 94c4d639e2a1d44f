//! A Python grpcio client (stubs generated from our protos by grpc_tools)
//! completes a sandbox login and reads `ErrorInfo` reasons, as a Django or
//! Flask backend would. `.ci/run` installs grpcio, grpcio-tools and
//! grpcio-status.

use std::process::Command;

use crate::support::*;

fn python_has_grpc() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools, grpc_status"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_logs_in() {
    if !python_has_grpc() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs: python3 -m pip install grpcio grpcio-tools grpcio-status"
        );
        eprintln!("SKIPPED: python3 with grpcio, grpcio-tools and grpcio-status not found");
        return;
    }
    let gen_dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let protoc = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", &format!("-I{root}/proto")])
        .arg(format!("--python_out={}", gen_dir.path().display()))
        .arg(format!("--grpc_python_out={}", gen_dir.path().display()))
        .arg(format!("{root}/proto/authbroker/v1/login.proto"))
        .output()
        .unwrap();
    assert!(
        protoc.status.success(),
        "{}",
        String::from_utf8_lossy(&protoc.stderr)
    );

    let app = spawn_app(|_| {}).await;
    let addr = app.addr.to_string();
    let script = format!("{root}/tests/clients/python_login.py");
    let gen_path = gen_dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(gen_path)
            .arg(addr)
            .arg(LOGIN_KEY)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["outcome"], "OUTCOME_USER_CREATED");
    assert_eq!(seen["username"], "pythonista");
    assert_eq!(seen["return_to"], "/after");
    assert_eq!(
        seen["replay"],
        serde_json::json!(["FAILED_PRECONDITION", "STATE_ALREADY_USED", "authbroker"])
    );
    assert_eq!(
        seen["unauthenticated"],
        serde_json::json!(["UNAUTHENTICATED", "API_KEY_MISSING"])
    );
    // What Python saw is what was stored.
    let user_id = seen["user_id"].as_str().unwrap();
    let events = app
        .store
        .list_audit_events(&Default::default())
        .await
        .unwrap();
    let created = events
        .iter()
        .find(|e| e.event.kind.as_str() == "user_created")
        .expect("a user_created event");
    assert_eq!(created.event.user_id.as_deref(), Some(user_id));
    let subject = created.event.subject.as_deref().unwrap();
    let stored = app
        .store
        .find_binding("sandbox", subject)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.user_id, user_id);
}
