//! `cuttle-bench`: end-to-end load for cuttle and the systems a team would deploy instead,
//! measured side by side in one run on the same machine, payloads and client counts.
//!
//! ```text
//! cargo run --release -p cuttle-bench -- run                # the full run (≈ 75 min)
//! cargo run --release -p cuttle-bench -- run --smoke        # seconds; what CI runs
//! cargo run --release -p cuttle-bench -- report --input bench/results/full.json
//! ```
//!
//! Layout: [`wire`] speaks each protocol as a client; [`targets`] starts and stops the
//! servers; [`scenario`] drives fan-out, fan-in, idle and connect; [`noisy`] measures one
//! tenant's latency while another attacks the proxy (cuttle only); [`report`] writes the
//! tables, ratios and plots; [`rooms`] runs many small rooms at a chat rate and measures
//! bystanders under subscribe/unsubscribe churn; [`presence`] times two replicas agreeing on room presence
//! after join and leave storms (cuttle only); [`broadcast`] is the ceiling baseline server;
//! [`sys`] reads /proc.
//! The proxy itself runs as a child process of this binary (`serve-proxy`, exactly the
//! `cuttle` command line) so its memory and CPU are measured apart from the load generator.

mod broadcast;
mod noisy;
mod presence;
mod report;
mod rooms;
mod scenario;
mod sys;
mod targets;
mod tls;
mod webhook_sink;
mod wire;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::report::Results;
use crate::scenario::{Plan, Record};
use crate::targets::Target;

#[derive(Debug, Parser)]
#[command(
    name = "cuttle-bench",
    about = "End-to-end benchmarks of cuttle against baselines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the `run` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run scenarios against targets; write results JSON, plots and (optionally) the report.
    Run(RunArgs),
    /// Rewrite the plots and the report from a results JSON.
    Report {
        #[arg(long, default_value = "bench/results/full.json")]
        input: PathBuf,
        #[arg(long, default_value = "docs/benchmarks")]
        plots: PathBuf,
        /// Markdown file whose `<!-- results:begin/end -->` block is replaced.
        #[arg(long, default_value = "BENCHMARKS.md")]
        report: PathBuf,
    },
    /// Run the proxy (internal: the tool's child process; arguments as for `cuttle`).
    #[command(hide = true)]
    ServeProxy {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the minimal broadcast server (internal).
    #[command(hide = true)]
    ServeBroadcast {
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Systems to measure.
    #[arg(long, value_delimiter = ',', default_values_t = Target::ALL.to_vec())]
    targets: Vec<Target>,
    /// Scenarios to run, in order.
    /// (`noisy`, the noisy-neighbour scenario, `presence`, two replicas' presence
    /// convergence under join storms, and `webhooks`, the fan-out with every webhook event
    /// sent to a slow receiver, run against the cuttle targets only.)
    #[arg(long, value_delimiter = ',', default_values_t = ["fanout".to_string(), "fanin".into(), "rooms".into(), "churn".into(), "connect".into(), "idle".into(), "noisy".into(), "presence".into(), "webhooks".into()])]
    scenarios: Vec<String>,
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1000, 5000])]
    fanout_n: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1000, 5000])]
    fanin_n: Vec<usize>,
    /// Idle connection counts. The top is 19,500, not 20,000: this machine's hard open-file
    /// limit is 20,000 per process and cannot be raised here (no CAP_SYS_RESOURCE), and the
    /// server needs a few dozen fds of its own.
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 5000, 10000, 19500])]
    idle_n: Vec<usize>,
    /// QoS levels of the fan-out, fan-in and rooms phases (QoS 1 only on the targets that
    /// have it: not NATS core, not the broadcast server).
    #[arg(long, value_delimiter = ',', default_values_t = [0, 1])]
    qos: Vec<u8>,
    /// Payload sizes in bytes (at least 12: phase and timestamp).
    #[arg(long, value_delimiter = ',', default_values_t = [64, 1024])]
    payloads: Vec<usize>,
    /// Length of each measured phase.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Total deliveries per second in the fixed-rate mode.
    #[arg(long, default_value_t = 10_000)]
    fixed_rate: u64,
    /// Outstanding deliveries per subscriber in the max-rate fan-out.
    #[arg(long, default_value_t = 128)]
    window: u32,
    /// The noisy-neighbour attacks to run (all by default): restore-amplification,
    /// unsubscribe-flood, slow-consumer, keepalive-slots.
    #[arg(long, value_delimiter = ',')]
    attacks: Vec<String>,
    /// Members of the presence scenario's big room (full run: 5,000).
    #[arg(long)]
    presence_n: Option<usize>,
    /// The presence scenario's small rooms, as ROOMSxMEMBERS (full run: 1000x10).
    #[arg(long)]
    presence_rooms: Option<String>,
    /// Concurrent clients in the connect scenario.
    #[arg(long, default_value_t = 32)]
    connect_concurrency: usize,
    /// Skip the TLS connect measurement.
    #[arg(long)]
    no_tls: bool,
    /// Small N and short phases: proves the tool works end to end in seconds (CI). Fails
    /// unless every target produced every figure without errors.
    #[arg(long)]
    smoke: bool,
    /// Give up after this long in total.
    #[arg(long, default_value = "100m", value_parser = humantime::parse_duration)]
    max_time: Duration,
    /// Where the results JSON goes.
    #[arg(long, default_value = "bench/results/full.json")]
    out: PathBuf,
    /// Where the PNG plots go.
    #[arg(long, default_value = "docs/benchmarks")]
    plots: PathBuf,
    /// Markdown file whose `<!-- results:begin/end -->` block is replaced (none: skip).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Keep the records already in `--out` except those of the (target, scenario) pairs this
    /// run measures: re-run one scenario without redoing the rest.
    #[arg(long)]
    merge: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::ServeProxy { args } => {
            cuttle::cli::main_with_args(std::iter::once(OsString::from("cuttle")).chain(args))
        }
        Command::ServeBroadcast { listen } => {
            runtime_then(async move { broadcast::serve(listen).await })
        }
        Command::Report {
            input,
            plots,
            report,
        } => match write_report(&input, &plots, Some(&report)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cuttle-bench: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => runtime_then(run(args)),
    }
}

