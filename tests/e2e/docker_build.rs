//! The container image's build, checked without a Docker engine.
//!
//! `Dockerfile`'s build stage (the stage its last stage copies from) is
//! replayed in a fresh directory standing for the stage's WORKDIR: COPY
//! copies from this checkout through the `.dockerignore` rules and keeps
//! modification times, as Docker does; RUN runs with `sh -c`. Cargo runs
//! offline from the local cache into a target directory kept under
//! `CARGO_TARGET_TMPDIR`, so dependencies build once and later runs rebuild
//! only authbroker. `CARGO_PROFILE_RELEASE_*` turns the release profile's
//! optimisation off: the command stays the Dockerfile's, it costs what a
//! debug build costs, and a missing path fails at any optimisation level.
//!
//! A replay takes minutes on a cold cache, so those tests are `#[ignore]`d
//! and `.ci/run` runs them as a step of their own; the parsers and the
//! checks that build nothing run with every `cargo test`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The release profile at a debug build's cost (see the module doc).
const CHEAP_RELEASE: [(&str, &str); 3] = [
    ("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0"),
    ("CARGO_PROFILE_RELEASE_DEBUG", "false"),
    ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "256"),
];

/// One instruction: continuation lines joined, leading `--flag=…` split off.
#[derive(Clone, Debug, PartialEq)]
struct Instruction {
    keyword: String,
    flags: Vec<String>,
    text: String,
}

impl Instruction {
    fn parse(line: &str) -> Instruction {
        let (keyword, mut rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let mut flags = Vec::new();
        while let Some(flagged) = rest.trim_start().strip_prefix("--") {
            let (flag, tail) = flagged
                .split_once(char::is_whitespace)
                .unwrap_or((flagged, ""));
            flags.push(flag.to_string());
            rest = tail;
        }
        Instruction {
            keyword: keyword.to_ascii_uppercase(),
            flags,
            text: rest.trim().to_string(),
        }
    }

    /// The exec form's JSON array, if the text is one.
    fn exec_form(&self) -> Option<Vec<String>> {
        self.text
            .starts_with('[')
            .then(|| serde_json::from_str(&self.text).expect("a JSON array of strings"))
    }

    /// The exec form's array, or the shell form's words.
    fn words(&self) -> Vec<String> {
        self.exec_form()
            .unwrap_or_else(|| self.text.split_whitespace().map(String::from).collect())
    }

    fn flag(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
    }
}

#[derive(Debug)]
struct Stage {
    name: Option<String>,
    instructions: Vec<Instruction>,
}

#[derive(Debug)]
struct Dockerfile {
    stages: Vec<Stage>,
}

impl Dockerfile {
    fn read() -> Dockerfile {
        Dockerfile::parse(&fs::read_to_string(Path::new(REPO).join("Dockerfile")).unwrap())
    }

    /// Comment lines go, also inside a continuation, as in Docker.
    fn parse(text: &str) -> Dockerfile {
        let mut lines = Vec::new();
        let mut current = String::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.strip_suffix('\\') {
                Some(head) => {
                    current.push_str(head);
                    current.push(' ');
                }
                None => {
                    current.push_str(line);
                    lines.push(std::mem::take(&mut current));
                }
            }
        }
        assert!(
            current.is_empty(),
            "the Dockerfile ends inside a continuation"
        );
        let mut stages = Vec::new();
        for ins in lines.iter().map(|l| Instruction::parse(l)) {
            if ins.keyword == "FROM" {
                let words = ins.words();
                let name = match &words[..] {
                    [_, r#as, name] if r#as.eq_ignore_ascii_case("as") => Some(name.clone()),
                    [_] => None,
                    _ => panic!("cannot read FROM {}", ins.text),
                };
                stages.push(Stage {
                    name,
                    instructions: Vec::new(),
                });
            } else {
                let stage = stages.last_mut().expect("the Dockerfile starts with FROM");
                stage.instructions.push(ins);
            }
        }
        Dockerfile { stages }
    }

