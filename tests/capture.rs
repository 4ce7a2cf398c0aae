//! `[capture]` with real packets: a pod and a remote host, each a network namespace of this
//! test's own, joined by a veth pair on documentation addresses (198.51.100.0/24,
//! 2001:db8::/64). ciphergate runs in the pod as uid 65532 with `capture install`'s rules; the
//! app is whatever the test runs as root in the pod (curl, a raw client, an HTTP server on
//! 0.0.0.0). Each case asserts what the remote side received as well as what the client got.
//!
//! Needs root (namespaces, nftables, another uid); without it the test says it was skipped,
//! and CI (CIPHERGATE_REQUIRE_ROOT_TESTS=1) fails instead. Everything it creates is removed at
//! the end, on failure too.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const APP_V4: &str = "198.51.100.1";
const REMOTE_V4: &str = "198.51.100.2";
const APP_V6: &str = "2001:db8::1";
const REMOTE_V6: &str = "2001:db8::2";
const PROXY_UID: &str = "65532";

/// The two namespaces and everything running in them; all of it goes when this is dropped.
struct Pod {
    app: String,
    remote: String,
    children: Mutex<Vec<Child>>,
    ws: Workspace,
    /// ciphergate's stderr, line by line.
    logs: Arc<Mutex<Vec<String>>>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        for child in self.children.get_mut().unwrap().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.app, &self.remote] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?} failed");
}

