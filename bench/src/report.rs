//! Turns [`Record`]s into the report: markdown tables of absolute figures, tables of ratios
//! (cuttle ÷ each baseline), and PNG plots (plotters) of throughput, p99 latency and memory
//! against N.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::scenario::Record;
use crate::targets::Target;

/// A whole run: what ran, where, and the figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub machine: String,
    pub started: String,
    pub command: String,
    pub duration_s: f64,
    pub fixed_rate: u64,
    pub records: Vec<Record>,
}

const CUTTLES: [Target; 4] = [
    Target::CuttleEmbedded,
    Target::CuttleMosquitto,
    Target::CuttleNats,
    Target::CuttleRabbitmq,
];
const BASELINES: [Target; 4] = [
    Target::RabbitmqWebMqtt,
    Target::NatsWs,
    Target::MosquittoTcp,
    Target::WsBroadcast,
];

fn find<'a>(
    r: &'a Results,
    target: Target,
    scenario: &str,
    n: usize,
    payload: usize,
    mode: &str,
) -> Option<&'a Record> {
    r.records.iter().find(|x| {
        x.target == target.name()
            && x.scenario == scenario
            && x.n == n
            && x.payload == payload
            && x.mode == mode
    })
}

fn keys(r: &Results, scenario: &str, mode: &str) -> Vec<(usize, usize)> {
    let set: BTreeSet<(usize, usize)> = r
        .records
        .iter()
        .filter(|x| x.scenario == scenario && x.mode == mode)
        .map(|x| (x.n, x.payload))
        .collect();
    set.into_iter().collect()
}

fn targets_in(r: &Results) -> Vec<Target> {
    Target::ALL
        .into_iter()
        .filter(|t| r.records.iter().any(|x| x.target == t.name()))
        .collect()
}

