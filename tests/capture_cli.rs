//! `ciphergate capture install|remove|print`: the real binary and the real `nft`, in network
//! namespaces each test makes and removes (even when it fails). Nothing is started: these
//! tests are about the rules put in place, not the traffic (see the transparent listener's
//! tests for packets).

mod common;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Workspace, bin, can_run_as_root, run};

/// The uid ciphergate runs as in the image: no capability at all.
const UNPRIVILEGED: &str = "65532";

/// A network namespace of this test's own, deleted when dropped (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "cg-capcli-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let (code, _, err) = run(Command::new("ip").args(["netns", "add", &name]));
        assert_eq!(code, 0, "ip netns add {name}: {err}");
        Netns { name }
    }

    /// `ip netns exec NAME program args...`
    fn exec(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c
    }

    /// `ciphergate ARGS` inside the namespace, as root.
    fn ciphergate(&self, args: &[&str]) -> (i32, String, String) {
        run(&mut self.exec(bin(), args))
    }

    /// `nft ARGS` inside the namespace; panics if nft fails.
    fn nft(&self, args: &[&str]) -> String {
        let (code, out, err) = run(&mut self.exec("nft", args));
        assert_eq!(code, 0, "nft {args:?}: {err}");
        out
    }

    /// `nft -f -` with `script` on stdin; panics if nft fails.
    fn nft_apply(&self, script: &str) {
        let mut child = self
            .exec("nft", &["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft -f -: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The table as the kernel holds it, or `None` when it is not there.
    fn table(&self) -> Option<String> {
        let (code, out, _) = run(&mut self.exec("nft", &["list", "table", "inet", "ciphergate"]));
        (code == 0).then_some(out)
    }

    fn tables(&self) -> Vec<String> {
        self.nft(&["list", "tables"])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A transparent listener for outbound capture, a terminate listener for inbound capture
/// (both on fixed ports: nothing is started), admin on the pod IP, and `capture`.
fn config_with(ws: &Workspace, capture: &str) -> PathBuf {
    let path = ws.config(&format!(
        "[admin]\nbind = \"0.0.0.0:9901\"\n\n\
         [log]\nlevel = \"info\"\nformat = \"json\"\ncounters_every = \"0s\"\n\n\
         [[listener]]\nname = \"egress-all\"\nbind = \"127.0.0.1:15001\"\nmode = \"transparent\"\n\n\
         [[listener]]\nname = \"ingress\"\nbind = \"0.0.0.0:8443\"\nmode = \"terminate\"\n\
         upstream = \"127.0.0.1:8080\"\n{}\n{capture}",
        ws.certs_table()
    ));
    // Readable by the unprivileged uid too (a tempdir is 0700).
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(ws.dir.path()).unwrap() {
        let file = entry.unwrap().path();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    path
}

const BOTH: &str = "[capture]\n\
    outbound_listener = \"egress-all\"\n\
    inbound = [{ port = 8080, listener = \"ingress\" }]\n\
    exclude_cidrs = [\"169.254.169.254/32\", \"2001:db8:ffff::/48\"]\n\
    exclude_ports = [25]\n";

const INBOUND_ONLY: &str = "[capture]\ninbound = [{ port = 8080, listener = \"ingress\" }]\n";

fn cfg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `ciphergate capture print -c CONFIG`, as `setpriv` makes it (uid 65532, no capability)
/// when `unprivileged`.
fn print(config: &Path, unprivileged: bool) -> String {
    let mut command = if unprivileged {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            UNPRIVILEGED,
            "--regid",
            UNPRIVILEGED,
            "--clear-groups",
            bin(),
        ]);
        c
    } else {
        Command::new(bin())
    };
    let (code, out, err) = run(command.args(["capture", "print", "-c", cfg(config)]));
    assert_eq!(code, 0, "capture print: {err}");
    out
}

#[test]
fn print_writes_the_script_install_applies_and_needs_nothing() {
    let ws = Workspace::new();
    let config = config_with(&ws, BOTH);
    let out = print(&config, false);

    // The very function install feeds to nft.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let loaded = ciphergate::config::load(&config).unwrap_or_else(|e| panic!("{e}"));
    let capture = loaded.capture.expect("[capture]");
    assert_eq!(out, ciphergate::capture::ruleset(&capture));

    assert!(out.starts_with('#'), "{out}");
    for expected in [
        "table inet ciphergate\ndelete table inet ciphergate\ntable inet ciphergate {\n",
        "meta skuid 65532 return",
        "fib daddr type local return",
        "ip daddr { 169.254.169.254/32 } return",
        "ip6 daddr { 2001:db8:ffff::/48 } return",
        "tcp dport { 25 } return",
        "meta l4proto tcp redirect to :15001",
        "tcp dport 8080 redirect to :8443",
        "tcp dport { 8443, 9901 } accept",
        "reject with tcp reset",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
}

#[test]
fn a_config_without_capture_is_a_config_error_for_every_subcommand() {
    let ws = Workspace::new();
    let config = ws.config(&format!(
        "[[listener]]\nname = \"ingress\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:8080\"\n{}",
        ws.certs_table()
    ));
    // `remove` reads no config (it must work when the config is gone or broken).
    for sub in ["install", "print"] {
        let (code, out, err) = run(Command::new(bin()).args(["capture", sub, "-c", cfg(&config)]));
        assert_eq!(code, 2, "capture {sub}: {out}{err}");
        assert!(out.is_empty(), "capture {sub} printed {out}");
        assert!(
            err.contains(&config.display().to_string()) && err.contains("capture"),
            "capture {sub}: {err}"
        );
    }
    // A broken config is reported like `check` does, with exit 2 too.
    let config = ws.config(BOTH);
    let (code, _, err) = run(Command::new(bin()).args(["capture", "print", "-c", cfg(&config)]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("capture.outbound_listener"), "{err}");
}

#[test]
fn every_capture_subcommand_has_help() {
    for sub in [
        &["capture"][..],
        &["capture", "install"],
        &["capture", "remove"],
        &["capture", "print"],
    ] {
        let (code, out, err) = run(Command::new(bin()).args(sub).arg("--help"));
        assert_eq!(code, 0, "{sub:?} --help: {err}");
        assert!(out.contains("Usage: ciphergate capture"), "{out}");
    }
}

#[test]
fn install_puts_the_whole_table_in_place_and_again_changes_nothing() {
    if !can_run_as_root("install_puts_the_whole_table_in_place_and_again_changes_nothing") {
        return;
    }
    let ws = Workspace::new();
    let config = config_with(&ws, BOTH);
    let ns = Netns::new();
    assert_eq!(ns.table(), None);

    let (code, out, err) = ns.ciphergate(&["capture", "install", "-c", cfg(&config)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("inet ciphergate"), "{out}");
    let table = ns.table().expect("the table is installed");
    for expected in [
        "chain outbound {",
        "type nat hook output priority -100; policy accept;",
        "meta l4proto != tcp return",
        "meta skuid 65532 return",
        "fib daddr type local return",
        "ip daddr 169.254.169.254 return",
        "ip6 daddr 2001:db8:ffff::/48 return",
        "tcp dport 25 return",
        "meta l4proto tcp redirect to :15001",
        "chain inbound {",
        "type nat hook prerouting priority dstnat; policy accept;",
        "iifname \"lo\" return",
        "tcp dport 8080 redirect to :8443",
        "chain inbound_guard {",
        "type filter hook input priority filter; policy accept;",
        "ct state invalid drop",
        "ct state established,related accept",
        "ct status dnat accept",
        "tcp dport { 8443, 9901 } accept",
        "meta l4proto tcp reject with tcp reset",
    ] {
        assert!(table.contains(expected), "missing {expected:?} in\n{table}");
    }
    // The kernel keeps each rule's comment, so `nft list ruleset` in the pod says why.
    assert!(
        table.contains("comment \"ciphergate's own connections (proxy_uid)\""),
        "{table}"
    );

    let (code, _, err) = ns.ciphergate(&["capture", "install", "-c", cfg(&config)]);
    assert_eq!(code, 0, "second install: {err}");
    assert_eq!(ns.table().as_deref(), Some(table.as_str()));
    assert_eq!(ns.tables(), ["table inet ciphergate"]);

    // A new config replaces the table whole: what it no longer asks for is gone.
    let inbound_only = config_with(&ws, INBOUND_ONLY);
    let (code, _, err) = ns.ciphergate(&["capture", "install", "-c", cfg(&inbound_only)]);
    assert_eq!(code, 0, "{err}");
    let table = ns.table().unwrap();
    assert!(!table.contains("chain outbound"), "{table}");
    assert!(
        table.contains("tcp dport 8080 redirect to :8443"),
        "{table}"
    );
    assert_eq!(ns.tables(), ["table inet ciphergate"]);
}

#[test]
fn install_and_remove_leave_other_tables_alone() {
    if !can_run_as_root("install_and_remove_leave_other_tables_alone") {
        return;
    }
    let ws = Workspace::new();
    let config = config_with(&ws, BOTH);
    let ns = Netns::new();
    ns.nft_apply(
        "table inet other {\n\tchain c {\n\t\ttype filter hook input priority 10;\n\t}\n}\n",
    );
    let other = ns.nft(&["list", "table", "inet", "other"]);

    let (code, _, err) = ns.ciphergate(&["capture", "install", "-c", cfg(&config)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        ns.tables(),
        ["table inet other", "table inet ciphergate"],
        "both tables"
    );
    assert_eq!(ns.nft(&["list", "table", "inet", "other"]), other);

    // The second remove has a config that is gone: removing reads none.
    for (round, config) in [
        ("first", cfg(&config)),
        ("second", "/nonexistent/ciphergate.toml"),
    ] {
        let (code, out, err) = ns.ciphergate(&["capture", "remove", "-c", config]);
        assert_eq!(code, 0, "{round} remove: {out}{err}");
        assert_eq!(ns.table(), None, "after the {round} remove");
        assert_eq!(ns.tables(), ["table inet other"]);
        assert_eq!(ns.nft(&["list", "table", "inet", "other"]), other);
    }
}

#[test]
fn print_piped_to_nft_is_what_install_puts_in_place() {
    if !can_run_as_root("print_piped_to_nft_is_what_install_puts_in_place") {
        return;
    }
    let ws = Workspace::new();
    let config = config_with(&ws, BOTH);
    let installed = Netns::new();
    let (code, _, err) = installed.ciphergate(&["capture", "install", "-c", cfg(&config)]);
    assert_eq!(code, 0, "{err}");

    // Printed by a uid without any capability, applied by the operator's own tooling.
    let script = print(&config, true);
    let applied = Netns::new();
    applied.nft_apply(&script);
    assert_eq!(applied.table(), installed.table());
    assert!(applied.table().is_some());
}

#[test]
fn install_without_cap_net_admin_fails_with_exit_1_and_says_what_it_needs() {
    if !can_run_as_root("install_without_cap_net_admin_fails_with_exit_1_and_says_what_it_needs") {
        return;
    }
    let ws = Workspace::new();
    let config = config_with(&ws, BOTH);
    let ns = Netns::new();
    for sub in ["install", "remove"] {
        let (code, out, err) = run(&mut ns.exec(
            "setpriv",
            &[
                "--reuid",
                UNPRIVILEGED,
                "--regid",
                UNPRIVILEGED,
                "--clear-groups",
                bin(),
                "capture",
                sub,
                "-c",
                cfg(&config),
            ],
        ));
        assert_eq!(code, 1, "capture {sub} as uid {UNPRIVILEGED}: {out}{err}");
        assert!(
            err.contains("CAP_NET_ADMIN")
                && err.contains("init container with the NET_ADMIN capability"),
            "capture {sub}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(ns.tables(), Vec::<String>::new());
}
