//! Postgres for tests (DESIGN §7): every test gets its own randomly named
//! database on a server found once per test binary, in this order:
//!
//! 1. `TEST_DATABASE_URL` (a server URL; its database, if any, is used as the
//!    admin database);
//! 2. the conventional local server: libpq's `PGHOST`/`PGPORT`/`PGUSER`/
//!    `PGPASSWORD`, defaulting to `postgres@127.0.0.1:5432`, if it answers
//!    within two seconds;
//! 3. a throwaway cluster made with `initdb`/`pg_ctl` from
//!    `/usr/lib/postgresql/*/bin` (as the `postgres` user when we are root,
//!    since both refuse to run as root), stopped after this process exits;
//! 4. a throwaway container from the `postgres` image (testcontainers), where
//!    a Docker engine answers `docker info`, removed after this process exits;
//! 5. otherwise a failure that says how to provide one.
//!
//! The choice is [`choose`], a pure function of what was probed, so each
//! branch is tested here without a Docker engine or a missing server.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;
use tokio_postgres::NoTls;

pub const HOW_TO_PROVIDE: &str = "no Postgres server for the tests. Set TEST_DATABASE_URL to a \
     server URL whose user may create databases (e.g. postgres://postgres@127.0.0.1:5432), \
     run a local server reachable with the libpq PG* variables (default \
     postgres@127.0.0.1:5432), or install the PostgreSQL server binaries (initdb, pg_ctl under \
     /usr/lib/postgresql/*/bin) so the tests can start a throwaway cluster, or run a Docker \
     engine so they can start a postgres container";

/// How long the conventional local server gets to answer before we move on.
const LOCAL_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A database that exists for one test and is dropped with this value.
#[derive(Debug)]
pub struct TestDatabase {
    /// `postgres://…/authbroker_test_<uuid>`, ready for `store::open`.
    pub url: String,
    name: String,
    admin_url: String,
}

/// Creates an empty, randomly named database on the test server.
pub async fn fresh_database() -> TestDatabase {
    let server = SERVER.get_or_init(discover).await;
    let name = format!("authbroker_test_{}", uuid::Uuid::new_v4().simple());
    let admin_url = server.url_for(&server.admin_db);
    let client = connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test server's admin database: {e}"));
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
    TestDatabase {
        url: server.url_for(&name),
        name,
        admin_url,
    }
}

impl TestDatabase {
    /// A plain (no TLS) session on this database, for looking at it from
    /// outside the code under test.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connecting to test database {}: {e}", self.name))
    }
}

impl Drop for TestDatabase {
    /// Best effort, on its own thread and runtime: `Drop` cannot await, and
    /// the test's runtime may be a current-thread one we must not block on.
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropper = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let drop_it = async {
                    let Ok(client) = connect(&admin_url).await else {
                        return;
                    };
                    // FORCE (Postgres 13+) ends sessions a leaked pool still holds.
                    let forced = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await;
                    if forced.is_err() {
                        let _ = client
                            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\""))
                            .await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), drop_it).await;
            });
        });
        let _ = dropper.join();
    }
}

/// The server chosen for this test binary; discovery runs once.
static SERVER: OnceCell<Server> = OnceCell::const_new();

/// A server, as the URL pieces around the database name.
#[derive(Debug)]
struct Server {
    /// `postgres://user:password@host:port`
    prefix: String,
    /// `?…` or empty.
    query: String,
    /// An existing database to connect to for CREATE/DROP DATABASE.
    admin_db: String,
}

impl Server {
    fn url_for(&self, db: &str) -> String {
        format!("{}/{}{}", self.prefix, db, self.query)
    }

    /// Splits a server URL. Its database, if named, is the first admin
    /// candidate.
    fn parse(url: &str) -> (Self, Option<String>) {
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let rest = &url[scheme_end..];
        let authority_end = rest.find(['/', '?']).map_or(url.len(), |i| scheme_end + i);
        let (path, query) = match url[authority_end..].find('?') {
            Some(i) => (
                &url[authority_end..authority_end + i],
                &url[authority_end + i..],
            ),
            None => (&url[authority_end..], ""),
        };
        let db = path.trim_start_matches('/');
        let server = Server {
            prefix: url[..authority_end].to_owned(),
            query: query.to_owned(),
            admin_db: String::new(),
        };
        (server, (!db.is_empty()).then(|| db.to_owned()))
    }