fn rate(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn latency(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn payload_name(p: usize) -> String {
    if p >= 1024 && p % 1024 == 0 {
        format!("{} KiB", p / 1024)
    } else {
        format!("{p} B")
    }
}

/// A cell: the figure, with a marker when clients failed or messages were lost.
fn cell(rec: Option<&Record>, figure: impl Fn(&Record) -> Option<String>) -> String {
    match rec {
        None => "–".into(),
        Some(r) if r.mode == "failed" => "failed".into(),
        Some(r) => {
            let mut s = figure(r).unwrap_or_else(|| "–".into());
            if r.errors > 0 || r.lost.unwrap_or(0) > 0 {
                s.push_str(" ⚠");
            }
            s
        }
    }
}

fn header(out: &mut String, first: &str, targets: &[Target]) {
    let _ = write!(out, "| {first} |");
    for t in targets {
        let _ = write!(out, " {t} |");
    }
    out.push_str("\n|---|");
    for _ in targets {
        out.push_str("---:|");
    }
    out.push('\n');
}

fn table(
    r: &Results,
    scenario: &str,
    mode: &str,
    figure: impl Fn(&Record) -> Option<String> + Copy,
) -> String {
    let targets = targets_in(r);
    let mut out = String::new();
    header(&mut out, "N · payload", &targets);
    for (n, payload) in keys(r, scenario, mode) {
        let label = if payload > 0 {
            format!("{n} · {}", payload_name(payload))
        } else {
            n.to_string()
        };
        let _ = write!(out, "| {label} |");
        for &t in &targets {
            let _ = write!(
                out,
                " {} |",
                cell(find(r, t, scenario, n, payload, mode), figure)
            );
        }
        out.push('\n');
    }
    out
}

/// cuttle ÷ baseline for one figure (higher is better for throughput, lower for latency
/// and memory; the heading says which).
fn ratio_table(
    r: &Results,
    scenario: &str,
    mode: &str,
    figure: impl Fn(&Record) -> Option<f64> + Copy,
) -> String {
    let baselines: Vec<Target> = BASELINES
        .into_iter()
        .filter(|b| targets_in(r).contains(b))
        .collect();
    let mut out = String::new();
    let _ = write!(out, "| cuttle · N · payload |");
    for b in &baselines {
        let _ = write!(out, " ÷ {b} |");
    }
    out.push_str("\n|---|");
    for _ in &baselines {
        out.push_str("---:|");
    }
    out.push('\n');
    for c in CUTTLES {
        for (n, payload) in keys(r, scenario, mode) {
            let Some(mine) = find(r, c, scenario, n, payload, mode).and_then(figure) else {
                continue;
            };
            let label = if payload > 0 {
                format!("{c} · {n} · {}", payload_name(payload))
            } else {
                format!("{c} · {n}")
            };
            let _ = write!(out, "| {label} |");
            for &b in &baselines {
                match find(r, b, scenario, n, payload, mode).and_then(figure) {
                    Some(theirs) if theirs > 0.0 => {
                        let _ = write!(out, " {:.2}× |", mine / theirs);
                    }
                    _ => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
    }
    out
}

/// `p50 / p99 / p99.9` of a latency phase.
fn percentile_triple(x: &Record) -> Option<String> {
    Some(format!(
        "{} / {} / {}",
        latency(x.p50_us?),
        latency(x.p99_us?),
        latency(x.p999_us?)
    ))
}

/// The markdown block that goes between the markers in BENCHMARKS.md.
pub fn markdown(r: &Results, plots: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Run of {} on {}: `{}`; phases of {:.0} s; fixed-rate mode = {} deliveries/s in total.\n\
         ⚠ marks a figure where clients failed to connect or were disconnected, or deliveries never arrived.\n",
        r.started,
        r.machine,
        r.command,
        r.duration_s,
        rate(r.fixed_rate as f64)
    );
    let thr = |x: &Record| x.delivered_per_s.map(rate);
    let p = |f: fn(&Record) -> Option<f64>| move |x: &Record| f(x).map(latency);

    out.push_str("### Fan-out: 1 publisher → N subscribers, max sustained rate (deliveries/s)\n\n");
    out.push_str(&table(r, "fanout", "max", thr));
    let _ = writeln!(
        out,
        "\n![fan-out throughput]({plots}/fanout-throughput.png)\n"
    );
    out.push_str("### Fan-out at a fixed load: p50 / p99 / p99.9 latency\n\n");
    out.push_str(&table(r, "fanout", "fixed", percentile_triple));
    let _ = writeln!(out, "\n![fan-out p99 latency]({plots}/fanout-p99.png)\n");
    out.push_str("### Fan-out at max rate: p99 latency\n\n");
    out.push_str(&table(r, "fanout", "max", p(|x| x.p99_us)));
    out.push_str(
        "\n### Fan-in: N publishers → 1 subscriber, max sustained rate (deliveries/s)\n\n",
    );
    out.push_str(&table(r, "fanin", "max", thr));
    let _ = writeln!(
        out,
        "\n![fan-in throughput]({plots}/fanin-throughput.png)\n"
    );
    out.push_str("### Fan-in at a fixed load: p50 / p99 / p99.9 latency\n\n");
    out.push_str(&table(r, "fanin", "fixed", percentile_triple));
    if r.records.iter().any(|x| x.qos == 1) {
        out.push_str(
            "\n### QoS 1 (the SDK's default)\n\n\
             Publishes at QoS 1 and subscriptions at QoS 1: MQTT clients PUBACK every delivery \
             and read their publishes' PUBACKs; cuttle publishes upstream at QoS 1 and waits for \
             the broker's PUBACK (its broker subscriptions are QoS 0, README \"Deviations\"). \
             NATS core and the broadcast server have no QoS 1 (–).\n\n",
        );
        out.push_str("Fan-out, max sustained rate (deliveries/s):\n\n");
        out.push_str(&table(r, "fanout", "max-qos1", thr));
        out.push_str("\nFan-out at the fixed load: p50 / p99 / p99.9:\n\n");
        out.push_str(&table(r, "fanout", "fixed-qos1", percentile_triple));
        out.push_str("\nFan-in, max sustained rate (deliveries/s):\n\n");
        out.push_str(&table(r, "fanin", "max-qos1", thr));
        out.push_str("\nFan-in at the fixed load: p50 / p99 / p99.9:\n\n");
        out.push_str(&table(r, "fanin", "fixed-qos1", percentile_triple));
    }
    rooms_and_churn(&mut out, r);
    out.push_str("\n### Idle connections (2 subscriptions each): server RSS per connection\n\n");
    out.push_str(&table(r, "idle", "idle", |x| {
        x.rss_per_conn_kib.map(|k| format!("{k:.1} KiB"))
    }));
    let _ = writeln!(out, "\n![idle memory]({plots}/idle-memory.png)\n");
    out.push_str("### Broker connections held for N idle clients\n\n");
    out.push_str(&table(r, "idle", "idle", |x| {
        Some(x.broker_connections.map_or("n/a".into(), |c| c.to_string()))
    }));
    out.push_str("\n### Authenticated connects per second (connect + auth + close)\n\n");
    out.push_str(&table(r, "connect", "plain", |x| {
        x.connects_per_s.map(rate)
    }));
    if r.records
        .iter()
        .any(|x| x.scenario == "connect" && x.mode == "tls")
    {
        out.push_str("\nOver TLS (cuttle only; ECDSA P-256, TLS 1.3, no session resumption):\n\n");
        out.push_str(&table(r, "connect", "tls", |x| x.connects_per_s.map(rate)));
    }

    out.push_str("\n### Ratios: cuttle ÷ baseline\n\n");
    out.push_str("Fan-out throughput at max rate (higher is better for cuttle):\n\n");
    out.push_str(&ratio_table(r, "fanout", "max", |x| x.delivered_per_s));
    out.push_str("\nFan-out p99 latency at the fixed load (lower is better for cuttle):\n\n");
    out.push_str(&ratio_table(r, "fanout", "fixed", |x| x.p99_us));
    out.push_str("\nFan-in throughput at max rate (higher is better):\n\n");
    out.push_str(&ratio_table(r, "fanin", "max", |x| x.delivered_per_s));
    if r.records.iter().any(|x| x.qos == 1) {
        out.push_str("\nQoS 1 fan-out throughput at max rate (higher is better):\n\n");
        out.push_str(&ratio_table(r, "fanout", "max-qos1", |x| x.delivered_per_s));
        out.push_str("\nQoS 1 fan-in throughput at max rate (higher is better):\n\n");
        out.push_str(&ratio_table(r, "fanin", "max-qos1", |x| x.delivered_per_s));
    }
    if r.records.iter().any(|x| x.scenario == "rooms") {
        out.push_str("\nRooms, p99 latency (lower is better):\n\n");
        for mode in modes_of(r, "rooms") {
            let _ = writeln!(out, "`{mode}`:\n");
            out.push_str(&ratio_table(r, "rooms", &mode, |x| x.p99_us));
            out.push('\n');
        }
    }
    out.push_str("\nIdle RSS per connection (lower is better):\n\n");
    out.push_str(&ratio_table(r, "idle", "idle", |x| x.rss_per_conn_kib));
    out.push_str("\nConnects per second, plain (higher is better):\n\n");
    out.push_str(&ratio_table(r, "connect", "plain", |x| x.connects_per_s));

    // The latency target is a difference, not a ratio: p99(cuttle) − p99(direct MQTT).
    let fixed_keys = keys(r, "fanout", "fixed");
    if !fixed_keys.is_empty()
        && r.records
            .iter()
            .any(|x| x.target == Target::MosquittoTcp.name())
    {
        out.push_str(
            "\nFan-out p99 at the fixed load, cuttle − direct MQTT (target ≤ +0.5 ms):\n\n",
        );
        out.push_str("| N · payload | cuttle-embedded | cuttle-mosquitto |\n|---|---:|---:|\n");
        for (n, payload) in fixed_keys {
            let base =
                find(r, Target::MosquittoTcp, "fanout", n, payload, "fixed").and_then(|x| x.p99_us);
            let diff = |t: Target| match (
                find(r, t, "fanout", n, payload, "fixed").and_then(|x| x.p99_us),
                base,
            ) {
                (Some(a), Some(b)) => format!("{:+.2} ms", (a - b) / 1000.0),
                _ => "–".into(),
            };
            let _ = writeln!(
                out,
                "| {n} · {} | {} | {} |",
                payload_name(payload),
                diff(Target::CuttleEmbedded),
                diff(Target::CuttleMosquitto)
            );
        }
    }
    fanin_minus_direct(&mut out, r);
    goals(&mut out, r);
    out.push_str("\nServer CPU during fan-out at max rate (cores busy; the load generator shares the machine):\n\n");
    out.push_str(&table(r, "fanout", "max", |x| {
        x.server_cores.map(|c| format!("{c:.2}"))
    }));
    out
}

/// The modes of `scenario` in the results, in first-seen order.
fn modes_of(r: &Results, scenario: &str) -> Vec<String> {
    let mut modes: Vec<String> = Vec::new();
    for x in r.records.iter().filter(|x| x.scenario == scenario) {
        if x.mode != "failed" && !modes.contains(&x.mode) {
            modes.push(x.mode.clone());
        }
    }
    modes
}

/// The rooms and churn tables (when the results hold them).
fn rooms_and_churn(out: &mut String, r: &Results) {
    let thr = |x: &Record| x.delivered_per_s.map(rate);
    let rooms = modes_of(r, "rooms");
    if !rooms.is_empty() {
        out.push_str(
            "\n### Rooms: many small rooms at a chat rate\n\n\
             N clients in rooms of 10 (1,000 rooms in the full run), each subscribed to its \
             room and publishing on it: `chat` = one message per client every 5 s, `busy` = \
             every second; every message reaches the room's members, the sender included. \
             Deliveries/s, then p50 / p99 / p99.9.\n\n",
        );
        for mode in &rooms {
            let _ = writeln!(out, "`{mode}`:\n");
            out.push_str(&table(r, "rooms", mode, thr));
            out.push('\n');
            out.push_str(&table(r, "rooms", mode, percentile_triple));
            out.push('\n');
        }
    }
    if r.records.iter().any(|x| x.scenario == "churn") {
        out.push_str(
            "### Churn: bystanders' latency while others subscribe and unsubscribe\n\n\
             N bystanders receive the fixed load (1 KiB in the full run); `churn` adds 200 \
             connections subscribing to and unsubscribing from distinct room topics, 2,000 \
             operations/s in all, each waiting for its acknowledgement. Bystanders' p50 / p99 / \
             p99.9:\n\n",
        );
        for mode in ["alone", "churn"] {
            let _ = writeln!(out, "`{mode}`:\n");
            out.push_str(&table(r, "churn", mode, percentile_triple));
            out.push('\n');
        }
        out.push_str("Churn achieved (operations/s) and one operation's p99 round trip:\n\n");
        out.push_str(&table(r, "churn", "churn", |x| {
            Some(format!(
                "{} · {}",
                x.churn_per_s.map_or("–".into(), rate),
                x.churn_p99_us.map_or("–".into(), latency)
            ))
        }));
        out.push('\n');
    }
}

/// The upstream issue's targets, each with its figure, the figure it is held against and
/// whether it was met (cuttle-embedded and cuttle-mosquitto; every (N, payload) measured).
fn goals(out: &mut String, r: &Results) {
    let fig =
        |t: Target, sc: &str, n: usize, p: usize, mode: &str, f: fn(&Record) -> Option<f64>| {
            find(r, t, sc, n, p, mode).and_then(f)
        };
    let thr: fn(&Record) -> Option<f64> = |x| x.delivered_per_s;
    let p99: fn(&Record) -> Option<f64> = |x| x.p99_us;
    let mut rows: Vec<String> = Vec::new();
    let verdict = |ok: bool| if ok { "✓" } else { "✗" };
    let pair = [Target::CuttleEmbedded, Target::CuttleMosquitto];
    // Fan-in ≥ 1× NATS WebSocket, QoS 0.
    for (n, p) in keys(r, "fanin", "max") {
        for c in pair {
            if let (Some(a), Some(b)) = (
                fig(c, "fanin", n, p, "max", thr),
                fig(Target::NatsWs, "fanin", n, p, "max", thr),
            ) {
                rows.push(format!(
                    "| fan-in ≥ 1× nats-ws, QoS 0 · {n} · {} | {c} | {} vs {} | {:.2}× | {} |",
                    payload_name(p),
                    rate(a),
                    rate(b),
                    a / b,
                    verdict(a >= b)
                ));
            }
        }
    }
    // Fan-in p99 at the fixed load ≤ direct MQTT + 0.5 ms, QoS 0 and 1.
    for mode in ["fixed", "fixed-qos1"] {
        for (n, p) in keys(r, "fanin", mode) {
            for c in pair {
                if let (Some(a), Some(b)) = (
                    fig(c, "fanin", n, p, mode, p99),
                    fig(Target::MosquittoTcp, "fanin", n, p, mode, p99),
                ) {
                    rows.push(format!("| fan-in p99 ≤ mosquitto-tcp + 0.5 ms, {} · {n} · {} | {c} | {} vs {} | {:+.2} ms | {} |", if mode == "fixed" { "QoS 0" } else { "QoS 1" }, payload_name(p), latency(a), latency(b), (a - b) / 1000.0, verdict(a - b <= 500.0)));
                }
            }
        }
    }
    // Fan-out ≥ 1× NATS WebSocket and ≥ 0.8× the broadcast ceiling.
    for (n, p) in keys(r, "fanout", "max") {
        for c in pair {
            let Some(a) = fig(c, "fanout", n, p, "max", thr) else {
                continue;
            };
            if let Some(b) = fig(Target::NatsWs, "fanout", n, p, "max", thr) {
                rows.push(format!(
                    "| fan-out ≥ 1× nats-ws · {n} · {} | {c} | {} vs {} | {:.2}× | {} |",
                    payload_name(p),
                    rate(a),
                    rate(b),
                    a / b,
                    verdict(a >= b)
                ));
            }
            if let Some(b) = fig(Target::WsBroadcast, "fanout", n, p, "max", thr) {
                rows.push(format!(
                    "| fan-out ≥ 0.8× ws-broadcast · {n} · {} | {c} | {} vs {} | {:.2}× | {} |",
                    payload_name(p),
                    rate(a),
                    rate(b),
                    a / b,
                    verdict(a >= 0.8 * b)
                ));
            }
        }
    }
    // Embedded fan-out p99 at 100 × 1 KiB ≤ Mosquitto-backed + 0.5 ms.
    for mode in ["fixed", "fixed-qos1"] {
        if let (Some(a), Some(b)) = (
            fig(Target::CuttleEmbedded, "fanout", 100, 1024, mode, p99),
            fig(Target::CuttleMosquitto, "fanout", 100, 1024, mode, p99),
        ) {
            rows.push(format!("| embedded fan-out p99 ≤ cuttle-mosquitto + 0.5 ms, {} · 100 · 1 KiB | cuttle-embedded | {} vs {} | {:+.2} ms | {} |", if mode == "fixed" { "QoS 0" } else { "QoS 1" }, latency(a), latency(b), (a - b) / 1000.0, verdict(a - b <= 500.0)));
        }
    }
    // Idle RSS per connection ≤ the broadcast server's.
    for (n, _) in keys(r, "idle", "idle") {
        for c in pair {
            let rss: fn(&Record) -> Option<f64> = |x| x.rss_per_conn_kib;
            if let (Some(a), Some(b)) = (
                fig(c, "idle", n, 0, "idle", rss),
                fig(Target::WsBroadcast, "idle", n, 0, "idle", rss),
            ) {
                rows.push(format!("| idle RSS/connection ≤ ws-broadcast · {n} | {c} | {a:.1} vs {b:.1} KiB | {:.2}× | {} |", a / b, verdict(a <= b)));
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    out.push_str("\n### The upstream issue's targets\n\n| target · N · payload | cuttle | figure vs baseline | ratio / difference | met |\n|---|---|---:|---:|:---:|\n");
    for row in rows {
        out.push_str(&row);
        out.push('\n');
    }
}

/// Fan-in p99 at the fixed load, cuttle − direct MQTT, at each QoS (target ≤ +0.5 ms).
fn fanin_minus_direct(out: &mut String, r: &Results) {
    if !r
        .records
        .iter()
        .any(|x| x.target == Target::MosquittoTcp.name() && x.scenario == "fanin")
    {
        return;
    }
    let cuttles: Vec<Target> = CUTTLES
        .into_iter()
        .filter(|t| targets_in(r).contains(t))
        .collect();
    out.push_str("\nFan-in p99 at the fixed load, cuttle − direct MQTT (target ≤ +0.5 ms):\n\n| QoS · N · payload |");
    for c in &cuttles {
        let _ = write!(out, " {c} |");
    }
    out.push_str("\n|---|");
    for _ in &cuttles {
        out.push_str("---:|");
    }
    out.push('\n');
    for (qos, mode) in [(0, "fixed"), (1, "fixed-qos1")] {
        for (n, payload) in keys(r, "fanin", mode) {
            let base =
                find(r, Target::MosquittoTcp, "fanin", n, payload, mode).and_then(|x| x.p99_us);
            let _ = write!(out, "| {qos} · {n} · {} |", payload_name(payload));
            for &c in &cuttles {
                match (
                    find(r, c, "fanin", n, payload, mode).and_then(|x| x.p99_us),
                    base,
                ) {
                    (Some(a), Some(b)) => {
                        let _ = write!(out, " {:+.2} ms |", (a - b) / 1000.0);
                    }
                    _ => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
    }
}

/// The noisy-neighbour block (between the `noisy` markers): per cuttle target, the victim's
/// latency alone and under each attack, the ratio to alone, and what contained the attack.
/// None when the results hold no noisy-neighbour figures.
pub fn noisy_markdown(r: &Results) -> Option<String> {
    use crate::noisy::{ALONE, ALONE_AGAIN};
    if !r.records.iter().any(|x| x.scenario == "noisy") {
        return None;
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Run of {} on {}: `{}`.\n",
        r.started, r.machine, r.command
    );
    for target in CUTTLES {
        let rows: Vec<&Record> = r
            .records
            .iter()
            .filter(|x| x.target == target.name() && x.scenario == "noisy")
            .collect();
        let Some(first) = rows.first() else {
            continue;
        };
        let alone = rows.iter().find(|x| x.mode == ALONE).and_then(|x| x.p99_us);
        let _ = writeln!(
            out,
            "#### {target}: victim {} subscribers · {}, {:.0} publishes/s\n",
            first.n,
            payload_name(first.payload),
            first.published_per_s.unwrap_or(0.0)
        );
        out.push_str(
            "| phase | victim p50 | victim p99 | p99 ÷ alone | ≤ 1.5× | attacker sent | what the attacker got | proxy RSS growth | pool → broker | new victim connect (max) | proxy cores |\n\
             |---|---:|---:|---:|:---:|---|---|---:|---:|---:|---:|\n",
        );
        for x in &rows {
            let f = x.noisy.clone().unwrap_or_default();
            let p50 = cell(Some(x), |x| x.p50_us.map(latency));
            let p99 = cell(Some(x), |x| x.p99_us.map(latency));
            let ratio = match (x.p99_us, alone) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            let is_alone = x.mode == ALONE || x.mode == ALONE_AGAIN;
            let (sent, got) = noisy_attack_cells(&x.mode, &f);
            let mut got = got;
            if f.foreign > 0 {
                got.push_str(&format!(
                    "; ⚠ {} attacker messages reached the victim",
                    f.foreign
                ));
            }
            let _ = writeln!(
                out,
                "| {} | {p50} | {p99} | {} | {} | {sent} | {got} | {:+.1} MiB | {} | {} | {} |",
                x.mode,
                ratio.map_or("–".into(), |v| format!("{v:.2}×")),
                match (is_alone, ratio) {
                    (true, _) => "",
                    (false, Some(v)) if v <= 1.5 => "yes",
                    (false, Some(_)) => "**no**",
                    (false, None) => "–",
                },
                f.rss_growth_mib,
                f.to_broker_kib_s
                    .map_or("–".into(), |v| format!("{} KiB/s", rate(v))),
                match (f.probe_max_ms, f.probe_failures) {
                    (Some(ms), 0) => format!("{ms:.1} ms ({})", f.probes),
                    (Some(ms), n) => format!("{ms:.1} ms ({}), ⚠ {n} failed", f.probes),
                    (None, n) => format!("⚠ {n} failed"),
                },
                x.server_cores.map_or("–".into(), |c| format!("{c:.2}")),
            );
        }
        out.push('\n');
    }
    Some(out)
}

fn ms_cell(v: Option<f64>) -> String {
    v.map_or("**none**".into(), |v| format!("{} ms", rate(v)))
}

/// `a / b` of a storm's per-replica convergence times.
fn replicas_cell(s: &crate::presence::Storm) -> String {
    s.listed_ms
        .iter()
        .map(|v| ms_cell(*v))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Closes by code and error frames, of the join and the leave.
fn trouble_cell(f: &crate::presence::Figures) -> String {
    let mut parts = Vec::new();
    if f.connect_failures > 0 {
        parts.push(format!(
            "{} connects failed",
            rate(f.connect_failures as f64)
        ));
    }
    for (name, s) in [("join", &f.join), ("leave", &f.leave)] {
        for (code, n) in &s.closed {
            let what = if *code == 0 {
                "ended without close frame".to_string()
            } else {
                format!("closed {code}")
            };
            parts.push(format!("{name}: {} {what}", rate(*n as f64)));
        }
        for (e, n) in &s.errors {
            parts.push(format!("{name}: {} `{e}`", rate(*n as f64)));
        }
    }
    if parts.is_empty() {
        "none".into()
    } else {
        format!("⚠ {}", parts.join(", "))
    }
}

/// Presence bytes (messages) on the broker per member of a storm half.
fn per_member_cell(s: &crate::presence::Storm, members: usize) -> String {
    let Some(t) = &s.traffic else {
        return "–".into();
    };
    let n = members.max(1) as f64;
    let mut cell = format!(
        "{:.0} B ({:.3} msgs)",
        (t.delta_bytes + t.snapshot_bytes) as f64 / n,
        (t.deltas + t.snapshots) as f64 / n
    );
    if t.snapshots > 0 {
        cell.push_str(&format!(", {} snapshot msgs", t.snapshots));
    }
    cell
}

/// The presence block (between the `presence` markers): per cuttle target, how long two
/// replicas took to agree after each storm, and what the storms cost. None when the results
/// hold no presence figures.
pub fn presence_markdown(r: &Results) -> Option<String> {
    use crate::presence::ALONE;
    if !r.records.iter().any(|x| x.scenario == "presence") {
        return None;
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Run of {} on {}: `{}`.\n",
        r.started, r.machine, r.command
    );
    for target in CUTTLES {
        let rows: Vec<&Record> = r
            .records
            .iter()
            .filter(|x| x.target == target.name() && x.scenario == "presence")
            .collect();
        if rows.is_empty() {
            continue;
        }
        let alone = rows.iter().find(|x| x.mode == ALONE);
        let alone_p99 = alone.and_then(|x| x.p99_us);
        let _ = writeln!(out, "#### {target}: two replicas\n");
        out.push_str(
            "| storm | members | send queue | join: listed by a / b | join: last member event (event frames) | leave: emptied on a / b | leave: last event (frames) | slowest list poll (join / leave) | disconnects, errors |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for x in &rows {
            let Some(f) = &x.presence else { continue };
            let shape = if f.rooms > 1 {
                format!(
                    "{} · {} rooms of {}",
                    rate(f.members as f64),
                    rate(f.rooms as f64),
                    f.room_size
                )
            } else {
                rate(f.members as f64)
            };
            let _ = writeln!(
                out,
                "| {} | {shape} | {} | {} | {} ({}) | {} | {} ({}) | {} / {} | {} |",
                x.mode,
                f.send_queue
                    .map_or("1,024 (default)".into(), |q| rate(q as f64)),
                replicas_cell(&f.join),
                ms_cell(f.join.last_event_ms),
                rate(f.join.events as f64),
                replicas_cell(&f.leave),
                f.leave
                    .last_event_ms
                    .map_or("–".into(), |v| format!("{} ms", rate(v))),
                rate(f.leave.events as f64),
                ms_cell(f.join.poll_max_ms),
                ms_cell(f.leave.poll_max_ms),
                trouble_cell(f),
            );
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "Cost, and the bystander ({} subscribers on both replicas, {} at {} publishes/s; alone: p50 {}, p99 {}):\n",
            alone.map_or(0, |x| x.n),
            payload_name(alone.map_or(0, |x| x.payload)),
            alone
                .and_then(|x| x.published_per_s)
                .map_or("–".into(), |v| format!("{v:.0}")),
            alone.and_then(|x| x.p50_us).map_or("–".into(), latency),
            alone_p99.map_or("–".into(), latency),
        );
        out.push_str(
            "| storm | presence on the broker per join: bytes (messages) | per leave | restore records per join (join + leave windows) | replica cores, join / leave | peak RSS a / b | bystander p99 during join (÷ alone) | during leave (÷ alone) |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for x in &rows {
            let Some(f) = &x.presence else { continue };
            let ratio = |s: &crate::presence::Storm| match (s.bystander_p99_us, alone_p99) {
                (Some(a), Some(b)) if b > 0.0 => {
                    let mut c = format!("{} ({:.2}×)", latency(a), a / b);
                    if s.bystander_lost.unwrap_or(0) > 0 {
                        c.push_str(" ⚠ lost");
                    }
                    c
                }
                (Some(a), _) => latency(a),
                _ => "–".into(),
            };
            let restores = match (&f.join.traffic, &f.leave.traffic) {
                (Some(j), Some(l)) => {
                    let n = f.members.max(1) as f64;
                    format!(
                        "{:.0} B ({:.2} records)",
                        (j.restore_bytes + l.restore_bytes) as f64 / n,
                        (j.restores + l.restores) as f64 / n
                    )
                }
                _ => "–".into(),
            };
            let cores = |s: &crate::presence::Storm| {
                s.replica_cores.map_or("–".into(), |c| format!("{c:.2}"))
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {restores} | {} / {} | {} | {} | {} |",
                x.mode,
                per_member_cell(&f.join, f.members),
                per_member_cell(&f.leave, f.members),
                cores(&f.join),
                cores(&f.leave),
                f.join
                    .replica_rss_mib
                    .iter()
                    .zip(&f.leave.replica_rss_mib)
                    .map(|(j, l)| format!("{:.0} MiB", j.max(*l)))
                    .collect::<Vec<_>>()
                    .join(" / "),
                ratio(&f.join),
                ratio(&f.leave),
            );
        }
        out.push('\n');
    }
    Some(out)
}

/// "attacker sent" and "what the attacker got" of one noisy-neighbour phase.
fn noisy_attack_cells(mode: &str, f: &crate::noisy::Figures) -> (String, String) {
    let refused = || {
        f.refused
            .iter()
            .map(|(e, n)| format!("{} `{e}`", rate(*n as f64)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let closes = || {
        f.closed
            .iter()
            .map(|(code, n)| {
                if *code == 0 {
                    format!("{n} ended without close frame")
                } else {
                    format!("{n} closed {code}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match mode {
        "restore-amplification" => {
            let total = (f.rate_limited + f.accepted + f.refused.values().sum::<u64>()).max(1);
            let mut got = format!(
                "{} rate-limited ({:.1} %), {} done",
                rate(f.rate_limited as f64),
                100.0 * f.rate_limited as f64 / total as f64,
                rate(f.accepted as f64),
            );
            if !f.refused.is_empty() {
                got.push_str(&format!(", {}", refused()));
            }
            (
                format!(
                    "{} subscribe/setFilters frames/s (100 × 96 B filters) on {} sockets of one actor",
                    rate(f.attacker_sent_per_s),
                    f.attacker_connections
                ),
                got,
            )
        }
        "unsubscribe-flood" => (
            format!(
                "{} unsubscribe frames/s from {} connections holding {} filters (+{:.0} MiB RSS)",
                rate(f.attacker_sent_per_s),
                f.attacker_connections,
                rate(f.preloaded_filters as f64),
                f.setup_rss_mib
            ),
            format!(
                "{} `unsubscribed`, {} rate-limited",
                rate(f.accepted as f64),
                rate(f.rate_limited as f64)
            ),
        ),
        "slow-consumer" => (
            format!(
                "{:.0} messages/s of 900 KB to non-reading subscribers ({} connections in all)",
                f.attacker_sent_per_s, f.attacker_connections
            ),
            format!("{}; {} still open after their hold", closes(), f.survived),
        ),
        "keepalive-slots" => (
            format!(
                "{} `GET /nope`/s on keep-alive ({} connections in all)",
                rate(f.attacker_sent_per_s),
                rate(f.attacker_connections as f64)
            ),
            format!(
                "{} responses, at most {} per connection, {} without `connection: close`",
                rate(f.accepted as f64),
                f.max_responses_per_connection,
                f.kept_alive
            ),
        ),
        _ => ("–".into(), "–".into()),
    }
}

/// Replaces the text between `<!-- results:begin -->` and `<!-- results:end -->` in `path`.
pub fn splice(path: &Path, block: &str) -> Result<()> {
    splice_named(path, "results", block)
}

/// Replaces the text between `<!-- {name}:begin -->` and `<!-- {name}:end -->` in `path`.
pub fn splice_named(path: &Path, name: &str, block: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let (begin, end) = (begin.as_str(), end.as_str());
    let (Some(b), Some(e)) = (text.find(begin), text.find(end)) else {
        bail!("{} has no `{begin}` … `{end}` markers", path.display());
    };
    if e < b {
        bail!("{}: the {name} markers are out of order", path.display());
    }
    let updated = format!("{}{begin}\n{block}\n{}", &text[..b], &text[e..]);
    std::fs::write(path, updated)?;
    Ok(())
}

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
    for path in FONT_PATHS {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps fonts for the process's lifetime.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
            return Ok(());
        }
    }
    bail!("no DejaVu Sans font found for the plots (apt-get install fonts-dejavu-core)")
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x7f, 0x7f, 0x7f),
];

struct Chart<'a> {
    file: &'a Path,
    title: String,
    y_label: &'a str,
    /// (target, points): a target keeps its colour across charts.
    series: Vec<(Target, Vec<(f64, f64)>)>,
}

fn draw(chart: Chart<'_>) -> Result<()> {
    let points: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|(_, s)| s.iter().copied())
        .collect();
    if points.is_empty() {
        return Ok(());
    }
    let x_min = points.iter().map(|p| p.0).fold(f64::MAX, f64::min).max(1.0);
    let x_max = points
        .iter()
        .map(|p| p.0)
        .fold(0.0, f64::max)
        .max(x_min * 2.0);
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
    let root = BitMapBackend::new(chart.file, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(90)
        .build_cartesian_2d((x_min * 0.8..x_max * 1.25).log_scale(), 0.0..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    ctx.configure_mesh()
        .x_desc("N (clients)")
        .x_labels(6)
        .x_max_light_lines(0)
        .y_desc(chart.y_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if *y >= 1e6 {
                format!("{:.1}M", y / 1e6)
            } else if *y >= 1e3 {
                format!("{:.0}k", y / 1e3)
            } else {
                format!("{y:.1}")
            }
        })
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (target, series) in &chart.series {
        let i = Target::ALL.iter().position(|t| t == target).unwrap_or(0);
        let color = COLORS[i % COLORS.len()];
        ctx.draw_series(LineSeries::new(
            series.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label(target.name())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        ctx.draw_series(series.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn series(
    r: &Results,
    scenario: &str,
    mode: &str,
    payload: Option<usize>,
    figure: fn(&Record) -> Option<f64>,
) -> Vec<(Target, Vec<(f64, f64)>)> {
    targets_in(r)
        .into_iter()
        .filter_map(|t| {
            let mut pts: Vec<(f64, f64)> = r
                .records
                .iter()
                .filter(|x| {
                    x.target == t.name()
                        && x.scenario == scenario
                        && x.mode == mode
                        && payload.is_none_or(|p| x.payload == p)
                        // A point where clients failed or messages went missing is not the
                        // system's curve; the tables keep it, marked.
                        && x.errors == 0
                        && x.lost.unwrap_or(0) == 0
                })
                .filter_map(|x| Some((x.n as f64, figure(x)?)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (!pts.is_empty()).then_some((t, pts))
        })
        .collect()
}

/// Writes the PNG plots into `dir`.
pub fn plots(r: &Results, dir: &Path) -> Result<()> {
    register_font()?;
    std::fs::create_dir_all(dir)?;
    let payloads: BTreeSet<usize> = r
        .records
        .iter()
        .filter(|x| x.scenario == "fanout")
        .map(|x| x.payload)
        .collect();
    // One payload per chart keeps the curves readable: the smallest, which stresses per-message
    // cost the most. The tables hold the others.
    let payload = payloads.iter().next().copied();
    let label = payload.map_or(String::new(), |p| format!(", {} payload", payload_name(p)));
    draw(Chart {
        file: &dir.join("fanout-throughput.png"),
        title: format!("Fan-out: deliveries/s at max sustained rate{label}"),
        y_label: "deliveries per second",
        series: series(r, "fanout", "max", payload, |x| x.delivered_per_s),
    })?;
    draw(Chart {
        file: &dir.join("fanout-p99.png"),
        title: format!(
            "Fan-out: p99 latency at {} deliveries/s{label}",
            rate(r.fixed_rate as f64)
        ),
        y_label: "p99 latency (ms)",
        series: series(r, "fanout", "fixed", payload, |x| {
            x.p99_us.map(|u| u / 1000.0)
        }),
    })?;
    draw(Chart {
        file: &dir.join("fanin-throughput.png"),
        title: format!("Fan-in: deliveries/s at max sustained rate{label}"),
        y_label: "deliveries per second",
        series: series(r, "fanin", "max", payload, |x| x.delivered_per_s),
    })?;
    draw(Chart {
        file: &dir.join("idle-memory.png"),
        title: "Idle connections: server RSS per connection".into(),
        y_label: "KiB per connection",
        series: series(r, "idle", "idle", None, |x| x.rss_per_conn_kib),
    })?;
    Ok(())
}