fn runtime_then<F: Future<Output = Result<()>>>(f: F) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cuttle-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cuttle-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn write_report(
    input: &std::path::Path,
    plots: &std::path::Path,
    report_md: Option<&std::path::Path>,
) -> Result<()> {
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read {}", input.display()))?;
    let results: Results = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a results file", input.display()))?;
    // A run of the noisy-neighbour or the presence scenario alone has its own block and no
    // plots: it leaves the comparison's figures as they are.
    let comparison = results
        .records
        .iter()
        .any(|r| !matches!(r.scenario.as_str(), "noisy" | "presence"));
    if comparison {
        report::plots(&results, plots)?;
    }
    if let Some(md) = report_md {
        if comparison {
            // Plot links are relative to the report's directory.
            let base = md.parent().unwrap_or(std::path::Path::new(""));
            let rel = pathdiff(plots, base);
            report::splice(md, &report::markdown(&results, &rel))?;
            eprintln!("wrote {} and plots in {}", md.display(), plots.display());
        }
        if let Some(block) = report::noisy_markdown(&results) {
            report::splice_named(md, "noisy", &block)?;
            eprintln!("wrote the noisy-neighbour block of {}", md.display());
        }
        if let Some(block) = report::presence_markdown(&results) {
            report::splice_named(md, "presence", &block)?;
            eprintln!("wrote the presence block of {}", md.display());
        }
    }
    Ok(())
}

/// `plots` relative to `base` when it lies under it (both relative to the working directory).
fn pathdiff(plots: &std::path::Path, base: &std::path::Path) -> String {
    plots
        .strip_prefix(base)
        .unwrap_or(plots)
        .to_string_lossy()
        .into_owned()
}