impl Pod {
    /// Two namespaces joined by a veth pair, with both address families.
    fn new(tag: &str) -> Pod {
        let id = std::process::id() % 100_000;
        let pod = Pod {
            app: format!("cg-{tag}-app-{id}"),
            remote: format!("cg-{tag}-rem-{id}"),
            children: Mutex::default(),
            ws: Workspace::new(),
            logs: Arc::default(),
        };
        let (veth_app, veth_remote) = (format!("cg{tag}a{id}"), format!("cg{tag}r{id}"));
        sh(&["ip", "netns", "add", &pod.app]);
        sh(&["ip", "netns", "add", &pod.remote]);
        sh(&[
            "ip",
            "link",
            "add",
            &veth_app,
            "type",
            "veth",
            "peer",
            "name",
            &veth_remote,
        ]);
        sh(&["ip", "link", "set", &veth_app, "netns", &pod.app]);
        sh(&["ip", "link", "set", &veth_remote, "netns", &pod.remote]);
        for (ns, dev, v4, v6) in [
            (&pod.app, &veth_app, APP_V4, APP_V6),
            (&pod.remote, &veth_remote, REMOTE_V4, REMOTE_V6),
        ] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                dev,
            ]);
            sh(&[
                "ip",
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // The proxy runs as another uid: it must be able to read its files.
        chmod_readable(pod.ws.dir.path());
        pod
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).args(args);
        command
    }

    /// Runs a command in a namespace to completion: exit code and stdout.
    fn run_in(&self, ns: &str, args: &[&str]) -> (i32, String) {
        let (code, out, _) = run(&mut self.exec(ns, args));
        (code, out)
    }

    /// Starts a long-running command in a namespace and waits until it prints `ready` (or its
    /// first line) on stdout.
    fn spawn_in(&self, ns: &str, args: &[&str]) {
        let mut child = self
            .exec(ns, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.contains("ready"), "{args:?} did not start: {first}");
        self.children.lock().unwrap().push(child);
    }

    /// Starts ciphergate in the pod as `uid` and waits until it is ready; returns its index
    /// among the children.
    fn start_proxy(&self, config: &Path, uid: &str) -> usize {
        let mut child = self
            .exec(
                &self.app,
                &[
                    "setpriv",
                    "--reuid",
                    uid,
                    "--regid",
                    uid,
                    "--clear-groups",
                    bin(),
                    "run",
                    "-c",
                    config.to_str().unwrap(),
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("ciphergate ready") {
                    let _ = tx.send(());
                }
                logs.lock().unwrap().push(line);
            }
        });
        self.children.lock().unwrap().push(child);
        assert!(
            rx.recv_timeout(PATIENCE).is_ok(),
            "ciphergate did not become ready: {:?}",
            self.logs.lock().unwrap()
        );
        self.children.lock().unwrap().len() - 1
    }

    /// Stops a child started here, by its index.
    fn stop(&self, index: usize) {
        let mut children = self.children.lock().unwrap();
        let _ = children[index].kill();
        let _ = children[index].wait();
    }

    /// curl from the app (root, so its connections are captured). Exit code and body.
    fn app_curl(&self, args: &[&str]) -> (i32, String) {
        let mut all = vec!["curl", "-sS", "--max-time", "10"];
        all.extend_from_slice(args);
        self.run_in(&self.app, &all)
    }

    fn remote_curl(&self, args: &[&str]) -> (i32, String) {
        let mut all = vec!["curl", "-sS", "--max-time", "10"];
        all.extend_from_slice(args);
        self.run_in(&self.remote, &all)
    }

    /// A raw TCP exchange from the app: whether it connected, and what came back.
    fn app_raw(&self, host: &str, port: u16, data: &str) -> serde_json::Value {
        self.app_raw_with(host, port, data, &[])
    }

    /// [`Pod::app_raw`] with client.py's flags (`--hex`, `--silent`).
    fn app_raw_with(&self, host: &str, port: u16, data: &str, flags: &[&str]) -> serde_json::Value {
        let script = fixture("client.py");
        let port = port.to_string();
        let mut args = vec!["python3", script.as_str(), host, &port, data];
        args.extend_from_slice(flags);
        let (_, out) = self.run_in(&self.app, &args);
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("client said {out}"))
    }

    /// The remote's record of every connection that reached it.
    fn remote_saw(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.ws.path("remote.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until the remote has recorded `n` connections.
    fn wait_remote(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let seen = self.remote_saw();
            if seen.len() >= n || Instant::now() > deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn metrics(&self, admin: &str) -> Metrics {
        let (code, text) = self.run_in(
            &self.app,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                &format!("http://{admin}/metrics"),
            ],
        );
        assert_eq!(code, 0);
        Metrics::parse(&text)
    }
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn chmod_readable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path: PathBuf = entry.unwrap().path();
        let mode = if path.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// The nine cases of issue 15 in one topology (setting it up is most of the cost).
#[test]
fn capture_sends_every_connection_of_the_pod_through_ciphergate() {
    if !can_run_as_root("capture_sends_every_connection_of_the_pod_through_ciphergate") {
        return;
    }
    let pod = Pod::new("c");
    let ws = &pod.ws;
    // The remote's certificate, from its own CA; the app's certificate for ingress.
    let remote_ca = Authority::new("remote test CA").unwrap();
    let remote_cert = remote_ca
        .issue_server(&["remote.test".into(), REMOTE_V4.into(), REMOTE_V6.into()])
        .unwrap();
    ws.write("remote-ca.crt", &remote_ca.cert_pem());
    ws.write_issued("remote", &remote_cert);
    let app_cert = ws
        .ca
        .issue_server(&["app.test".into(), APP_V4.into(), APP_V6.into()])
        .unwrap();
    ws.write_issued("app", &app_cert);
    std::fs::create_dir(ws.path("www")).unwrap();
    ws.write("www/app.txt", "the app\n");
    let admin = "127.0.0.1:9901";
    let config = ws.config(&format!(
        r#"[admin]
bind = "{admin}"

[log]
level = "trace"
format = "json"
counters_every = "0s"

[capture]
outbound_listener = "egress-all"
inbound = [{{ port = 8080, listener = "ingress" }}]
proxy_uid = {PROXY_UID}

[[listener]]
name = "ingress"
bind = "[::]:8443"
upstream = "127.0.0.1:8080"
  [[listener.certs]]
  cert = "{app_crt}"
  key = "{app_key}"

[[listener]]
name = "egress-all"
bind = "127.0.0.1:15001"
mode = "transparent"
handshake_timeout = "2s"
  [listener.upstream_tls]
  ca = "{remote_ca}"

[[rule]]
name = "redis"
listeners = ["egress-all"]
transport = "plaintext"
destination = ["198.51.100.0/24", "2001:db8::/64"]
destination_port = [6379]
action = "allow"
"#,
        app_crt = ws.p("app.crt"),
        app_key = ws.p("app.key"),
        remote_ca = ws.p("remote-ca.crt"),
    ));
    chmod_readable(ws.dir.path());
    let remote_log = ws.p("remote.log");
    let (remote_crt, remote_key) = (ws.p("remote.crt"), ws.p("remote.key"));
    let www = ws.p("www");
    let config_path = config.to_str().unwrap().to_owned();

    // The remote host, and the app's own server on 0.0.0.0 (and ::) in the pod.
    let (remote_ns, app_ns) = (pod.remote.clone(), pod.app.clone());
    pod.spawn_in(
        &remote_ns,
        &[
            "python3",
            &fixture("remote.py"),
            &remote_log,
            &remote_crt,
            &remote_key,
        ],
    );
    for port in ["8080", "9000"] {
        pod.spawn_in(&app_ns, &["python3", &fixture("app.py"), port, &www]);
    }
    let (code, out) = pod.run_in(&app_ns, &[bin(), "capture", "install", "-c", &config_path]);
    assert_eq!(code, 0, "capture install: {out}");
    let proxy = pod.start_proxy(&config, PROXY_UID);

    // 1. The app's plaintext HTTP arrives at the remote as verified TLS on 443, with its
    //    Host as SNI; port 80 never sees a byte.
    let (code, body) = pod.app_curl(&[
        "--resolve",
        &format!("remote.test:80:{REMOTE_V4}"),
        "http://remote.test/one",
    ]);
    assert_eq!((code, body.as_str()), (0, "remote tls /one"));
    let seen = pod.wait_remote(1);
    assert_eq!(seen[0]["port"], 443, "{seen:?}");
    assert_eq!(seen[0]["tls"], true);
    assert_eq!(seen[0]["sni"], "remote.test");
    assert_eq!(seen[0]["host"], "remote.test");

    // 2. The app's own TLS arrives as the app's handshake: the app verifies the remote's own
    //    certificate, and ciphergate makes no handshake of its own.
    let (code, body) = pod.app_curl(&[
        "--cacert",
        &ws.p("remote-ca.crt"),
        "--resolve",
        &format!("remote.test:8443:{REMOTE_V4}"),
        "https://remote.test:8443/two",
    ]);
    assert_eq!((code, body.as_str()), (0, "remote tls /two"));
    let seen = pod.wait_remote(2);
    assert_eq!(
        (&seen[1]["port"], &seen[1]["sni"]),
        (&8443.into(), &"remote.test".into())
    );

    // 3. Raw plaintext to another port: closed, nothing delivered.
    let raw = pod.app_raw(REMOTE_V4, 7000, "secret plaintext");
    assert_eq!(raw["received"], "", "{raw}");

    // 4. A rule-allowed destination port passes, as is.
    let raw = pod.app_raw(REMOTE_V4, 6379, "PING\r\n");
    assert_eq!(raw["received"], "PING\r\n", "{raw}");
    let seen = pod.wait_remote(3);
    assert_eq!(
        (&seen[2]["port"], &seen[2]["bytes"]),
        (&6379.into(), &"PING\r\n".into())
    );
    assert!(
        seen.iter().all(|s| s["port"] != 7000 && s["port"] != 80),
        "plaintext reached the remote: {seen:?}"
    );

    // 5. A remote client's plaintext to the app port gets 426 from ciphergate.
    let (code, status) = pod.remote_curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{APP_V4}:8080/app.txt"),
    ]);
    assert_eq!((code, status.as_str()), (0, "426"));
    let app_saw = || std::fs::read_to_string(ws.path("app-8080.log")).unwrap_or_default();
    assert_eq!(app_saw(), "", "the app saw a refused request");

    // 6. A remote client's TLS to the app port reaches the app, through ciphergate.
    let (code, body) = pod.remote_curl(&[
        "--cacert",
        &ws.p("ca.crt"),
        &format!("https://{APP_V4}:8080/app.txt"),
    ]);
    assert_eq!((code, body.as_str()), (0, "the app\n"));
    assert_eq!(
        app_saw(),
        "/app.txt\n",
        "the app saw what came over TLS, once"
    );
    // An app port left out of `inbound` cannot be reached around ciphergate at all, while the
    // app itself still reaches it over loopback.
    let (code, _) = pod.remote_curl(&[&format!("http://{APP_V4}:9000/app.txt")]);
    assert_ne!(code, 0, "an uncaptured app port was reachable from outside");
    let (code, body) = pod.app_curl(&["http://127.0.0.1:9000/app.txt"]);
    assert_eq!((code, body.as_str()), (0, "the app\n"));

    // 7. IPv6, both ways.
    let (code, body) = pod.app_curl(&[
        "--resolve",
        &format!("remote.test:80:[{REMOTE_V6}]"),
        "http://remote.test/seven",
    ]);
    assert_eq!((code, body.as_str()), (0, "remote tls /seven"));
    let seen = pod.wait_remote(4);
    assert_eq!(
        (&seen[3]["port"], &seen[3]["path"]),
        (&443.into(), &"/seven".into())
    );
    let (code, status) = pod.remote_curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://[{APP_V6}]:8080/app.txt"),
    ]);
    assert_eq!((code, status.as_str()), (0, "426"));
    let (code, body) = pod.remote_curl(&[
        "--cacert",
        &ws.p("ca.crt"),
        &format!("https://[{APP_V6}]:8080/app.txt"),
    ]);
    assert_eq!((code, body.as_str()), (0, "the app\n"));

    // 8. No redirect loop: ciphergate's own connections (all of the above) went out, and a
    //    connection to the transparent listener itself, which has no other destination, is
    //    closed rather than sent back to it.
    let raw = pod.app_raw("127.0.0.1", 15001, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(raw["received"], "", "{raw}");

    // Fail closed: plaintext HTTP whose destination does not verify for its Host, or does not
    // speak TLS, gets 502, and nothing goes out in plaintext.
    let seen_before = pod.remote_saw().len();
    let status_of = |args: &[&str]| {
        let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        all.extend_from_slice(args);
        pod.app_curl(&all)
    };
    let (code, status) = status_of(&[
        "--resolve",
        &format!("wrong.test:80:{REMOTE_V4}"),
        "http://wrong.test/unverified",
    ]);
    assert_eq!((code, status.as_str()), (0, "502"));
    let (code, status) = status_of(&[
        "--resolve",
        &format!("remote.test:8080:{REMOTE_V4}"),
        "http://remote.test:8080/not-tls",
    ]);
    assert_eq!((code, status.as_str()), (0, "502"));
    // The app's TLS that offers nothing at TLS 1.2 or above is closed before a byte goes out;
    // a valid hello followed by plaintext is cut off before the plaintext.
    let tls11 = hex(&client_hello(0x0302, None));
    let raw = pod.app_raw_with(REMOTE_V4, 8443, &tls11, &["--hex"]);
    assert_eq!(raw["received"], "", "{raw}");
    let mut smuggled = client_hello(0x0303, Some(0x0304));
    smuggled.extend_from_slice(b"PLAINTEXT customer-ssn=123");
    let raw = pod.app_raw_with(REMOTE_V4, 7000, &hex(&smuggled), &["--hex"]);
    assert_eq!(raw["received"], "", "{raw}");
    // An app that sends nothing to a destination no rule names is closed at handshake_timeout.
    let raw = pod.app_raw_with(REMOTE_V4, 7000, "", &["--silent"]);
    assert_eq!(raw["received"], "", "{raw}");
    // IPv6 for the other paths: the rule-allowed port, and the app's own TLS.
    let raw = pod.app_raw(REMOTE_V6, 6379, "PING6\r\n");
    assert_eq!(raw["received"], "PING6\r\n", "{raw}");
    let (code, body) = pod.app_curl(&[
        "--cacert",
        &ws.p("remote-ca.crt"),
        "--resolve",
        &format!("remote.test:8443:[{REMOTE_V6}]"),
        "https://remote.test:8443/own-v6",
    ]);
    assert_eq!((code, body.as_str()), (0, "remote tls /own-v6"));
    // The remote's records: the two 502s (a refused certificate, a ClientHello to the non-TLS
    // server), the relayed hello cut off at the plaintext, the IPv6 ones.
    let seen = pod.wait_remote(seen_before + 5);
    let new = &seen[seen_before..];
    for entry in new
        .iter()
        .filter(|s| s["port"] == 7000 || s["port"] == 8080)
    {
        let bytes = entry["bytes"].as_str().unwrap_or_default();
        assert!(
            !bytes.contains("GET") && !bytes.contains("PLAINTEXT"),
            "plaintext reached the remote: {entry}"
        );
    }
    assert!(
        new.iter()
            .all(|s| s["port"] != 80 && s["port"] != 8443 || s["tls"] == true),
        "{new:?}"
    );

    let m = pod.metrics(admin);
    let egress = ("listener", "egress-all");
    let decisions = |rule: &str, action: &str| {
        m.get(
            "ciphergate_decisions_total",
            &[egress, ("rule", rule), ("action", action)],
        )
    };
    assert_eq!(
        decisions("default", "upgrade"),
        4.0,
        "cases 1 and 7, the two 502s"
    );
    assert_eq!(
        decisions("default", "allow"),
        3.0,
        "case 2, the smuggler, IPv6 TLS"
    );
    assert_eq!(decisions("redis", "allow"), 2.0, "case 4 and IPv6");
    assert_eq!(
        decisions("default", "reject"),
        4.0,
        "cases 3 and 8, the TLS 1.1 hello, the silent app"
    );
    // ciphergate verified the remote for 1 and 7, refused it for the two 502s, and never
    // terminated the app's own TLS.
    let upstream = |outcome| {
        m.get(
            "ciphergate_tls_handshakes_total",
            &[egress, ("leg", "upstream"), ("outcome", outcome)],
        )
    };
    assert_eq!((upstream("ok"), upstream("failed")), (2.0, 2.0));
    assert_eq!(
        m.get(
            "ciphergate_connections_total",
            &[egress, ("transport", "tls")]
        ),
        4.0
    );
    let ingress = ("listener", "ingress");
    assert_eq!(
        m.get(
            "ciphergate_decisions_total",
            &[ingress, ("rule", "default"), ("action", "reject")]
        ),
        2.0,
        "cases 5 and 7"
    );

    // Promise 3 on the transparent paths: not an original destination, port, Host or SNI in
    // the trace-level logs or the metrics.
    let logs = pod.logs.lock().unwrap().join("\n");
    let exposition = pod
        .run_in(
            &app_ns,
            &["curl", "-sS", &format!("http://{admin}/metrics")],
        )
        .1;
    for secret in [
        "198.51.100.",
        "2001:db8",
        "remote.test",
        "wrong.test",
        "app.test",
        ":6379",
        ":7000",
        "/one",
        "/two",
        "/seven",
        "/unverified",
    ] {
        assert!(!logs.contains(secret), "the logs carry {secret}:\n{logs}");
        assert!(!exposition.contains(secret), "the metrics carry {secret}");
    }
    assert!(logs.lines().count() >= 3, "no logs were captured");

    // A wrong proxy_uid: ciphergate's own connections come back to it. Each is recognised at
    // its first hop and closed, so the app gets 502 and the remote sees nothing.
    pod.stop(proxy);
    pod.start_proxy(&config, "65533");
    let warned = pod
        .logs
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("capture.proxy_uid is not the uid ciphergate runs as"));
    assert!(warned, "no warning about the uid");
    let seen_before = pod.remote_saw().len();
    let (code, status) = status_of(&[
        "--resolve",
        &format!("remote.test:80:{REMOTE_V4}"),
        "http://remote.test/looped",
    ]);
    assert_eq!((code, status.as_str()), (0, "502"));
    let m = pod.metrics(admin);
    assert_eq!(
        decisions_of(&m, "default", "reject"),
        1.0,
        "the looped connection was not refused at its first hop"
    );
    assert_eq!(
        m.get("ciphergate_overload_rejections_total", &[egress]),
        0.0
    );

    // 9. After `capture remove`, traffic flows directly again: plaintext to port 80.
    let (code, out) = pod.run_in(&app_ns, &[bin(), "capture", "remove", "-c", &config_path]);
    assert_eq!(code, 0, "capture remove: {out}");
    let (code, body) = pod.app_curl(&[
        "--resolve",
        &format!("remote.test:80:{REMOTE_V4}"),
        "http://remote.test/nine",
    ]);
    assert_eq!((code, body.as_str()), (0, "remote plaintext /nine"));
    let seen = pod.wait_remote(seen_before + 1);
    assert_eq!(
        seen.len(),
        seen_before + 1,
        "the looped request reached the remote"
    );
    let last = &seen[seen_before];
    assert_eq!((&last["port"], &last["tls"]), (&80.into(), &false.into()));
    let (_, tables) = pod.run_in(&app_ns, &["nft", "list", "tables"]);
    assert!(!tables.contains("ciphergate"), "{tables}");
}

fn decisions_of(m: &Metrics, rule: &str, action: &str) -> f64 {
    m.get(
        "ciphergate_decisions_total",
        &[
            ("listener", "egress-all"),
            ("rule", rule),
            ("action", action),
        ],
    )
}

/// Hex for client.py's `--hex`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A ClientHello in one record: `legacy` as its version, `supported` in supported_versions
/// when given, SNI remote.test.
fn client_hello(legacy: u16, supported: Option<u16>) -> Vec<u8> {
    let name = b"remote.test";
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&((name.len() + 5) as u16).to_be_bytes());
    ext.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name);
    if let Some(v) = supported {
        ext.extend_from_slice(&[0, 43, 0, 3, 2]);
        ext.extend_from_slice(&v.to_be_bytes());
    }
    let mut body = legacy.to_be_bytes().to_vec();
    body.extend_from_slice(&[7; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0xc0, 0x2b, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
    record.push(1);
    record.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    record.extend_from_slice(&body);
    record
}