    fn last_stage(&self) -> &Stage {
        self.stages.last().expect("the Dockerfile has a stage")
    }

    /// The last stage's `COPY --from=STAGE SOURCE DEST`s.
    fn artifacts(&self) -> impl Iterator<Item = (&str, Vec<String>)> {
        self.last_stage()
            .instructions
            .iter()
            .filter(|i| i.keyword == "COPY")
            .filter_map(|i| Some((i.flag("from")?, i.words())))
    }

    /// The stage the last stage copies its binary from.
    fn build_stage(&self) -> &Stage {
        let mut names: Vec<&str> = self.artifacts().map(|(from, _)| from).collect();
        names.dedup();
        let [name] = names[..] else {
            panic!("the last stage should copy from one build stage, not {names:?}");
        };
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no stage is named {name}"))
    }

    /// The last stage's `HEALTHCHECK … CMD [..]`.
    fn healthcheck(&self) -> Vec<String> {
        let ins = self
            .last_stage()
            .instructions
            .iter()
            .find(|i| i.keyword == "HEALTHCHECK")
            .expect("the image has a HEALTHCHECK");
        let cmd = Instruction::parse(&ins.text);
        assert_eq!(cmd.keyword, "CMD", "HEALTHCHECK {}", ins.text);
        cmd.exec_form().expect("HEALTHCHECK CMD in exec form")
    }
}

/// `.dockerignore` as Docker reads it: the last rule that matches a path or
/// one of its parent directories decides, and `!` lets a path back in.
struct DockerIgnore {
    rules: Vec<(bool, Vec<String>)>,
}

impl DockerIgnore {
    fn read() -> DockerIgnore {
        DockerIgnore::parse(
            &fs::read_to_string(Path::new(REPO).join(".dockerignore")).unwrap_or_default(),
        )
    }

    fn parse(text: &str) -> DockerIgnore {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                assert!(
                    !l.contains(['[', '\\']),
                    "the replay does not know character classes or escapes: {l}"
                );
                let (excludes, pattern) = match l.strip_prefix('!') {
                    Some(p) => (false, p),
                    None => (true, l),
                };
                (excludes, segments(pattern))
            })
            .collect();
        DockerIgnore { rules }
    }

    /// Whether `path`, relative to the context root, is left out.
    fn excludes(&self, path: &str) -> bool {
        let path = segments(path);
        let mut excluded = false;
        for (excludes, pattern) in &self.rules {
            if (1..=path.len()).any(|n| glob(pattern, &path[..n])) {
                excluded = *excludes;
            }
        }
        excluded
    }
}

fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .map(String::from)
        .collect()
}

/// Path segments against pattern segments, `**` standing for any number.
fn glob(pattern: &[String], path: &[String]) -> bool {
    match (pattern.split_first(), path.split_first()) {
        (Some((p, rest)), _) if p == "**" => {
            glob(rest, path) || (!path.is_empty() && glob(pattern, &path[1..]))
        }
        (Some((p, prest)), Some((s, srest))) => {
            wildcard(p.as_bytes(), s.as_bytes()) && glob(prest, srest)
        }
        (None, None) => true,
        _ => false,
    }
}

/// One segment: `*` any run of characters, `?` any one.
fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (Some((b'*', rest)), _) => {
            wildcard(rest, name) || (!name.is_empty() && wildcard(pattern, &name[1..]))
        }
        (Some((p, prest)), Some((n, nrest))) => (*p == b'?' || p == n) && wildcard(prest, nrest),
        (None, None) => true,
        _ => false,
    }
}

/// A build stage replayed in a fresh directory; `target/` in it is a link to
/// the kept cargo target directory.
struct Replay {
    workdir: String,
    dir: tempfile::TempDir,
}

