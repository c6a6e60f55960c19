//! Bad input gets one clear error line naming the host and the cause, a
//! non-zero exit, never a panic, and never a password in the output.

use std::time::Duration;

use harness::server::free_port;
use harness::shardsync::Finished;
use harness::{wait_for, RedisServer, Shardsync, SHORT};

const BIN: &str = env!("CARGO_BIN_EXE_shardsync");

fn run_sync(args: &[&str]) -> Finished {
    Shardsync::run(BIN, "sync", args, SHORT)
}

fn assert_clean_failure(done: &Finished, code: i32, needles: &[&str]) {
    assert_eq!(done.code(), Some(code), "{}", done.log);
    for needle in needles {
        assert!(
            done.log.contains(needle),
            "expected {needle:?} in:\n{}",
            done.log
        );
    }
    assert!(!done.log.contains("panicked"), "{}", done.log);
}

#[test]
fn wrong_source_password_is_refused_at_once() {
    let source = RedisServer::config().password("right-pass").start();
    let target = RedisServer::start();
    let url = format!("redis://:wrong-pass@127.0.0.1:{}", source.port);
    let done = run_sync(&["--source", &url, "--target", &target.url()]);
    assert_clean_failure(&done, 3, &[&source.addr(), "authentication failed"]);
    assert!(
        !done.log.contains("wrong-pass"),
        "the password leaked:\n{}",
        done.log
    );
}

#[test]
fn missing_password_is_reported_as_such() {
    let source = RedisServer::config().password("right-pass").start();
    let target = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}", source.port);
    let done = run_sync(&["--source", &url, "--target", &target.url()]);
    assert_clean_failure(&done, 3, &[&source.addr(), "NOAUTH"]);
}

#[test]
fn wrong_target_password_is_refused_at_once() {
    let source = RedisServer::start();
    let target = RedisServer::config().password("t-pass").start();
    let url = format!("redis://admin:nope@127.0.0.1:{}", target.port);
    let done = run_sync(&["--source", &source.url(), "--target", &url]);
    assert_clean_failure(&done, 3, &[&target.addr(), "authentication failed"]);
    assert!(
        !done.log.contains("nope"),
        "the password leaked:\n{}",
        done.log
    );
}

#[test]
fn unreachable_hosts_are_named() {
    let target = RedisServer::start();
    let dead = free_port();
    let done = run_sync(&[
        "--source",
        &format!("redis://127.0.0.1:{dead}"),
        "--target",
        &target.url(),
    ]);
    assert_clean_failure(&done, 3, &[&format!("127.0.0.1:{dead}"), "cannot connect"]);

    let source = RedisServer::start();
    let done = run_sync(&[
        "--source",
        &source.url(),
        "--target",
        &format!("redis://127.0.0.1:{dead}"),
    ]);
    assert_clean_failure(&done, 3, &[&format!("127.0.0.1:{dead}"), "cannot connect"]);
}

#[test]
fn a_non_empty_target_is_refused_and_left_untouched() {
    let source = RedisServer::start();
    harness::data::load_strings(&source, 50, "src:");
    redis::cmd("SET")
        .arg("shared")
        .arg("from the source")
        .query::<()>(&mut source.client())
        .unwrap();
    let target = RedisServer::start();
    redis::cmd("SET")
        .arg("shared")
        .arg("the target's own")
        .query::<()>(&mut target.client())
        .unwrap();

    let done = run_sync(&["--source", &source.url(), "--target", &target.url()]);
    assert_clean_failure(&done, 3, &[&target.addr(), "not empty", "--on-conflict"]);
    assert_eq!(target.dbsize(0), 1);
    let kept: String = redis::cmd("GET")
        .arg("shared")
        .query(&mut target.client())
        .unwrap();
    assert_eq!(kept, "the target's own");
}