    /// Picks the admin database: `preferred`, then `postgres`, then `test`.
    async fn with_admin_db(mut self, preferred: Option<String>) -> Result<Self, String> {
        let mut errors = Vec::new();
        let candidates = preferred
            .into_iter()
            .chain(["postgres".to_owned(), "test".to_owned()]);
        for db in candidates {
            match connect(&self.url_for(&db)).await {
                Ok(_) => {
                    self.admin_db = db;
                    return Ok(self);
                }
                Err(e) => errors.push(format!("{db}: {e}")),
            }
        }
        Err(errors.join("; "))
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Where the tests' Postgres comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    /// `TEST_DATABASE_URL`.
    Url(String),
    /// The conventional local server, which answered.
    Local,
    /// A cluster of our own from these `initdb`/`pg_ctl` binaries.
    Throwaway(PathBuf),
    /// A container, on the Docker engine that answered.
    Container,
}

/// What discovery probed, in [`choose`]'s order; a probe runs only while
/// the earlier ones found nothing.
#[derive(Debug, Default)]
pub struct Facts {
    pub database_url: Option<String>,
    pub local_answers: bool,
    pub server_binaries: Option<PathBuf>,
    pub docker_answers: bool,
}

/// The first source the facts allow, or [`HOW_TO_PROVIDE`].
pub fn choose(facts: Facts) -> Result<Source, &'static str> {
    if let Some(url) = facts.database_url {
        Ok(Source::Url(url))
    } else if facts.local_answers {
        Ok(Source::Local)
    } else if let Some(bin) = facts.server_binaries {
        Ok(Source::Throwaway(bin))
    } else if facts.docker_answers {
        Ok(Source::Container)
    } else {
        Err(HOW_TO_PROVIDE)
    }
}

impl Facts {
    /// Probes in order and stops at the first that finds a server: the
    /// local server's two seconds and `docker info` are only waited for
    /// when needed. The local server comes back with its admin database.
    async fn probe() -> (Facts, Option<Server>) {
        let mut facts = Facts {
            database_url: std::env::var("TEST_DATABASE_URL").ok(),
            ..Facts::default()
        };
        if facts.database_url.is_some() {
            return (facts, None);
        }
        // An unreachable or refusing local server just means "try the next way".
        if let Ok(Ok(server)) =
            tokio::time::timeout(LOCAL_PROBE_TIMEOUT, local_server().with_admin_db(None)).await
        {
            facts.local_answers = true;
            return (facts, Some(server));
        }
        facts.server_binaries = server_binaries();
        if facts.server_binaries.is_none() {
            facts.docker_answers = tokio::task::spawn_blocking(docker_answers)
                .await
                .unwrap_or(false);
        }
        (facts, None)
    }
}

async fn discover() -> Server {
    let (facts, local) = Facts::probe().await;
    match choose(facts) {
        Ok(Source::Url(url)) => {
            let (server, db) = Server::parse(&url);
            server
                .with_admin_db(db)
                .await
                .unwrap_or_else(|e| panic!("TEST_DATABASE_URL is set but unusable: {e}"))
        }
        Ok(Source::Local) => local.unwrap_or_else(local_server),
        Ok(Source::Throwaway(bin)) => {
            let server = tokio::task::spawn_blocking(move || start_cluster(&bin))
                .await
                .unwrap_or_else(|e| panic!("starting a throwaway Postgres cluster panicked: {e}"))
                .unwrap_or_else(|e| panic!("could not start a throwaway Postgres cluster: {e}"));
            server
                .with_admin_db(None)
                .await
                .unwrap_or_else(|e| panic!("the throwaway Postgres cluster does not answer: {e}"))
        }
        Ok(Source::Container) => {
            let server = start_container()
                .await
                .unwrap_or_else(|e| panic!("could not start a postgres container: {e}"));
            server
                .with_admin_db(None)
                .await
                .unwrap_or_else(|e| panic!("the postgres container does not answer: {e}"))
        }
        Err(how) => panic!("{how}"),
    }
}