async fn run(mut args: RunArgs) -> Result<()> {
    if args.smoke {
        args.fanout_n = vec![20, 50];
        args.fanin_n = vec![10, 20];
        args.idle_n = vec![50, 100];
        args.payloads = vec![64];
        args.duration = Duration::from_secs(1);
        args.fixed_rate = 2_000;
    }
    if args.payloads.iter().any(|p| *p < wire::PAYLOAD_HEADER) {
        bail!("payloads must be at least {} bytes", wire::PAYLOAD_HEADER);
    }
    let mut presence_shape = if args.smoke {
        presence::Shape::smoke()
    } else {
        presence::Shape::full(args.duration)
    };
    if let Some(n) = args.presence_n {
        presence_shape.big_room = n;
    }
    if let Some(spec) = &args.presence_rooms {
        let parsed = spec
            .split_once('x')
            .and_then(|(r, m)| Some((r.parse().ok()?, m.parse().ok()?)));
        let Some((rooms, size)) = parsed.filter(|&(r, m): &(usize, usize)| r > 0 && m > 0) else {
            bail!("--presence-rooms takes ROOMSxMEMBERS, e.g. 1000x10");
        };
        presence_shape.rooms = rooms;
        presence_shape.room_size = size;
    }
    // Each idle client is one fd here and one in the server (children inherit the limit); the
    // presence members are held all at once, as are their replicas' sockets.
    let (rooms_shape, churn_shape) = if args.smoke {
        (rooms::RoomsShape::smoke(), rooms::ChurnShape::smoke())
    } else {
        (
            rooms::RoomsShape::full(args.duration),
            rooms::ChurnShape::full(args.duration),
        )
    };
    if args.qos.iter().any(|q| *q > 1) {
        bail!("--qos takes 0 and 1 (QoS 2 is capped at 1 by the proxy)");
    }
    let want_fds = args
        .idle_n
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(
            presence_shape
                .big_room
                .max(presence_shape.rooms * presence_shape.room_size),
        )
        .max(rooms_shape.clients()) as u64
        + 400;
    let fds = sys::raise_fd_limit(want_fds)?;
    if fds < want_fds {
        eprintln!(
            "warning: open-file limit is {fds}, below the {want_fds} the idle scenario needs"
        );
    }
    let plan = Plan {
        fanout_n: args.fanout_n.clone(),
        fanin_n: args.fanin_n.clone(),
        idle_n: args.idle_n.clone(),
        payloads: args.payloads.clone(),
        qos: args.qos.clone(),
        rooms: rooms_shape,
        churn: churn_shape,
        duration: args.duration,
        fixed_rate: args.fixed_rate,
        window_per_subscriber: args.window,
        fanin_window: 512,
        connect_concurrency: args.connect_concurrency,
        noisy: {
            let mut shape = if args.smoke {
                noisy::Shape::smoke()
            } else {
                noisy::Shape::full(args.duration)
            };
            shape.attacks = noisy::Attack::parse_list(&args.attacks)?;
            shape
        },
        presence: presence_shape,
        ramp_concurrency: 128,
        settle: if args.smoke {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(2)
        },
    };
    let tls = if args.no_tls {
        None
    } else {
        Some(tls::generate()?)
    };
    let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let mut records: Vec<Record> = Vec::new();
    let wall = std::time::Instant::now();
    let all = async {
        for &target in &args.targets {
            if let Err(e) =
                scenario::run_target(target, &plan, &args.scenarios, tls.as_ref(), &mut records)
                    .await
            {
                eprintln!("{target}: {e:#}");
                records.push(Record {
                    target: target.name().into(),
                    scenario: "start".into(),
                    mode: "failed".into(),
                    errors: 1,
                    ..Record::default()
                });
            }
        }
    };
    if tokio::time::timeout(args.max_time, all).await.is_err() {
        bail!(
            "the run exceeded --max-time {}",
            humantime::format_duration(args.max_time)
        );
    }
    let mut command = format!("cuttle-bench {command}");
    if args.merge {
        if let Ok(text) = std::fs::read_to_string(&args.out) {
            let old: Results = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a results file", args.out.display()))?;
            let rerun = |r: &Record| {
                args.targets.iter().any(|t| t.name() == r.target)
                    && args.scenarios.contains(&r.scenario)
            };
            let mut kept: Vec<Record> = old.records.into_iter().filter(|r| !rerun(r)).collect();
            kept.append(&mut records);
            records = kept;
            command = format!("{}`, then `{command}", old.command);
        }
    }
    let results = Results {
        machine: sys::machine(),
        started,
        command,
        duration_s: args.duration.as_secs_f64(),
        fixed_rate: args.fixed_rate,
        records,
    };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)?)?;
    eprintln!(
        "results in {} after {:.0} s",
        args.out.display(),
        wall.elapsed().as_secs_f64()
    );
    write_report(&args.out, &args.plots, args.report.as_deref())?;
    if args.smoke {
        smoke_check(&results, &args)?;
    }
    Ok(())
}

