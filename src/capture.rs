//! `ciphergate capture install|remove|print`: the netfilter rules that send every TCP
//! connection of the pod through ciphergate (SPEC promise 7), built from `[capture]`
//! ([`CaptureConfig`]).
//!
//! [`ruleset`] renders them as an nftables script, a pure function of the config; [`install`]
//! hands that script to the `nft` tool, [`remove`] deletes the table, and `capture print`
//! writes the same script to stdout, so what an operator reads is exactly what `install`
//! applies.
//!
//! # Why the `nft` tool, not netlink from Rust
//!
//! There is no well-kept, permissively licensed pure-Rust crate that speaks nf_tables netlink:
//! `rustables` is GPL-3.0, and `nftnl` binds the libnftnl C library (and leaves expression
//! encoding, sets and transactions to its caller). Kubernetes' own kube-proxy, in its nftables
//! mode, drives `nft` the same way (through knftables). `nft -f` applies a whole script as one
//! kernel transaction: it all lands, or nothing changes. And `print` can show the very text
//! `install` applies, for operators who apply rules with their own tooling (a CNI plugin, a
//! node agent). The image ships `nft` for the init container that runs `install`.
//!
//! # What the rules do
//!
//! One table, `inet ciphergate` (IPv4 and IPv6 alike), in the network namespace the command
//! runs in. No other table is read or touched.
//!
//! - chain `outbound` (nat, output; with `outbound_listener`): TCP the pod opens to an address
//!   that is not its own goes to the transparent listener's port on loopback, except the
//!   connections of `proxy_uid` (ciphergate's own, so no loop), `exclude_cidrs` and
//!   `exclude_ports`.
//! - chain `inbound` (nat, prerouting; with `inbound`): TCP arriving from outside the pod for
//!   a captured app port goes to its terminate listener. Loopback (ciphergate to the app) is
//!   never redirected.
//! - chain `inbound_guard` (filter, input; with `inbound`): a new TCP connection from outside
//!   the pod is let in only when it was redirected to ciphergate or is for one of ciphergate's
//!   own ports; anything else is reset, so an app port left out of `inbound` cannot be reached
//!   around ciphergate. Packets conntrack cannot place (state `invalid`) are dropped: they
//!   would pass by the redirect.
//!
//! Nothing here sees or logs traffic: the rules are built from the config alone.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;

use crate::config::CaptureConfig;

/// The nftables table that holds every capture rule: family and name.
pub const TABLE: &str = "inet ciphergate";

