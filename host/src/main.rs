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
}

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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
    }
}