/// The smoke run's verdict: every target produced every scenario's figures, no client failed
/// and no message was lost.
fn smoke_check(results: &Results, args: &RunArgs) -> Result<()> {
    let mut problems = Vec::new();
    for target in &args.targets {
        for scenario in &args.scenarios {
            let rows: Vec<&Record> = results
                .records
                .iter()
                .filter(|r| r.target == target.name() && r.scenario == *scenario)
                .collect();
            let tenants = matches!(target, Target::CuttleEmbedded | Target::CuttleMosquitto);
            let cuttle_only = matches!(scenario.as_str(), "noisy" | "presence" | "webhooks");
            let applies = if cuttle_only {
                tenants
            } else {
                target.runs(scenario)
            };
            if rows.is_empty() && applies {
                problems.push(format!("{target} {scenario}: no figures"));
            }
            for r in rows {
                let measured = match scenario.as_str() {
                    "fanout" | "fanin" | "webhooks" | "rooms" => {
                        r.delivered_per_s.is_some_and(|v| v > 0.0) && r.p99_us.is_some()
                    }
                    // The bystanders were measured; under churn, the churners churned.
                    "churn" => {
                        r.p99_us.is_some()
                            && (r.mode == "alone" || r.churn_per_s.is_some_and(|v| v > 0.0))
                    }
                    "idle" => r.rss_per_conn_kib.is_some(),
                    "connect" => r.connects_per_s.is_some_and(|v| v > 0.0),
                    // Every phase measured the victim; every attack reached the proxy. (An
                    // attacker the proxy has stopped reading may complete no send within a
                    // short phase: its answers are the evidence then.)
                    "noisy" => {
                        r.p99_us.is_some()
                            && r.noisy.as_ref().is_some_and(|f| {
                                r.mode.starts_with(noisy::ALONE)
                                    || f.attacker_sent_per_s > 0.0
                                    || f.accepted + f.rate_limited > 0
                                    || !f.refused.is_empty()
                                    || !f.closed.is_empty()
                            })
                    }
                    // Both replicas converged after the join and after the leave, the broker
                    // carried the presence messages, and the bystander was measured where
                    // it ran; no member was closed or refused (`errors`).
                    "presence" => match (&r.presence, r.mode.as_str()) {
                        (None, presence::ALONE) => r.p99_us.is_some(),
                        (Some(f), mode) => {
                            f.join.both_ms.is_some()
                                && f.leave.both_ms.is_some()
                                && f.join.events > 0
                                && [&f.join, &f.leave]
                                    .iter()
                                    .all(|s| s.traffic.as_ref().is_some_and(|t| t.deltas > 0))
                                && (mode == presence::BIG_ROOM_DEFAULTS
                                    || f.join.bystander_p99_us.is_some()
                                        && f.leave.bystander_p99_us.is_some())
                        }
                        _ => false,
                    },
                    _ => false,
                };
                // cuttle on NATS: NATS's MQTT gateway is at-most-once for the proxy's QoS 0
                // subscriptions and paces QoS 1 publishes through JetStream (pauses of a
                // second and more), so a short phase can end with messages missing; that is
                // the broker's figure, reported (⚠) but not a failure of the tool.
                // tests/cluster.rs asserts cuttle's delivery on a NATS cluster.
                let lost = r.lost.unwrap_or(0);
                if lost > 0 && *target == Target::CuttleNats {
                    eprintln!(
                        "  note: {target} {scenario} n={} {}: {lost} lost (NATS)",
                        r.n, r.mode
                    );
                } else if lost > 0 {
                    problems.push(format!(
                        "{target} {scenario} n={} {}: lost {lost}",
                        r.n, r.mode
                    ));
                }
                if r.mode == "failed" || !measured || r.errors > 0 {
                    problems.push(format!(
                        "{target} {scenario} n={} {}: errors={} lost={:?} measured={measured}",
                        r.n, r.mode, r.errors, r.lost
                    ));
                }
            }
        }
    }
    for r in results.records.iter().filter(|r| r.scenario == "start") {
        problems.push(format!("{} did not start", r.target));
    }
    if problems.is_empty() {
        eprintln!("smoke passed: {} figures", results.records.len());
        Ok(())
    } else {
        bail!("smoke failed:\n  {}", problems.join("\n  "))
    }
}
