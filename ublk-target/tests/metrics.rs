//! The Prometheus endpoint: its output parses as the text exposition format and carries the
//! replication figures (lag, link state, dirty set), per node.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;

/// One sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// Parse the text exposition format strictly enough to catch mistakes: every sample has a
/// `# TYPE` before it, a valid name, `{k="v",...}` labels and a float value.
fn parse(body: &str) -> Vec<Sample> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap().to_string();
            let kind = it.next().unwrap();
            assert!(matches!(kind, "gauge" | "counter" | "summary"), "{line}");
            typed.insert(name);
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (name, rest) = line.split_once('{').unwrap_or_else(|| panic!("{line}"));
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line}"
        );
        let family = name
            .strip_suffix("_sum")
            .or_else(|| name.strip_suffix("_count"))
            .filter(|f| typed.contains(*f))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its # TYPE: {line}");
        let (labels, value) = rest.split_once("} ").unwrap_or_else(|| panic!("{line}"));
        let labels: Vec<(String, String)> = labels
            .split(',')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("{line}"));
                assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        samples.push((name.to_string(), labels, value));
    }
    samples
}

fn value(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .find(|s| s.0 == name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .2
}

/// The value of the sample of `name` carrying every label of `want`.
fn labeled(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.0 == name
                && want
                    .iter()
                    .all(|(k, v)| s.1.iter().any(|(a, b)| a == k && b == v))
        })
        .unwrap_or_else(|| panic!("{name} {want:?} missing"))
        .2
}

#[test]
fn metrics_endpoint_serves_the_exposition_format() {
    let ports = [free_port(), free_port()];
    let p = Pair::with_node_extra(
        "metrics",
        "async",
        16 << 20,
        [
            &format!("metrics = \"127.0.0.1:{}\"", ports[0]),
            &format!("metrics = \"127.0.0.1:{}\"", ports[1]),
        ],
    );
    p.start(0);
    // 32 writes of 64 KiB, each its own qemu-io request, replicated.
    let cmds: Vec<String> = (0..32)
        .map(|i| format!("write -P {} {} 64k", i + 1, i * 65536))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    p.qemu_io_ok(0, &cmds);
    p.wait_in_sync(0);
    for (i, port) in ports.iter().enumerate() {
        let body = scrape(&format!("127.0.0.1:{port}"));
        let samples = parse(&body);
        for s in &samples {
            assert_eq!(s.1[0], ("resource".into(), "r0".into()));
            assert_eq!(s.1[1], ("node".into(), p.names[i].to_string()));
        }
        assert_eq!(value(&samples, "blkrep_up"), 1.0);
        assert_eq!(value(&samples, "blkrep_primary"), (i == 0) as u8 as f64);
        assert_eq!(value(&samples, "blkrep_link_up"), 1.0, "{body}");
        for name in [
            "blkrep_lag_seconds",
            "blkrep_lag_bytes",
            "blkrep_out_of_sync_bytes",
            "blkrep_split_brain",
            "blkrep_connects_total",
        ] {
            assert!(value(&samples, name) >= 0.0, "{name}");
        }
        // Latency quantiles of the replication stages, as summaries.
        let stage = "blkrep_stage_latency_seconds";
        let (own, count_at_least) = if i == 0 {
            ("client_write", 32.0)
        } else {
            ("remote_apply", 32.0)
        };
        let n = labeled(&samples, &format!("{stage}_count"), &[("stage", own)]);
        assert!(n >= count_at_least, "{own} count {n}\n{body}");
        let p50 = labeled(&samples, stage, &[("stage", own), ("quantile", "0.5")]);
        let p99 = labeled(&samples, stage, &[("stage", own), ("quantile", "0.99")]);
        assert!(
            p50 > 0.0 && p99 >= p50 && p99 < 60.0,
            "{own}: p50 {p50} p99 {p99}"
        );
        assert!(labeled(&samples, &format!("{stage}_sum"), &[("stage", own)]) > 0.0);
        if i == 0 {
            let acks = labeled(
                &samples,
                &format!("{stage}_count"),
                &[("stage", "ship_ack")],
            );
            assert!(acks >= 32.0, "ship_ack count {acks}");
        }
        // One local leg, healthy, lacking nothing.
        assert_eq!(
            labeled(&samples, "blkrep_leg_healthy", &[("leg", "0")]),
            1.0
        );
        assert_eq!(
            labeled(&samples, "blkrep_leg_lacking_bytes", &[("leg", "0")]),
            0.0
        );
        let degraded = labeled(&samples, "blkrep_alert", &[("alert", "degraded_leg")]);
        assert_eq!(degraded, 0.0);
        // eBPF state is exported either way (the backing here is a file in a temp dir).
        let ebpf = value(&samples, "blkrep_ebpf_active");
        assert!(ebpf == 0.0 || ebpf == 1.0);
    }
    // The link goes down: the primary's endpoint says so.
    p.ok(1, &["down"]);
    let t0 = std::time::Instant::now();
    loop {
        let samples = parse(&scrape(&format!("127.0.0.1:{}", ports[0])));
        if value(&samples, "blkrep_link_up") == 0.0 {
            break;
        }
        assert!(t0.elapsed().as_secs() < 30, "link_up stays 1");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_bad_metrics_address_is_refused_with_the_field() {
    let p = Pair::with_node_extra(
        "badmetrics",
        "async",
        16 << 20,
        ["metrics = \"nowhere\"", ""],
    );
    let out = p.blkrep(0, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node[0].metrics"), "{err}");
}