/// The capture rules, as an `nft -f` script that replaces the table in one transaction.
///
/// The first two lines make sure the table exists (declaring an existing table changes
/// nothing), so that deleting it cannot fail; the block after them recreates it whole. The
/// kernel applies all three or none, so installing is idempotent and never leaves half a
/// ruleset in place. Empty lists leave their rule out (nft has no empty anonymous set).
pub fn ruleset(capture: &CaptureConfig) -> String {
    let mut s = String::new();
    s.push_str(
        "# ciphergate capture rules (`ciphergate capture print`): every TCP connection of the\n\
         # pod goes through ciphergate. Apply with `nft -f`: one transaction that replaces the\n\
         # table `inet ciphergate` (IPv4 and IPv6) and touches no other.\n",
    );
    s.push_str(&format!(
        "table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n"
    ));

    if let Some(outbound) = &capture.outbound {
        let (v4, v6) = split_by_family(&capture.exclude_cidrs);
        let mut rules = vec![
            rule("meta l4proto != tcp return", "only TCP is captured"),
            rule(
                &format!("meta skuid {} return", capture.proxy_uid),
                "ciphergate's own connections (proxy_uid)",
            ),
            rule(
                "fib daddr type local return",
                "loopback and the pod's own addresses stay inside the pod",
            ),
        ];
        if !v4.is_empty() {
            rules.push(rule(
                &format!("ip daddr {} return", set(&v4)),
                "exclude_cidrs (IPv4)",
            ));
        }
        if !v6.is_empty() {
            rules.push(rule(
                &format!("ip6 daddr {} return", set(&v6)),
                "exclude_cidrs (IPv6)",
            ));
        }
        let mut ports = capture.exclude_ports.clone();
        ports.sort_unstable();
        ports.dedup();
        if !ports.is_empty() {
            rules.push(rule(
                &format!("tcp dport {} return", set(&ports)),
                "exclude_ports",
            ));
        }
        rules.push(rule(
            &format!("meta l4proto tcp redirect to :{}", outbound.port),
            &format!("to transparent listener {}", outbound.listener),
        ));
        chain(
            &mut s,
            "outbound",
            "The pod's outbound TCP goes to the transparent listener on loopback.",
            "type nat hook output priority -100; policy accept;",
            &rules,
        );
    }

    if !capture.inbound.is_empty() {
        let mut rules = vec![
            rule("meta l4proto != tcp return", "only TCP is captured"),
            rule(
                "iifname \"lo\" return",
                "loopback (ciphergate to the app) is never redirected",
            ),
        ];
        for entry in &capture.inbound {
            rules.push(rule(
                &format!("tcp dport {} redirect to :{}", entry.port, entry.to.port),
                &format!(
                    "app port {} to terminate listener {}",
                    entry.port, entry.to.listener
                ),
            ));
        }
        chain(
            &mut s,
            "inbound",
            "TCP from outside the pod for a captured app port goes to its terminate listener.",
            "type nat hook prerouting priority -100; policy accept;",
            &rules,
        );

        let mut own = capture.own_ports.clone();
        own.sort_unstable();
        own.dedup();
        let mut rules = vec![
            rule("iifname \"lo\" accept", "loopback: inside the pod"),
            rule("meta l4proto != tcp accept", "only TCP is guarded"),
            rule(
                "ct state invalid drop",
                "packets conntrack cannot place: they would skip the redirect",
            ),
            rule(
                "ct state established,related accept",
                "connections already let in, and replies to the pod's own",
            ),
            rule(
                "ct status dnat accept",
                "redirected to ciphergate by chain inbound",
            ),
        ];
        if !own.is_empty() {
            rules.push(rule(
                &format!("tcp dport {} accept", set(&own)),
                "ciphergate's own listener and admin ports",
            ));
        }
        rules.push(rule(
            "meta l4proto tcp reject with tcp reset",
            "any other port: nothing reaches the app around ciphergate",
        ));
        chain(
            &mut s,
            "inbound_guard",
            "New TCP from outside the pod is let in only through ciphergate.",
            "type filter hook input priority 0; policy accept;",
            &rules,
        );
    }
    s.push_str("}\n");
    s
}

/// The `nft -f` script that deletes the table if it is there, and touches nothing else.
pub fn removal() -> String {
    format!(
        "# ciphergate capture rules removed: declaring the table first makes deleting it\n\
         # succeed whether or not it was there.\ntable {TABLE}\ndelete table {TABLE}\n"
    )
}

/// One rule, with the comment nft stores beside it (so `nft list ruleset` explains itself).
fn rule(statement: &str, comment: &str) -> String {
    // nft keeps at most 128 bytes of comment; ours are fixed text and config names.
    debug_assert!(comment.len() <= 128 && !comment.contains('"'));
    format!("{statement} comment \"{comment}\"")
}

fn chain(s: &mut String, name: &str, why: &str, hook: &str, rules: &[String]) {
    let _ = writeln!(s, "\t# {why}");
    let _ = writeln!(s, "\tchain {name} {{");
    let _ = writeln!(s, "\t\t{hook}");
    for r in rules {
        let _ = writeln!(s, "\t\t{r}");
    }
    let _ = writeln!(s, "\t}}");
}

/// An anonymous nft set: `{ a, b }`.
fn set<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// Networks by family, merged where they overlap or touch, host bits cleared.
fn split_by_family(nets: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let merged = IpNet::aggregate(&nets.to_vec());
    merged
        .into_iter()
        .partition(|n| matches!(n.addr(), IpAddr::V4(_)))
}