impl Replay {
    /// Replays a stage's instructions; Err says which one failed and how.
    fn run(instructions: &[Instruction], ignore: &DockerIgnore) -> Result<Replay, String> {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docker-build");
        fs::create_dir_all(&target).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("target")).unwrap();
        let mut replay = Replay {
            workdir: "/".into(),
            dir,
        };
        for ins in instructions {
            match ins.keyword.as_str() {
                "WORKDIR" => {
                    assert_eq!(replay.workdir, "/", "the replay knows one WORKDIR");
                    replay.workdir = replay.image_path(&ins.text);
                }
                "COPY" => replay.copy(ins, ignore)?,
                "RUN" => replay.shell(ins, &target)?,
                other => panic!("the replay does not know {other}: teach it in {}", file!()),
            }
        }
        Ok(replay)
    }

    /// An absolute path in the image; relative ones are under WORKDIR.
    fn image_path(&self, path: &str) -> String {
        let joined = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("{}/{path}", self.workdir)
        };
        format!("/{}", segments(&joined).join("/"))
    }

    /// Where an image path of the stage is on this machine: the replay's
    /// directory stands for WORKDIR.
    fn local(&self, path: &str) -> PathBuf {
        let path = self.image_path(path);
        let rel = path
            .strip_prefix(&self.workdir)
            .unwrap_or_else(|| panic!("the replay only knows paths under WORKDIR, not {path}"));
        self.dir.path().join(rel.trim_start_matches('/'))
    }

    fn copy(&self, ins: &Instruction, ignore: &DockerIgnore) -> Result<(), String> {
        assert!(
            ins.flags.is_empty(),
            "the replay does not know COPY {ins:?}"
        );
        let mut sources = ins.words();
        let dest = sources.pop().expect("COPY has a destination");
        let into_dir = dest.ends_with('/') || sources.len() > 1;
        let dest = self.local(&dest);
        for source in &sources {
            assert!(
                !source.contains(['*', '?']),
                "the replay does not expand wildcards: {source}"
            );
            let rel = in_context(source, ignore)?;
            let from = Path::new(REPO).join(&rel);
            if from.is_dir() {
                copy_tree(&from, &rel, &dest, ignore);
            } else if into_dir {
                copy_file(&from, &dest.join(from.file_name().unwrap()));
            } else {
                copy_file(&from, &dest);
            }
        }
        Ok(())
    }

    fn shell(&self, ins: &Instruction, target: &Path) -> Result<(), String> {
        assert!(ins.flags.is_empty(), "the replay does not know RUN {ins:?}");
        let mut cmd = match ins.exec_form() {
            Some(argv) => {
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..]);
                cmd
            }
            None => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c").arg(&ins.text);
                cmd
            }
        };
        let out = cmd
            .current_dir(self.dir.path())
            .env("CARGO_TARGET_DIR", target)
            .env("CARGO_NET_OFFLINE", "true")
            .envs(CHEAP_RELEASE)
            .output()
            .unwrap();
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        Err(format!(
            "RUN {} failed ({}):\n{}",
            ins.text,
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    }
}

/// A COPY source's path in the context, if the context holds it.
fn in_context(source: &str, ignore: &DockerIgnore) -> Result<String, String> {
    let rel = segments(source).join("/");
    if (!rel.is_empty() && ignore.excludes(&rel)) || !Path::new(REPO).join(&rel).exists() {
        return Err(format!("COPY {source}: not in the build context"));
    }
    Ok(rel)
}

/// A directory's contents, less what `.dockerignore` leaves out; `rel` is
/// its path in the context.
fn copy_tree(from: &Path, rel: &str, to: &Path, ignore: &DockerIgnore) {
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if ignore.excludes(&rel) {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &rel, &to.join(&name), ignore);
        } else {
            copy_file(&entry.path(), &to.join(&name));
        }
    }
}

/// Keeps the modification time, as Docker's COPY does: cargo decides what
/// to rebuild by it.
fn copy_file(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    fs::copy(from, to).unwrap();
    let modified = fs::metadata(from).unwrap().modified().unwrap();
    fs::File::options()
        .write(true)
        .open(to)
        .unwrap()
        .set_modified(modified)
        .unwrap();
}

