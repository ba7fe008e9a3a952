//! The `fanout` binary: the only place that uses anyhow; everything below returns typed errors.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::{error, info};

use fanout::app::App;
use fanout::backfill::{self, BackfillOptions, TimeRange};
use fanout::config::Config;

#[derive(Parser)]
#[command(
    name = "fanout",
    version,
    about = "WebAssembly-plugin sink host for Debezium CDC streams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the CDC topic, enrich, and deliver batches to the configured plugins. SIGHUP
    /// re-reads the config and swaps in the plugins whose file or entry changed.
    Run {
        #[arg(long, short, env = "FANOUT_CONFIG", default_value = "fanout.toml")]
        config: PathBuf,
    },
    /// Reprocess events of [start, end) from PostgreSQL through the same enrichment and plugins.
    Backfill {
        #[arg(long, short, env = "FANOUT_CONFIG", default_value = "fanout.toml")]
        config: PathBuf,
        /// ISO 8601; without a zone the time is UTC.
        #[arg(long)]
        start: String,
        /// ISO 8601, exclusive; without a zone the time is UTC.
        #[arg(long)]
        end: String,
        /// Only these content ids (repeatable).
        #[arg(long = "content-id")]
        content_ids: Vec<i64>,
        /// Deliver to this plugin only (repeatable; default: every configured plugin).
        /// Backfill never moves a lane's committed position.
        #[arg(long = "plugin")]
        plugins: Vec<String>,
        /// Continue an interrupted backfill from its checkpoint.
        #[arg(long)]
        resume: bool,
        /// Checkpoint file (default: .fanout-backfill-<range>.state in the working dir).
        #[arg(long)]
        state_file: Option<PathBuf>,
    },
    /// Plugin tools.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Dead letters: list, show, replay to a plugin.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

// --- dead letters (`fanout dlq`) --------------------------------------------------------------