/// Why `install` or `remove` failed. The messages carry nft's own words and config values,
/// never anything derived from traffic.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "capture {verb} needs the nft tool (nftables), and found it neither on PATH nor at \
         /usr/sbin/nft or /sbin/nft; install it, or apply `ciphergate capture print` with your \
         own tooling"
    )]
    NftNotFound { verb: &'static str },
    #[error("cannot run {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "capture {verb} needs CAP_NET_ADMIN in the pod's network namespace: run it in an init \
         container with the NET_ADMIN capability (nft said: {stderr})"
    )]
    NotPermitted { verb: &'static str, stderr: String },
    #[error(
        "this kernel lacks nf_tables, or a part of it the capture rules use (nat chains, \
         redirect, fib, conntrack, reject) (nft said: {stderr})"
    )]
    KernelSupport { stderr: String },
    #[error("nft failed ({status}) to {verb} the capture rules: {stderr}")]
    Nft {
        verb: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error(
        "capture {verb} puts Linux netfilter rules in place, and this is not Linux \
         (`ciphergate capture print` still shows them)"
    )]
    NotLinux { verb: &'static str },
}

/// Replaces the table `inet ciphergate` with the rules of `capture`, in one transaction.
pub fn install(capture: &CaptureConfig) -> Result<(), CaptureError> {
    apply("install", &ruleset(capture))
}

/// Deletes the table `inet ciphergate`; succeeds when it is not there.
pub fn remove() -> Result<(), CaptureError> {
    apply("remove", &removal())
}

#[cfg(not(target_os = "linux"))]
fn apply(verb: &'static str, _script: &str) -> Result<(), CaptureError> {
    Err(CaptureError::NotLinux { verb })
}