/// A `postgres` container (the module's image and `postgres`/`postgres`
/// credentials), removed once this process exits.
async fn start_container() -> Result<Server, String> {
    use testcontainers_modules::{postgres::Postgres, testcontainers::runners::AsyncRunner};

    let container = Postgres::default()
        .start()
        .await
        .map_err(|e| e.to_string())?;
    let host = container.get_host().await.map_err(|e| e.to_string())?;
    let port = container
        .get_host_port_ipv4(5432)
        .await
        .map_err(|e| e.to_string())?;
    when_this_process_exits(&format!("docker rm -f -v {}", container.id()));
    // Its Drop would remove the container as soon as the first test's
    // runtime ends; the watcher above removes it at exit instead.
    std::mem::forget(container);
    Ok(Server {
        prefix: format!("postgres://postgres:postgres@{host}:{port}"),
        query: String::new(),
        admin_db: String::new(),
    })
}

/// libpq's environment, with its defaults where unset.
fn local_server() -> Server {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let host = var("PGHOST").unwrap_or_else(|| "127.0.0.1".to_owned());
    let port = var("PGPORT").unwrap_or_else(|| "5432".to_owned());
    let user = var("PGUSER").unwrap_or_else(|| "postgres".to_owned());
    let host = if host.starts_with('/') {
        // A Unix socket directory: percent-encoded in the host position.
        percent_encode(&host)
    } else if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let credentials = match var("PGPASSWORD") {
        Some(password) => format!("{}:{}", percent_encode(&user), percent_encode(&password)),
        None => percent_encode(&user),
    };
    Server {
        prefix: format!("postgres://{credentials}@{host}:{port}"),
        query: String::new(),
        admin_db: String::new(),
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding initdb and pg_ctl.
fn server_binaries() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn start_cluster(bin: &Path) -> Result<Server, String> {
    let dir = std::env::temp_dir().join(format!("authbroker-pg-{}", uuid::Uuid::new_v4().simple()));
    let data = dir.join("data");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let as_root = is_root();
    if as_root {
        run(Command::new("chown").arg("postgres:postgres").arg(&dir))?;
    }
    // initdb and pg_ctl refuse to run as root.
    let command = |program: &str| {
        let path = bin.join(program);
        if as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    };

    run(command("initdb").arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--no-sync",
    ]))?;

    let port = free_port()?;
    let log = dir.join("postgres.log");
    // Throwaway data: durability settings off for speed; the socket lives in
    // our directory so it cannot clash with a system server's.
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off",
        dir.display()
    );
    run(command("pg_ctl")
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", "60", "-o", &options, "start"]))
    .map_err(|e| {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        format!("{e}\n{log}")
    })?;

    stop_cluster_at_exit(bin, &dir, as_root);
    Ok(Server {
        prefix: format!("postgres://postgres@127.0.0.1:{port}"),
        query: String::new(),
        admin_db: String::new(),
    })
}

/// Stops the cluster and deletes its files once this process is gone.
fn stop_cluster_at_exit(bin: &Path, dir: &Path, as_root: bool) {
    let pg_ctl = bin.join("pg_ctl");
    let data = dir.join("data");
    let stop = if as_root {
        format!(
            "runuser -u postgres -- '{}' -D '{}' -m immediate stop",
            pg_ctl.display(),
            data.display()
        )
    } else {
        format!(
            "'{}' -D '{}' -m immediate stop",
            pg_ctl.display(),
            data.display()
        )
    };
    when_this_process_exits(&format!("{stop}; rm -rf '{}'", dir.display()));
}

/// Rust has no reliable exit hook, so a small detached shell watches this
/// process and, once it is gone, runs `command`.
fn when_this_process_exits(command: &str) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {command}",
        pid = std::process::id(),
    );
    let spawn = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    };
    // setsid puts the watcher in its own session, so a Ctrl-C aimed at the
    // test run does not take it down before it has cleaned up.
    if spawn("setsid", &["sh", "-c", &script]).is_err() {
        let _ = spawn("sh", &["-c", &script]);
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("finding a free port: {e}"))?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// Whether a Docker engine answers `docker info` within a few seconds.
fn docker_answers() -> bool {
    let Ok(mut child) = Command::new("docker")
        .arg("info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}