#[derive(Subcommand)]
enum DlqCommand {
    /// List the dead letters (oldest first), filtered.
    List {
        #[arg(long, short, env = "FANOUT_CONFIG", default_value = "fanout.toml")]
        config: PathBuf,
        /// Only this plugin's letters.
        #[arg(long)]
        plugin: Option<String>,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// One JSON object per letter instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show letters in full: headers, key and payload. ID is PARTITION@OFFSET in the
    /// dead-letter topic (as `list` prints it); repeatable.
    Show {
        #[arg(long, short, env = "FANOUT_CONFIG", default_value = "fanout.toml")]
        config: PathBuf,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Deliver the chosen letters of a plugin to it again, through its live path; letters
    /// already replayed (the ledger) are skipped, so a second run changes nothing.
    Replay {
        #[arg(long, short, env = "FANOUT_CONFIG", default_value = "fanout.toml")]
        config: PathBuf,
        #[arg(long)]
        plugin: String,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Only these letters (PARTITION@OFFSET, repeatable).
        #[arg(long = "id")]
        ids: Vec<String>,
        /// The replay ledger (default: fanout-dlq-replayed.jsonl next to the config).
        #[arg(long)]
        ledger: Option<PathBuf>,
        /// Print what would be replayed; deliver nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(clap::Args)]
struct DlqFilterArgs {
    /// decode, enrich or plugin.
    #[arg(long)]
    stage: Option<String>,
    /// A reason class (rejected, gave_up, undecodable, missing_content) or text in the reason.
    #[arg(long)]
    reason: Option<String>,
    /// Dead-lettered at or after: a time (2026-01-08T14:00:00Z) or an age (30m, 2h, 1d).
    #[arg(long)]
    since: Option<String>,
    /// Dead-lettered before: a time or an age.
    #[arg(long)]
    until: Option<String>,
}

impl DlqFilterArgs {
    fn filter(&self, plugin: Option<String>) -> anyhow::Result<fanout::dlq::Filter> {
        let time = |t: &Option<String>| t.as_deref().map(fanout::dlq::parse_time).transpose();
        Ok(fanout::dlq::Filter {
            plugin,
            stage: self.stage.clone(),
            reason: self.reason.clone(),
            since_ms: time(&self.since)?,
            until_ms: time(&self.until)?,
            ids: Vec::new(),
        })
    }
}

async fn dlq(command: DlqCommand) -> anyhow::Result<ExitCode> {
    use fanout::dlq;
    let read_all = |config: &Config| {
        let (kafka, topic) = (config.kafka.clone(), config.kafka.dead_letter_topic.clone());
        tokio::task::spawn_blocking(move || {
            dlq::read(&kafka, &topic, None, std::time::Duration::from_secs(120))
        })
    };
    match command {
        DlqCommand::List {
            config,
            plugin,
            filter,
            json,
        } => {
            let config = load_config(&config)?;
            let filter = filter.filter(plugin)?;
            let letters = read_all(&config).await??;
            let chosen: Vec<_> = letters.iter().filter(|l| filter.matches(l)).collect();
            if json {
                for l in &chosen {
                    println!("{}", serde_json::to_string(l)?);
                }
            } else {
                println!(
                    "{:<10} {:<19} {:<16} {:<7} {:<15} {:<28} reason",
                    "id", "dead-lettered", "plugin", "stage", "class", "source"
                );
                for l in &chosen {
                    println!(
                        "{:<10} {:<19} {:<16} {:<7} {:<15} {:<28} {}",
                        l.id(),
                        dlq::format_ms(l.timestamp_ms),
                        l.plugin,
                        l.stage,
                        l.reason_class,
                        format!(
                            "{}/{}@{}",
                            l.source_topic, l.source_partition, l.source_offset
                        ),
                        l.reason.chars().take(120).collect::<String>()
                    );
                }
                eprintln!(
                    "{} of {} letters in {}",
                    chosen.len(),
                    letters.len(),
                    config.kafka.dead_letter_topic
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { config, ids } => {
            let config = load_config(&config)?;
            let wanted = ids
                .iter()
                .map(|i| dlq::parse_id(i))
                .collect::<Result<Vec<_>, _>>()?;
            let letters = read_all(&config).await??;
            let mut missing = false;
            for (p, o) in wanted {
                let Some(l) = letters.iter().find(|l| l.partition == p && l.offset == o) else {
                    eprintln!("no letter {p}@{o} in {}", config.kafka.dead_letter_topic);
                    missing = true;
                    continue;
                };
                println!("letter {} of {}", l.id(), config.kafka.dead_letter_topic);
                println!("  dead-lettered: {}", dlq::format_ms(l.timestamp_ms));
                for (k, v) in &l.headers {
                    println!("  {k}: {v}");
                }
                let text = |b: &Option<Vec<u8>>| match b {
                    None => "(none)".to_string(),
                    Some(b) => match serde_json::from_slice::<serde_json::Value>(b) {
                        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
                        Err(_) => String::from_utf8_lossy(b).into_owned(),
                    },
                };
                println!("  key: {}", text(&l.key));
                println!("  payload: {}", text(&l.payload));
            }
            Ok(if missing {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        DlqCommand::Replay {
            config: path,
            plugin,
            filter,
            ids,
            ledger,
            dry_run,
        } => {
            let config = load_config(&path)?;
            let mut filter = filter.filter(None)?;
            filter.ids = ids
                .iter()
                .map(|i| dlq::parse_id(i))
                .collect::<Result<Vec<_>, _>>()?;
            let shutdown = fanout::shutdown::on_signal();
            let app = App::start_with(config, std::slice::from_ref(&plugin))
                .await
                .context("cannot start")?;
            let opts = dlq::replay::ReplayOptions {
                ledger: ledger.unwrap_or_else(|| dlq::replay::default_ledger(&path)),
                plugin,
                filter,
                dry_run,
            };
            let summary = dlq::replay::run(&app, &opts, shutdown).await?;
            println!("{summary}");
            println!("ledger: {}", opts.ledger.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

// ----------------------------------------------------------------------------------------------

#[derive(Subcommand)]
enum PluginCommand {
    /// Check that a .wasm file is a sink plugin this host can run; with --config, also run
    /// its `init` as `fanout run` would (that entry's config, grants, limits and services)
    /// and report grant problems visible before any batch. Exit code 1 on errors.
    Check {
        file: PathBuf,
        /// The host config (read as `fanout run` reads it, FANOUT__* overrides included).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The `[[plugins]]` entry to check FILE as (default: the entry whose path is FILE,
        /// else the only entry).
        #[arg(long, requires = "config")]
        plugin: Option<String>,
    },
    /// Run a plugin against events with in-memory Redis, HTTP and ClickHouse that record
    /// every command, request and row; print what it did per batch. Exit code 1 on a trap,
    /// a rejection, a retry-later, a failed init, or (with --grants) a refused call.
    Test {
        file: PathBuf,
        /// JSON lines of enriched events (SPEC section 4; docs/plugin-authoring.md).
        #[arg(long, conflicts_with = "generate")]
        events: Option<PathBuf>,
        /// Generate N varied events instead (default: 1000 when no --events).
        #[arg(long)]
        generate: Option<usize>,
        /// The host config whose `[[plugins]]` entry (config, grants, limits) FILE runs as.
        #[arg(long, short, conflicts_with = "plugin_config")]
        config: Option<PathBuf>,
        /// The entry of --config (default: the one whose path is FILE, else the only one).
        #[arg(long, requires = "config")]
        plugin: Option<String>,
        /// The plugin's config table as JSON, without a host config (no grants).
        #[arg(long)]
        plugin_config: Option<String>,
        /// Hold every call to the entry's grants as `fanout run` does.
        #[arg(long)]
        grants: bool,
        /// Events per batch (default: the config's batch.max_events, else 500).
        #[arg(long)]
        batch_size: Option<usize>,
        /// The status every HTTP request is answered with.
        #[arg(long, default_value_t = 200)]
        http_status: u16,
        /// Deliver every batch a second time after the last one, as after a crash.
        #[arg(long)]
        replay: bool,
        /// Print every effect (default: the first 40 per batch).
        #[arg(long)]
        all: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // The async worker threads (lanes, decoding, enrichment, service clients); tokio's default
    // is one per core. Plugin code runs on threads of its own either way.
    match std::env::var("FANOUT_WORKER_THREADS").map(|v| v.parse::<usize>()) {
        Ok(Ok(n)) if n > 0 => {
            builder.worker_threads(n);
        }
        Ok(_) => {
            eprintln!("error: FANOUT_WORKER_THREADS must be a positive integer");
            return ExitCode::FAILURE;
        }
        Err(_) => {}
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            let message = error_chain(&e);
            error!("{message}");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: typed errors often print their source already.
fn error_chain(e: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    message
}

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path, std::env::vars()).map_err(anyhow::Error::from)
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Dlq { command } => dlq(command).await,
        Command::Run { config: path } => {
            let config = load_config(&path)?;
            let shutdown = fanout::shutdown::on_signal();
            // SIGHUP ends a process by default: listen before the slow part of the start.
            let hangups = fanout::reload::hangups().context("cannot listen for SIGHUP")?;
            let app = App::start(config).await.context("cannot start")?;
            let reload = fanout::app::ReloadOn { path, hangups };
            app.run_reloading(shutdown, Some(reload)).await?;
            info!("stopped cleanly");
            Ok(ExitCode::SUCCESS)
        }
        Command::Backfill {
            config,
            start,
            end,
            content_ids,
            plugins,
            resume,
            state_file,
        } => {
            // Validate the range before touching anything.
            let range = TimeRange::parse(&start, &end)?;
            let config = load_config(&config)?;
            let shutdown = fanout::shutdown::on_signal();
            let app = App::start_with(config, &plugins)
                .await
                .context("cannot start")?;
            let opts = BackfillOptions {
                state_file: state_file
                    .unwrap_or_else(|| backfill::default_state_file(&range, &content_ids)),
                range,
                content_ids,
                resume,
            };
            let summary = backfill::run(&app, &opts, shutdown).await?;
            println!("{summary}");
            Ok(if summary.dead_lettered > 0 {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Plugin {
            command: PluginCommand::Check {
                file, config: None, ..
            },
        } => {
            let report = fanout::plugin::check(&file)?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin {
            command:
                PluginCommand::Check {
                    file,
                    config: Some(config),
                    plugin,
                },
        } => {
            let opts = fanout::plugin::check::CheckOptions {
                file,
                config,
                plugin,
            };
            let report = fanout::plugin::check::run(&opts).await;
            println!("{report}");
            Ok(if report.has_errors() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Plugin {
            command:
                PluginCommand::Test {
                    file,
                    events,
                    generate,
                    config,
                    plugin,
                    plugin_config,
                    grants,
                    batch_size,
                    http_status,
                    replay,
                    all,
                    json,
                },
        } => {
            use fanout::plugin::trial::{self, EventSource, PluginSetup, TrialOptions};
            let batch_size = match (batch_size, &config) {
                (Some(n), _) => Some(n),
                (None, Some(path)) => Some(load_config(path)?.batch.max_events),
                (None, None) => None,
            };
            let opts = TrialOptions {
                file,
                events: match events {
                    Some(path) => EventSource::File(path),
                    None => EventSource::Generate(generate.unwrap_or(1000)),
                },
                setup: match config {
                    Some(path) => PluginSetup::Config { path, name: plugin },
                    None => PluginSetup::Json(plugin_config.unwrap_or_else(|| "{}".into())),
                },
                grants,
                batch_size,
                http_status,
                replay,
            };
            let report = trial::run(&opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render((!all).then_some(40)));
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
