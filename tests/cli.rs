//! The command line as users run it: `check`, `explain`, `certs init`, `demo`, `run`'s exit
//! codes and signals, and the example config.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;
use http::StatusCode;
use rcgen::{CertificateParams, KeyPair};
use time::{Duration, OffsetDateTime};

fn cg(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("CIPHERGATE_") {
            c.env_remove(key);
        }
    }
    c
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

#[test]
fn the_example_config_passes_check_with_certs_from_certs_init() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run(cg(&["certs", "init", "--dir", "certs"]).current_dir(dir.path()));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("certs/server.crt"));
    // Every example in config/ is accepted.
    let mut checked = 0;
    for entry in std::fs::read_dir(repo("config")).unwrap() {
        let path = entry.unwrap().path();
        let (code, out, err) =
            run(cg(&["check", "-c", path.to_str().unwrap()]).current_dir(dir.path()));
        assert_eq!(code, 0, "{}: {out}{err}", path.display());
        assert!(out.contains("ok"), "{out}");
        checked += 1;
    }
    assert!(checked >= 2);

    // The same file by $CIPHERGATE_CONFIG, then by the default path.
    let (code, _, err) = run(cg(&["check"])
        .env("CIPHERGATE_CONFIG", repo("config/ciphergate.toml"))
        .current_dir(dir.path()));
    assert_eq!(code, 0, "{err}");
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::copy(
        repo("config/ciphergate.toml"),
        dir.path().join("config/ciphergate.toml"),
    )
    .unwrap();
    let (code, _, err) = run(cg(&["check"]).current_dir(dir.path()));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn yaml_and_json_configs_are_read_by_extension() {
    let ws = Workspace::new();
    let yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\nlistener:\n  - name: ingress\n    bind: 127.0.0.1:0\n    upstream: 127.0.0.1:8080\n    certs:\n      - cert: {}\n        key: {}\nrule:\n  - name: health\n    source: [10.0.0.0/8]\n    path_prefix: [/healthz]\n    action: allow\n",
        ws.p("server.crt"),
        ws.p("server.key")
    );
    let path = ws.write("c.yaml", &yaml);
    let (code, _, err) = run(&mut cg(&["check", "-c", path.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");

    let json = format!(
        r#"{{"listener": [{{"name": "ingress", "bind": "127.0.0.1:0", "upstream": "127.0.0.1:8080",
            "certs": [{{"cert": "{}", "key": "{}"}}], "min_tls_version": "1.3"}}]}}"#,
        ws.p("server.crt"),
        ws.p("server.key")
    );
    let path = ws.write("c.json", &json);
    let (code, _, err) = run(&mut cg(&["check", "-c", path.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");

    // A YAML mistake is reported with its key path too.
    let path = ws.write("bad.yml", &yaml.replace("action: allow", "action: permit"));
    let (code, _, err) = run(&mut cg(&["check", "-c", path.to_str().unwrap()]));
    assert_eq!(code, 2);
    assert!(err.contains("bad.yml: rule[0].action:"), "{err}");
}

#[test]
fn check_reports_every_error_with_file_and_key_path() {
    let ws = Workspace::new();
    let other = ws.ca.issue_server(&["localhost".into()]).unwrap();
    ws.write("other.key", &other.key_pem);
    let config = format!(
        r#"[admin]
bind = "127.0.0.1:9901"
colour = "blue"

[defaults]
handshake_timeout = "ten seconds"
max_connections = 0

[[listener]]
name = "ingress"
bind = "127.0.0.1:8443"
upstream = "127.0.0.1:8080"
protocol = "tcp"
  [[listener.certs]]
  cert = "{dir}/missing.crt"
  key = "{dir}/server.key"
  [listener.upstream_tls]
  ca = "{dir}/nope.pem"
  roots = "system"

[[listener]]
name = "ingress"
bind = "127.0.0.1:8443"
upstream = "127.0.0.1:8080"
  [[listener.certs]]
  cert = "{dir}/server.crt"
  key = "{dir}/other.key"

[[rule]]
name = "everything"
transport = "plaintext"
action = "allow"

[[rule]]
name = "to-nowhere"
listeners = ["ghost"]
source = ["10.0.0.300/8"]
action = "reject"

[[rule]]
name = "up"
transport = "plaintext"
path_prefix = ["/a/../b"]
action = "upgrade"
"#,
        dir = ws.dir.path().display()
    );
    let path = ws.config(&config);
    let (code, out, err) = run(&mut cg(&["check", "-c", path.to_str().unwrap()]));
    assert_eq!(code, 2, "{out}{err}");
    let file = path.display().to_string();
    for key in [
        "admin.colour: unknown key",
        "defaults.handshake_timeout: invalid duration",
        "defaults.max_connections: must be at least 1",
        "listener[0].certs[0].cert: cannot read",
        "listener[0].upstream_tls.roots: give either `ca` or `roots`",
        "listener[1].certs[0].key: the private key does not match the certificate",
        "listener[1].name: duplicate listener name `ingress`",
        "listener[1].bind: 127.0.0.1:8443 is already used by listener[0].bind",
        "rule[0].action: a blanket plaintext `allow` is not permitted",
        "rule[1].listeners[0]: no listener is named `ghost`",
        "rule[1].source[0]: `10.0.0.300/8` is not an IP address or CIDR",
        "rule[2].path_prefix[0]: `/a/../b` is not a normalised path",
        "rule[2].action: `upgrade` cannot apply to tcp listener `ingress`",
    ] {
        assert!(
            err.contains(&format!("{file}: {key}")),
            "missing `{key}` in:\n{err}"
        );
    }
    assert!(err.contains("13 errors"), "{err}");
}

#[test]
fn environment_overrides_are_applied_and_named_in_errors() {
    let ws = Workspace::new();
    let config = format!(
        "[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:8080\"\n{}",
        ws.certs_table()
    );
    let path = ws.config(&config);
    let path = path.to_str().unwrap();
    let (code, _, err) =
        run(cg(&["check", "-c", path]).env("CIPHERGATE_DEFAULTS__MAX_CONNECTIONS", "0"));
    assert_eq!(code, 2);
    assert!(
        err.contains("environment variable CIPHERGATE_DEFAULTS__MAX_CONNECTIONS: defaults.max_connections: must be at least 1"),
        "{err}"
    );
    let (code, _, err) = run(cg(&["check", "-c", path]).env("CIPHERGATE_LOG__COLOUR", "red"));
    assert_eq!(code, 2);
    assert!(err.contains("log.colour: unknown key"), "{err}");

    // A valid override reaches the running proxy: the admin endpoint moves.
    let proxy = ProxyProcess::start_with_env(
        Path::new(path),
        &[
            ("CIPHERGATE_ADMIN__BIND", "127.0.0.2:0"),
            ("CIPHERGATE_LOG__LEVEL", "debug"),
        ],
    );
    assert_eq!(proxy.admin.ip().to_string(), "127.0.0.2");
}

fn write_cert_with_validity(
    ws: &Workspace,
    stem: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) {
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    ws.write(&format!("{stem}.crt"), &cert.pem());
    ws.write(&format!("{stem}.key"), &key.serialize_pem());
}

#[test]
fn check_fails_on_expired_certificates_and_warns_on_soon_expiring_ones() {
    let ws = Workspace::new();
    let now = OffsetDateTime::now_utc();
    write_cert_with_validity(
        &ws,
        "expired",
        now - Duration::days(30),
        now - Duration::days(1),
    );
    write_cert_with_validity(
        &ws,
        "soon",
        now - Duration::days(30),
        now + Duration::days(5),
    );
    let listener = |stem: &str| {
        format!(
            "[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:8080\"\n  [[listener.certs]]\n  cert = \"{}\"\n  key = \"{}\"\n",
            ws.p(&format!("{stem}.crt")),
            ws.p(&format!("{stem}.key"))
        )
    };
    let path = ws.config(&listener("expired"));
    let (code, _, err) = run(&mut cg(&["check", "-c", path.to_str().unwrap()]));
    assert_eq!(code, 2);
    assert!(
        err.contains("listener[0].certs[0].cert: the certificate in"),
        "{err}"
    );
    assert!(err.contains("expired at"), "{err}");

    let path = ws.config(&listener("soon"));
    let (code, _, err) = run(&mut cg(&["check", "-c", path.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning:") && err.contains("expires soon"),
        "{err}"
    );
}

#[test]
fn check_fails_on_a_chain_out_of_order() {
    let ws = Workspace::new();
    let server = std::fs::read_to_string(ws.path("server.crt")).unwrap();
    // The leaf followed by a CA that did not issue it: the served chain would not lead a
    // client to a trusted root.
    let other = Authority::new("unrelated CA").unwrap();
    ws.write("wrong.crt", &format!("{server}{}", other.cert_pem()));
    ws.write("right.crt", &format!("{server}{}", ws.ca_pem()));
    for (file, ok) in [("wrong.crt", false), ("right.crt", true)] {
        let path = ws.config(&format!(
            "[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:8080\"\n  [[listener.certs]]\n  cert = \"{}\"\n  key = \"{}\"\n",
            ws.p(file),
            ws.p("server.key")
        ));
        let (code, _, err) = run(&mut cg(&["check", "-c", path.to_str().unwrap()]));
        if ok {
            assert_eq!(code, 0, "{err}");
        } else {
            assert_eq!(code, 2);
            assert!(
                err.contains("listener[0].certs[0].cert: certificate 1 in")
                    && err.contains("did not issue certificate 0"),
                "{err}"
            );
        }
    }
}

#[test]
fn explain_evaluates_the_same_policy_offline() {
    let dir = tempfile::tempdir().unwrap();
    run(cg(&["certs", "init", "--dir", "certs"]).current_dir(dir.path()));
    let config = repo("config/ciphergate.toml");
    let explain = |args: &[&str]| {
        let mut all = vec!["explain", "-c", config.as_str()];
        all.extend_from_slice(args);
        run(cg(&all).current_dir(dir.path()))
    };

    let (code, out, _) = explain(&[
        "--listener",
        "ingress",
        "--plaintext",
        "--source",
        "10.1.2.3",
        "--path",
        "/healthz/ready",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("rule: lb-healthcheck\naction: allow\n"),
        "{out}"
    );

    let (_, out, _) = explain(&[
        "--listener",
        "ingress",
        "--plaintext",
        "--source",
        "10.1.2.3",
        "--path",
        "/healthz/../admin",
    ]);
    assert!(out.contains("rule: default\naction: reject\n"), "{out}");
    assert!(out.contains("426"), "{out}");

    let (_, out, _) = explain(&[
        "--listener",
        "ingress",
        "--plaintext",
        "--server-name",
        "www.example.com:80",
    ]);
    assert!(
        out.contains("rule: browser-upgrade\naction: upgrade\n"),
        "{out}"
    );
    assert!(out.contains("308"), "{out}");

    let (_, out, _) = explain(&[
        "--listener",
        "ingress",
        "--tls",
        "--server-name",
        "www.example.com",
    ]);
    assert!(out.contains("rule: default\naction: allow\n"), "{out}");

    let (_, out, _) = explain(&["--listener", "egress", "--plaintext"]);
    assert!(out.contains("rule: default\naction: upgrade\n"), "{out}");
    assert!(out.contains("verified TLS"), "{out}");

    let (code, _, err) = explain(&["--listener", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("no listener is named `nope`"), "{err}");
}

#[test]
fn certs_init_never_overwrites_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("out");
    let certs = certs.to_str().unwrap();
    let (code, _, err) = run(&mut cg(&[
        "certs",
        "init",
        "--dir",
        certs,
        "--name",
        "api.internal",
        "--name",
        "10.0.0.7",
    ]));
    assert_eq!(code, 0, "{err}");
    for file in [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
    ] {
        let meta = std::fs::metadata(Path::new(certs).join(file)).unwrap();
        if file.ends_with(".key") {
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
        }
    }
    let server = std::fs::read_to_string(Path::new(certs).join("server.crt")).unwrap();
    let (code, _, err) = run(&mut cg(&["certs", "init", "--dir", certs]));
    assert_eq!(code, 2);
    assert!(err.contains("exists; pass --force"), "{err}");
    assert_eq!(
        server,
        std::fs::read_to_string(Path::new(certs).join("server.crt")).unwrap()
    );
    let (code, _, err) = run(&mut cg(&[
        "certs",
        "init",
        "--dir",
        certs,
        "--force",
        "--name",
        "bad name!",
    ]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`bad name!` is not a DNS name"), "{err}");
    let (code, _, _) = run(&mut cg(&["certs", "init", "--dir", certs, "--force"]));
    assert_eq!(code, 0);
    assert_ne!(
        server,
        std::fs::read_to_string(Path::new(certs).join("server.crt")).unwrap()
    );

    // The certificates work: openssl verifies the server certificate against the CA.
    let (code, out, err) = run(Command::new("openssl").args([
        "verify",
        "-CAfile",
        &format!("{certs}/ca.crt"),
        &format!("{certs}/server.crt"),
    ]));
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn demo_runs_and_exits_zero() {
    let (code, out, err) = run(&mut cg(&["demo"]));
    assert_eq!(code, 0, "{out}{err}");
    for expected in [
        "HTTP/2 200",
        "426 Upgrade Required",
        "308 Permanent Redirect",
        "leg=\"upstream\"",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
}

#[test]
fn every_command_has_help_and_usage_errors_exit_2() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["check", "--help"],
        vec!["explain", "--help"],
        vec!["certs", "init", "--help"],
        vec!["demo", "--help"],
    ] {
        let (code, out, _) = run(&mut cg(&args));
        assert_eq!(code, 0, "{args:?}");
        assert!(out.contains("Usage"), "{args:?}: {out}");
    }
    let (code, _, _) = run(&mut cg(&["frobnicate"]));
    assert_eq!(code, 2);
    let (code, _, err) = run(&mut cg(&["run", "-c", "/nonexistent/ciphergate.toml"]));
    assert_eq!(code, 2);
    assert!(
        err.contains("/nonexistent/ciphergate.toml: cannot read config file"),
        "{err}"
    );
}

#[tokio::test]
async fn run_exits_1_when_a_port_is_taken_and_0_after_a_drain() {
    let ws = Workspace::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = format!(
        "{}[[listener]]\nname = \"ingress\"\nbind = \"{}\"\nupstream = \"127.0.0.1:8080\"\n{}",
        preamble("info"),
        taken.local_addr().unwrap(),
        ws.certs_table()
    );
    let path = ws.config(&config);
    let (code, _, err) = run_async({
        let mut c = cg(&["run", "-c", path.to_str().unwrap()]);
        c.stdin(std::process::Stdio::null());
        c
    })
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("failed to bind listener ingress"), "{err}");

    let (up, _) = http_upstream().await;
    let config = format!(
        "{}[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{}",
        preamble("info"),
        ws.certs_table()
    );
    let mut proxy = ProxyProcess::start(&ws.config(&config));
    assert_eq!(get_plain(proxy.admin, "/readyz").await.0, StatusCode::OK);
    assert_eq!(get_plain(proxy.admin, "/healthz").await.0, StatusCode::OK);
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(), Some(0));
    assert!(proxy.logs().iter().any(|l| l.contains("drained")));
}

#[tokio::test]
async fn sighup_applies_a_valid_config_and_refuses_a_broken_one() {
    let ws = Workspace::new();
    let (up, seen) = http_upstream().await;
    let base = format!(
        "{}[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{}",
        preamble("info"),
        ws.certs_table()
    );
    let path = ws.config(&base);
    let proxy = ProxyProcess::start(&path);
    let addr = proxy.addr("ingress");
    let mut h1 = H1::new(tokio::net::TcpStream::connect(addr).await.unwrap()).await;
    assert_eq!(
        h1.get("localhost", "/healthz").await.unwrap().0,
        StatusCode::UPGRADE_REQUIRED
    );

    // A broken config is refused and the running one stays.
    std::fs::write(
        &path,
        format!("{base}\n[[rule]]\nname = \"x\"\naction = \"allow\"\n"),
    )
    .unwrap();
    let lines = proxy.logs().len();
    proxy.signal("HUP");
    assert!(proxy.wait_for_log_after(lines, |l| l.contains("config reload refused")));
    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_config_reloads_total",
            &[("outcome", "rejected")]
        ),
        1.0
    );

    // A valid one applies to new connections.
    std::fs::write(
        &path,
        format!("{base}\n[[rule]]\nname = \"health\"\nsource = [\"127.0.0.0/8\"]\npath_prefix = [\"/healthz\"]\naction = \"allow\"\n"),
    )
    .unwrap();
    let lines = proxy.logs().len();
    proxy.signal("HUP");
    assert!(proxy.wait_for_log_after(lines, |l| l.contains("config reloaded")));
    let mut h1 = H1::new(tokio::net::TcpStream::connect(addr).await.unwrap()).await;
    assert_eq!(
        h1.get("localhost", "/healthz").await.unwrap().0,
        StatusCode::OK
    );
    assert_eq!(seen.paths(), ["/healthz"]);
    let m = proxy.metrics().await;
    assert_eq!(
        m.get("ciphergate_config_reloads_total", &[("outcome", "ok")]),
        1.0
    );
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[
                ("listener", "ingress"),
                ("rule", "health"),
                ("action", "allow")
            ]
        ),
        1.0
    );
}

#[test]
fn check_refuses_what_would_fail_at_runtime_or_open_a_plaintext_path() {
    let ws = Workspace::new();
    let client = ws.ca.issue_client("c").unwrap();
    ws.write_issued("client", &client);
    let config = format!(
        r#"[defaults]
max_connections = 9223372036854775807
handshake_timeout = "500000000000y"

[[listener]]
name = "ingress"
bind = "127.0.0.1:0"
upstream = "127.0.0.1:8080"
{certs}
[[listener]]
name = "proxy"
bind = "127.0.0.1:0"
mode = "originate"
  [listener.upstream_tls]
  client_cert = "{dir}/client.crt"
  client_key = "{dir}/client.key"

[[rule]]
name = "halves"
listeners = ["ingress"]
transport = "plaintext"
source = ["0.0.0.0/1", "128.0.0.0/1"]
action = "allow"

[[rule]]
name = "slash-among-others"
listeners = ["ingress"]
transport = "plaintext"
path_prefix = ["/x", "/"]
action = "allow"

[[rule]]
name = "local-app"
listeners = ["proxy"]
transport = "plaintext"
source = ["127.0.0.0/8"]
action = "allow"
"#,
        certs = ws.certs_table(),
        dir = ws.dir.path().display()
    );
    let path = ws.config(&config);
    let (code, _, err) = run(&mut cg(&["check", "-c", path.to_str().unwrap()]));
    assert_eq!(code, 2);
    for expected in [
        "defaults.max_connections: must be at least 1 and at most 1000000",
        "defaults.handshake_timeout: must be at most 7 days",
        "listener[1].upstream_tls.client_cert: a forward proxy would present this certificate",
        "rule[0].action: a blanket plaintext `allow` is not permitted",
        "rule[1].action: a blanket plaintext `allow` is not permitted",
        "rule[2].action: a plaintext `allow` on originate listener `proxy` must be narrowed",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
    assert!(err.contains("6 errors"), "{err}");
}

#[test]
fn only_section_variables_are_settings() {
    // Kubernetes injects CIPHERGATE_SERVICE_HOST and friends for a Service named ciphergate.
    let ws = Workspace::new();
    let config = format!(
        "[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:8080\"\n{}",
        ws.certs_table()
    );
    let path = ws.config(&config);
    let (code, _, err) = run(cg(&["check", "-c", path.to_str().unwrap()])
        .env("CIPHERGATE_SERVICE_HOST", "10.0.0.1")
        .env("CIPHERGATE_PORT_8443_TCP", "tcp://10.0.0.1:8443"));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn explain_on_an_originate_listener_assumes_the_apps_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    run(cg(&["certs", "init", "--dir", "certs"]).current_dir(dir.path()));
    let (code, out, _) = run(cg(&[
        "explain",
        "-c",
        &repo("config/egress-proxy.toml"),
        "--listener",
        "payments",
    ])
    .current_dir(dir.path()));
    assert_eq!(code, 0);
    assert!(
        out.contains("transport: plaintext\nrule: default\naction: upgrade\n"),
        "{out}"
    );
    let (_, out, _) = run(cg(&[
        "explain",
        "-c",
        &repo("config/egress-proxy.toml"),
        "--listener",
        "proxy",
        "--server-name",
        "inventory.internal",
        "--destination",
        "10.20.1.2",
    ])
    .current_dir(dir.path()));
    assert!(
        out.contains("rule: legacy-inventory\naction: allow\n"),
        "{out}"
    );
    assert!(out.contains("plaintext"), "{out}");
}

#[tokio::test]
async fn max_connections_holds_across_reloads() {
    let ws = Workspace::new();
    let (up, _) = http_upstream().await;
    let config = format!(
        "{}[defaults]\nmax_connections = 2\n\n[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{}",
        preamble("info"),
        ws.certs_table()
    );
    let path = ws.config(&config);
    let proxy = ProxyProcess::start(&path);
    let addr = proxy.addr("ingress");
    let mut held = Vec::new();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        held.push(
            tls_connect(tcp, client_tls(&ws.ca_pem(), &["http/1.1"]), "localhost")
                .await
                .unwrap(),
        );
    }
    for _ in 0..3 {
        let lines = proxy.logs().len();
        proxy.signal("HUP");
        assert!(proxy.wait_for_log_after(lines, |l| l.contains("config reloaded")));
    }
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        exchange_raw(&mut third, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_empty()
    );
    let m = proxy.metrics().await;
    assert_eq!(
        m.get(
            "ciphergate_overload_rejections_total",
            &[("listener", "ingress")]
        ),
        1.0
    );
    assert_eq!(
        m.get("ciphergate_connections_active", &[("listener", "ingress")]),
        2.0
    );
    drop(held);
}

#[test]
fn check_catches_capture_and_transparent_mistakes_with_key_paths() {
    let ws = Workspace::new();
    let config = format!(
        r#"[capture]
outbound_listener = "ingress"
inbound = [{{ port = 8080, listener = "egress-all" }}, {{ port = 9090, listener = "local-ingress" }}, {{ port = 8080, listener = "nope" }}]
exclude_ports = [0]
exclude_cidrs = ["0.0.0.0/0"]
proxy_uid = 0
colour = "blue"

[[listener]]
name = "local-ingress"
bind = "127.0.0.1:8443"
upstream = "127.0.0.1:8080"
{certs}
[[listener]]
name = "ingress"
bind = "0.0.0.0:9443"
upstream = "127.0.0.1:8080"
{certs}
[[listener]]
name = "egress-all"
bind = "10.0.0.1:15001"
mode = "transparent"
upstream = "api.example.com:443"
protocol = "tcp"

[[rule]]
name = "any-redis"
listeners = ["egress-all"]
transport = "plaintext"
source = ["127.0.0.1/32"]
action = "allow"

[[rule]]
name = "any-http-host"
listeners = ["egress-all"]
transport = "plaintext"
destination_port = [80]
path_prefix = ["/healthz"]
action = "allow"

[[rule]]
name = "port-on-ingress"
listeners = ["ingress"]
destination_port = [5432]
action = "reject"
"#,
        certs = ws.certs_table(),
    );
    let path = ws.config(&config);
    let (code, _, err) = run(&mut cg(&["check", "-c", path.to_str().unwrap()]));
    assert_eq!(code, 2, "{err}");
    for expected in [
        "listener[2].upstream: a transparent listener sends each connection to its original destination",
        "listener[2].protocol: a transparent listener tells HTTP from other traffic",
        "listener[2].bind: a transparent listener takes the connections [capture] redirects to it",
        "rule[0].action: a plaintext `allow` on transparent listener `egress-all` must be narrowed",
        "rule[1].action: a plaintext `allow` on transparent listener `egress-all` must name where the plaintext may go",
        "rule[2].destination_port: matches only on originate and transparent listeners",
        "capture.exclude_cidrs: excludes every address",
        "capture.proxy_uid: 0 would exempt every process running as root",
        "capture.outbound_listener: listener `ingress` is terminate; this must name a transparent listener",
        "capture.inbound[0].listener: listener `egress-all` is transparent; this must name a terminate listener",
        "capture.inbound[1].listener: listener `local-ingress` does not bind the unspecified address",
        "capture.inbound[2].port: port 8080 is captured twice",
        "capture.inbound[2].listener: no listener is named `nope` (listeners: local-ingress, ingress, egress-all)",
        "capture.exclude_ports: ports run from 1 to 65535",
        "capture.colour: unknown key",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
}

#[test]
fn explain_decides_a_transparent_listener_by_original_destination() {
    let ws = Workspace::new();
    let config = ws.config(
        r#"[[listener]]
name = "egress-all"
bind = "127.0.0.1:15001"
mode = "transparent"

[[rule]]
name = "redis"
listeners = ["egress-all"]
transport = "plaintext"
destination = ["203.0.113.0/24"]
destination_port = [6379]
action = "allow"
"#,
    );
    let config = config.to_str().unwrap();
    let explain = |args: &[&str]| {
        let mut all = vec!["explain", "-c", config, "--listener", "egress-all"];
        all.extend_from_slice(args);
        run(&mut cg(&all))
    };
    let (code, out, _) = explain(&["--plaintext", "--destination", "203.0.113.7:6379"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("listener: egress-all (transparent)\n"),
        "{out}"
    );
    assert!(out.contains("rule: redis\naction: allow\n"), "{out}");
    assert!(
        out.contains("forwarded as is to the original destination"),
        "{out}"
    );

    let (_, out, _) = explain(&["--plaintext", "--destination", "203.0.113.7:6380"]);
    assert!(out.contains("rule: default\naction: upgrade\n"), "{out}");
    assert!(out.contains("port 80 becomes 443"), "{out}");
    assert!(out.contains("other plaintext: connection closed"), "{out}");

    let (_, out, _) = explain(&["--tls", "--destination", "[2001:db8::7]:443"]);
    assert!(out.contains("rule: default\naction: allow\n"), "{out}");
    assert!(out.contains("relayed untouched"), "{out}");

    let (code, _, err) = explain(&["--destination", "203.0.113.7:port"]);
    assert_eq!(code, 2);
    assert!(err.contains("is not IP or IP:PORT"), "{err}");
}