#[test]
fn on_conflict_ignore_lets_the_source_win_and_skip_keeps_the_target() {
    for (mode, want) in [("ignore", "from the source"), ("skip", "the target's own")] {
        let source = RedisServer::start();
        let mut con = source.client();
        redis::cmd("SET")
            .arg("shared")
            .arg("from the source")
            .query::<()>(&mut con)
            .unwrap();
        redis::cmd("RPUSH")
            .arg("list")
            .arg("s1")
            .arg("s2")
            .query::<()>(&mut con)
            .unwrap();
        let target = RedisServer::start();
        let mut tcon = target.client();
        redis::cmd("SET")
            .arg("shared")
            .arg("the target's own")
            .query::<()>(&mut tcon)
            .unwrap();
        redis::cmd("RPUSH")
            .arg("list")
            .arg("t1")
            .query::<()>(&mut tcon)
            .unwrap();
        redis::cmd("SET")
            .arg("target-only")
            .arg("x")
            .query::<()>(&mut tcon)
            .unwrap();

        let sync = Shardsync::sync(
            BIN,
            &[
                "--source",
                &source.url(),
                "--target",
                &target.url(),
                "--on-conflict",
                mode,
            ],
        );
        sync.wait_caught_up(&source, SHORT);
        let shared: String = redis::cmd("GET").arg("shared").query(&mut tcon).unwrap();
        assert_eq!(shared, want, "--on-conflict {mode}");
        let list: Vec<String> = redis::cmd("LRANGE")
            .arg("list")
            .arg(0)
            .arg(-1)
            .query(&mut tcon)
            .unwrap();
        // Never a merged (duplicated) list: one side's list, whole.
        if mode == "ignore" {
            assert_eq!(list, ["s1", "s2"]);
        } else {
            assert_eq!(list, ["t1"]);
            let skipped = sync.metrics().unwrap();
            assert!(
                skipped.contains("shardsync_keys_skipped_total"),
                "{skipped}"
            );
        }
        let other: String = redis::cmd("GET")
            .arg("target-only")
            .query(&mut tcon)
            .unwrap();
        assert_eq!(other, "x");
    }
}

#[test]
fn bad_command_lines_exit_2_without_echoing_secrets() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--source", "http://h:1", "--target", "redis://h:2"],
            "scheme",
        ),
        (
            &[
                "--source",
                "redis://u:secretpw@h",
                "--target",
                "redis://h:2",
            ],
            "no port",
        ),
        (&["--source", "redis://h:1"], "no target"),
        (
            &[
                "--source",
                "redis://h:1",
                "--target",
                "redis://h:2",
                "--retry-timeout",
                "soon",
            ],
            "--retry-timeout",
        ),
        (
            &[
                "--source",
                "redis://h:1",
                "--target",
                "redis://h:2",
                "--db-map",
                "1-2",
            ],
            "--db-map",
        ),
    ];
    for (args, needle) in cases {
        let done = run_sync(args);
        assert_clean_failure(&done, 2, &[needle]);
        assert!(!done.log.contains("secretpw"), "{}", done.log);
    }
}

#[test]
fn a_malformed_config_file_names_the_problem() {
    let dir = harness::server::TempDir::new("config");
    let path = dir.path().join("task.toml");
    std::fs::write(
        &path,
        "source = 'redis://127.0.0.1:1'\ntarget = ['redis://127.0.0.1:2']\nretry = '5m'\n",
    )
    .unwrap();
    let done = run_sync(&["--config", path.to_str().unwrap()]);
    assert_clean_failure(&done, 2, &["task.toml", "retry"]);
}

#[test]
fn a_source_account_without_replication_rights_fails_at_once() {
    let source = RedisServer::start();
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("reader")
        .arg("on")
        .arg(">reader-pass")
        .arg("~*")
        .arg("+@all")
        .arg("-psync")
        .arg("-sync")
        .query::<()>(&mut source.client())
        .unwrap();
    let target = RedisServer::start();
    let url = format!("redis://reader:reader-pass@127.0.0.1:{}", source.port);
    // The default retry timeout is 12 hours: a fatal error must not wait.
    let done = Shardsync::run(
        BIN,
        "sync",
        &["--source", &url, "--target", &target.url()],
        Duration::from_secs(20),
    );
    assert_clean_failure(&done, 1, &[&source.addr(), "permission denied"]);
    assert!(!done.log.contains("reader-pass"), "{}", done.log);
}

#[test]
fn passwords_never_reach_logs_status_or_metrics() {
    let source = RedisServer::config().password("src-secret-1").start();
    let target = RedisServer::config().password("dst-secret-2").start();
    redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query::<()>(&mut source.client())
        .unwrap();
    let sync = Shardsync::sync(
        BIN,
        &[
            "--source",
            &source.url(),
            "--target",
            &format!("redis://default:dst-secret-2@127.0.0.1:{}", target.port),
        ],
    );
    sync.wait_caught_up(&source, SHORT);
    let everything = format!(
        "{}{:?}{}",
        sync.log(),
        sync.status(),
        sync.metrics().unwrap()
    );
    for secret in ["src-secret-1", "dst-secret-2"] {
        assert!(
            !everything.contains(secret),
            "{secret} leaked:\n{everything}"
        );
    }
}