/// Runs `nft -f -` with `script` on stdin.
#[cfg(target_os = "linux")]
fn apply(verb: &'static str, script: &str) -> Result<(), CaptureError> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    let nft = nft_path().ok_or(CaptureError::NftNotFound { verb })?;
    let spawn_error = |source| CaptureError::Spawn {
        path: nft.clone(),
        source,
    };
    let mut child = Command::new(&nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // Written beside the wait, so a script longer than the pipe's buffer cannot deadlock
    // against nft's own output. A failed write means nft exited early; its status says why.
    let output = std::thread::scope(|scope| {
        scope.spawn(move || {
            let _ = stdin.write_all(script.as_bytes());
        });
        child.wait_with_output()
    })
    .map_err(spawn_error)?;
    if output.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    Err(classify(verb, output.status, stderr))
}

/// Tells a missing privilege and a missing kernel feature from other failures, by nft's
/// message (it reports the kernel's errno as text).
#[cfg(target_os = "linux")]
fn classify(verb: &'static str, status: std::process::ExitStatus, stderr: String) -> CaptureError {
    let lower = stderr.to_ascii_lowercase();
    if lower.contains("operation not permitted") || lower.contains("permission denied") {
        CaptureError::NotPermitted { verb, stderr }
    } else if lower.contains("not supported")
        // The script creates everything it names, so the kernel's "no such file" means an
        // expression or chain type it does not have (a missing nft_* module).
        || (lower.contains("could not process rule") && lower.contains("no such file"))
    {
        CaptureError::KernelSupport { stderr }
    } else {
        CaptureError::Nft {
            verb,
            status,
            stderr,
        }
    }
}

/// `nft` on PATH, else where distributions put it.
#[cfg(target_os = "linux")]
fn nft_path() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &PathBuf| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nft"))
        .chain(["/usr/sbin/nft", "/sbin/nft"].map(PathBuf::from))
        .find(executable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CaptureTarget, InboundCapture};

    fn target(listener: &str, port: u16) -> CaptureTarget {
        CaptureTarget {
            listener: listener.into(),
            port,
        }
    }

    fn outbound_only() -> CaptureConfig {
        CaptureConfig {
            outbound: Some(target("egress-all", 15001)),
            inbound: Vec::new(),
            proxy_uid: 65532,
            exclude_cidrs: Vec::new(),
            exclude_ports: Vec::new(),
            own_ports: Vec::new(),
        }
    }

    fn inbound_only() -> CaptureConfig {
        CaptureConfig {
            outbound: None,
            inbound: vec![InboundCapture {
                port: 8080,
                to: target("ingress", 8443),
            }],
            proxy_uid: 65532,
            exclude_cidrs: Vec::new(),
            exclude_ports: Vec::new(),
            own_ports: vec![9901, 8443],
        }
    }

    /// The rule lines of one chain, comments cut off.
    fn chain_rules(script: &str, name: &str) -> Option<Vec<String>> {
        let start = script.find(&format!("\tchain {name} {{\n"))?;
        let body = &script[start..];
        let end = body.find("\n\t}")?;
        Some(
            body[..end]
                .lines()
                .skip(1)
                .map(|l| match l.find(" comment \"") {
                    Some(i) => l[..i].trim().to_owned(),
                    None => l.trim().to_owned(),
                })
                .collect(),
        )
    }

    #[test]
    fn the_table_is_replaced_in_one_script_and_nothing_else_is_named() {
        let script = ruleset(&outbound_only());
        let statements: Vec<&str> = script
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.starts_with('\t'))
            .collect();
        assert_eq!(
            statements,
            [
                "table inet ciphergate",
                "delete table inet ciphergate",
                "table inet ciphergate {",
                "}"
            ]
        );
        for line in script.lines().filter(|l| l.contains("table ")) {
            assert!(
                line.contains("table inet ciphergate") || line.contains("table `inet ciphergate`"),
                "{line}"
            );
        }
        assert_eq!(
            removal()
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            ["table inet ciphergate", "delete table inet ciphergate"]
        );
    }

    #[test]
    fn outbound_only_redirects_all_but_local_own_and_non_tcp() {
        let script = ruleset(&outbound_only());
        assert_eq!(
            chain_rules(&script, "outbound").unwrap(),
            [
                "type nat hook output priority -100; policy accept;",
                "meta l4proto != tcp return",
                "meta skuid 65532 return",
                "fib daddr type local return",
                "meta l4proto tcp redirect to :15001",
            ]
        );
        assert_eq!(chain_rules(&script, "inbound"), None);
        assert_eq!(chain_rules(&script, "inbound_guard"), None);
        assert!(
            script.contains("redirect to :15001 comment \"to transparent listener egress-all\"")
        );
    }

    #[test]
    fn inbound_only_redirects_the_app_ports_and_guards_the_rest() {
        let script = ruleset(&inbound_only());
        assert_eq!(chain_rules(&script, "outbound"), None);
        assert_eq!(
            chain_rules(&script, "inbound").unwrap(),
            [
                "type nat hook prerouting priority -100; policy accept;",
                "meta l4proto != tcp return",
                "iifname \"lo\" return",
                "tcp dport 8080 redirect to :8443",
            ]
        );
        assert_eq!(
            chain_rules(&script, "inbound_guard").unwrap(),
            [
                "type filter hook input priority 0; policy accept;",
                "iifname \"lo\" accept",
                "meta l4proto != tcp accept",
                "ct state invalid drop",
                "ct state established,related accept",
                "ct status dnat accept",
                "tcp dport { 8443, 9901 } accept",
                "meta l4proto tcp reject with tcp reset",
            ]
        );
    }

    #[test]
    fn both_directions_and_several_inbound_ports() {
        let mut capture = outbound_only();
        capture.proxy_uid = 1337;
        capture.inbound = vec![
            InboundCapture {
                port: 8080,
                to: target("ingress", 8443),
            },
            InboundCapture {
                port: 9090,
                to: target("grpc", 9443),
            },
        ];
        capture.own_ports = vec![8443, 9443];
        let script = ruleset(&capture);
        let outbound = chain_rules(&script, "outbound").unwrap();
        assert!(outbound.contains(&"meta skuid 1337 return".to_owned()));
        let inbound = chain_rules(&script, "inbound").unwrap();
        assert_eq!(
            inbound[3..],
            [
                "tcp dport 8080 redirect to :8443",
                "tcp dport 9090 redirect to :9443"
            ]
        );
        assert!(
            chain_rules(&script, "inbound_guard")
                .unwrap()
                .contains(&"tcp dport { 8443, 9443 } accept".to_owned())
        );
        // Chains in a fixed order: outbound, inbound, inbound_guard.
        let at = |name: &str| script.find(&format!("chain {name} {{")).unwrap();
        assert!(at("outbound") < at("inbound") && at("inbound") < at("inbound_guard"));
        assert!(script.contains("comment \"app port 9090 to terminate listener grpc\""));
    }

    #[test]
    fn excludes_split_by_family_merged_and_sorted() {
        let mut capture = outbound_only();
        capture.exclude_cidrs = [
            "169.254.169.254/32",
            "2001:db8::/32",
            "fd00::1/128",
            "10.1.0.0/16",
            "10.0.0.0/8",
            "192.0.2.77/24",
            "::1/128",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        capture.exclude_ports = vec![5432, 25, 5432];
        let rules = chain_rules(&ruleset(&capture), "outbound").unwrap();
        assert_eq!(
            rules[4..],
            [
                "ip daddr { 10.0.0.0/8, 169.254.169.254/32, 192.0.2.0/24 } return",
                "ip6 daddr { ::1/128, 2001:db8::/32, fd00::1/128 } return",
                "tcp dport { 25, 5432 } return",
                "meta l4proto tcp redirect to :15001",
            ]
        );
    }

    #[test]
    fn one_family_only_leaves_the_other_rule_out() {
        let mut capture = outbound_only();
        capture.exclude_cidrs = vec!["2001:db8:1::/48".parse().unwrap()];
        let script = ruleset(&capture);
        assert!(script.contains("\t\tip6 daddr { 2001:db8:1::/48 } return comment"));
        assert!(!script.contains("\t\tip daddr"), "{script}");
        assert!(!script.contains("tcp dport {"), "{script}");
    }

    #[test]
    fn empty_lists_leave_their_rules_out() {
        let mut capture = inbound_only();
        capture.own_ports = Vec::new();
        let script = ruleset(&capture);
        assert!(
            !script.contains("{  }") && !script.contains("{ }"),
            "{script}"
        );
        assert_eq!(
            chain_rules(&script, "inbound_guard").unwrap()[5..],
            [
                "ct status dnat accept",
                "meta l4proto tcp reject with tcp reset"
            ]
        );
    }

    #[test]
    fn every_rule_says_what_it_is_for() {
        let mut capture = outbound_only();
        capture.inbound = inbound_only().inbound;
        capture.own_ports = vec![8443];
        capture.exclude_cidrs = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        capture.exclude_ports = vec![25];
        let script = ruleset(&capture);
        for line in script.lines().filter(|l| l.starts_with("\t\t")) {
            if line.contains(" hook ") {
                continue;
            }
            let comment = line.split(" comment \"").nth(1).unwrap_or_else(|| {
                panic!("no comment on {line:?}");
            });
            assert!(comment.ends_with('"') && comment.len() <= 129, "{line}");
        }
        // Each chain has a line above it saying what it is for.
        for name in ["outbound", "inbound", "inbound_guard"] {
            let at = script.find(&format!("\tchain {name} {{")).unwrap();
            let before = script[..at].trim_end_matches('\t').trim_end_matches('\n');
            assert!(
                before.rsplit('\n').next().unwrap().starts_with("\t# "),
                "{name}"
            );
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn nft_errors_are_told_apart() {
        use std::os::unix::process::ExitStatusExt as _;
        let status = std::process::ExitStatus::from_raw(1 << 8);
        let e = classify(
            "install",
            status,
            "netlink: Error: cache initialization failed: Operation not permitted".into(),
        );
        assert!(matches!(e, CaptureError::NotPermitted { .. }), "{e}");
        assert!(e.to_string().contains("CAP_NET_ADMIN"));
        assert!(e.to_string().contains("NET_ADMIN capability"));
        let e = classify(
            "install",
            status,
            "Error: Could not process rule: No such file or directory".into(),
        );
        assert!(matches!(e, CaptureError::KernelSupport { .. }), "{e}");
        let e = classify(
            "install",
            status,
            "mnl_socket_open: Protocol not supported".into(),
        );
        assert!(matches!(e, CaptureError::KernelSupport { .. }), "{e}");
        assert!(e.to_string().contains("nf_tables"));
        let e = classify("remove", status, "Error: syntax error".into());
        assert!(matches!(e, CaptureError::Nft { .. }), "{e}");
        assert!(e.to_string().contains("syntax error"), "{e}");
        let e = CaptureError::NftNotFound { verb: "install" };
        assert!(
            e.to_string()
                .contains("capture install needs the nft tool (nftables)")
        );
        assert!(e.to_string().contains("ciphergate capture print"));
    }
}