#[test]
fn dockerfile_lines_join_and_flags_split() {
    let file = Dockerfile::parse(
        "# syntax=docker/dockerfile:1\n\
         FROM rust AS build\n\
         WORKDIR /src\n\
         COPY a b ./\n\
         RUN one \\\n\
         # a comment inside the continuation\n\
         \x20 && two\n\
         \n\
         FROM debian\n\
         COPY --from=build /src/target/release/x /usr/local/bin/x\n\
         HEALTHCHECK --interval=10s \\\n  CMD [\"x\", \"healthcheck\"]\n",
    );
    let build = file.build_stage();
    assert_eq!(build.name.as_deref(), Some("build"));
    let texts: Vec<_> = build
        .instructions
        .iter()
        .map(|i| format!("{} {}", i.keyword, i.text))
        .collect();
    assert_eq!(texts, ["WORKDIR /src", "COPY a b ./", "RUN one  && two"]);
    let (from, words) = file.artifacts().next().unwrap();
    assert_eq!(from, "build");
    assert_eq!(words, ["/src/target/release/x", "/usr/local/bin/x"]);
    assert_eq!(file.healthcheck(), ["x", "healthcheck"]);
}

#[test]
fn dockerignore_follows_dockers_rules() {
    let ignore = DockerIgnore::parse("# all\n*\n!src\n!Cargo.*\n**/*.db\n/keep/dropped/\n");
    for (path, excluded) in [
        ("README.md", true),
        ("target/debug/x", true),
        ("src", false),
        ("src/main.rs", false),
        ("src/deep/dev.db", true),
        ("Cargo.toml", false),
        ("Cargo.lock", false),
        ("keep/dropped/x", true),
    ] {
        assert_eq!(ignore.excludes(path), excluded, "{path}");
    }
}

/// The cheap half of the replay: every COPY source is in the context.
#[test]
fn the_build_stage_copies_only_what_the_context_holds() {
    let ignore = DockerIgnore::read();
    for ins in &Dockerfile::read().build_stage().instructions {
        if ins.keyword == "COPY" {
            let mut sources = ins.words();
            sources.pop();
            for source in sources {
                in_context(&source, &ignore).unwrap();
            }
        }
    }
}

/// The image's HEALTHCHECK names the binary the image installs and a
/// subcommand it has.
#[test]
fn the_image_healthcheck_is_a_command_of_the_binary() {
    let file = Dockerfile::read();
    let check = file.healthcheck();
    let installed: Vec<String> = file
        .artifacts()
        .filter_map(|(_, words)| Some(words.last()?.rsplit('/').next()?.to_string()))
        .collect();
    assert!(installed.contains(&check[0]), "{check:?} vs {installed:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_authbroker"))
        .args(&check[1..])
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "builds the image's binary offline (minutes on a cold cache); .ci/run runs it"]
fn the_build_stage_builds_offline() {
    let file = Dockerfile::read();
    let replay = Replay::run(&file.build_stage().instructions, &DockerIgnore::read())
        .unwrap_or_else(|e| panic!("{e}"));
    for (_, words) in file.artifacts() {
        let built = replay.local(&words[0]);
        let out = Command::new(&built)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", built.display()));
        // A stand-in from the dependency layer would print nothing.
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("authbroker "),
            "{} is not the real binary",
            built.display()
        );
    }
}

#[test]
#[ignore = "builds the dependency layer offline (minutes on a cold cache); .ci/run runs it"]
fn a_build_stage_that_forgets_examples_fails() {
    let file = Dockerfile::read();
    let all = &file.build_stage().instructions;
    let without: Vec<Instruction> = all
        .iter()
        .filter(|i| !(i.keyword == "COPY" && i.words()[0] == "examples"))
        .cloned()
        .collect();
    assert_eq!(without.len(), all.len() - 1, "one COPY examples …");
    let err = match Replay::run(&without, &DockerIgnore::read()) {
        Ok(_) => panic!("the build succeeded without examples/"),
        Err(e) => e,
    };
    assert!(err.contains("loadgen"), "{err}");
}