#[test]
fn precheck_subcommand_reports_and_exits_by_result() {
    let source = RedisServer::start();
    let target = RedisServer::start();
    let ok = Shardsync::run(
        BIN,
        "precheck",
        &["--source", &source.url(), "--target", &target.url()],
        SHORT,
    );
    assert_eq!(ok.code(), Some(0), "{}", ok.log);
    assert!(ok.log.contains("precheck passed"), "{}", ok.log);
    redis::cmd("SET")
        .arg("x")
        .arg("y")
        .query::<()>(&mut target.client())
        .unwrap();
    let refused = Shardsync::run(
        BIN,
        "precheck",
        &["--source", &source.url(), "--target", &target.url()],
        SHORT,
    );
    assert_eq!(refused.code(), Some(3), "{}", refused.log);
    assert!(refused.log.contains("FAIL target empty"), "{}", refused.log);
    let same = Shardsync::run(
        BIN,
        "precheck",
        &["--source", &source.url(), "--target", &source.url()],
        SHORT,
    );
    assert_eq!(same.code(), Some(3), "{}", same.log);
    assert!(same.log.contains("is the source itself"), "{}", same.log);
}

#[test]
fn a_target_without_room_for_the_data_is_refused_with_both_figures() {
    let source = RedisServer::config()
        .arg("enable-debug-command", &["yes"])
        .start();
    // About 30 MB of data: 200,000 values of 100 bytes.
    source.cmd::<()>(&["DEBUG", "POPULATE", "200000", "k", "100"]);
    let small = RedisServer::config().arg("maxmemory", &["8mb"]).start();
    let refused = Shardsync::run(
        BIN,
        "precheck",
        &["--source", &source.url(), "--target", &small.url()],
        SHORT,
    );
    assert_eq!(refused.code(), Some(3), "{}", refused.log);
    let line = refused
        .log
        .lines()
        .find(|l| l.contains("FAIL target memory"))
        .unwrap_or_else(|| panic!("no memory check:\n{}", refused.log));
    assert!(
        line.contains(&small.addr()) && line.contains("maxmemory 8.0 MB"),
        "{line}"
    );
    assert!(line.contains("MB on the source"), "{line}");
    // The same data with room to spare passes.
    let roomy = RedisServer::config().arg("maxmemory", &["512mb"]).start();
    let ok = Shardsync::run(
        BIN,
        "precheck",
        &["--source", &source.url(), "--target", &roomy.url()],
        SHORT,
    );
    assert_eq!(ok.code(), Some(0), "{}", ok.log);
}

/// A key made a list on the target, a string on the source: the source's
/// APPEND to it is refused there (WRONGTYPE). The replay is wrong on that
/// node, so by default the task stops with one line naming the node, the
/// command and the key; with `--on-error skip` it is counted (by class in
/// `/status` and the metrics), logged, and the sync goes on.
#[test]
fn a_write_the_target_refuses_stops_the_task_unless_told_to_skip_it() {
    for skip in [false, true] {
        let source = RedisServer::start();
        let target = RedisServer::start();
        source.cmd::<()>(&["SET", "k", "v"]);
        let mut args = vec![
            "--source".to_string(),
            source.url(),
            "--target".into(),
            target.url(),
        ];
        if skip {
            args.extend(["--on-error".into(), "skip".into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut sync = Shardsync::sync(BIN, &args);
        sync.wait_state("incremental", Duration::from_secs(60));
        target.cmd::<()>(&["DEL", "k"]);
        target.cmd::<()>(&["RPUSH", "k", "not a string"]);
        source.cmd::<()>(&["APPEND", "k", "w"]);
        source.cmd::<()>(&["SET", "after", "1"]);
        if skip {
            wait_for("the write after it", SHORT, || {
                target.cmd::<Option<String>>(&["GET", "after"]).is_some()
            });
            let status = sync.status().expect("status");
            assert_eq!(
                status["targets"][0]["errors_by_class"]["replay"], 1,
                "{status}"
            );
            let metrics = sync.metrics().unwrap_or_default();
            let sample = |name: &str, label: &str| -> f64 {
                sync.metric_samples(name)
                    .iter()
                    .filter(|(n, _)| n.contains(label))
                    .map(|(_, v)| v)
                    .sum()
            };
            assert_eq!(
                sample("shardsync_target_errors_total", "WRONGTYPE"),
                1.0,
                "{metrics}"
            );
            assert_eq!(
                sample("shardsync_target_refusals_total", "replay"),
                1.0,
                "{metrics}"
            );
            assert!(sync.log().contains("target rejected a replayed command"));
            let done = sync.terminate(SHORT);
            assert_eq!(done.code(), Some(0), "{}", done.log);
        } else {
            let done = sync.wait_exit(SHORT);
            assert_clean_failure(
                &done,
                1,
                &[
                    &target.addr(),
                    "APPEND",
                    "\"k\"",
                    "WRONGTYPE",
                    "--on-error skip",
                ],
            );
        }
    }
}
