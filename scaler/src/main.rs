use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use chrono::Utc;
use clap::Parser;
use ebb_control::config::ScalerConfig;

/// ebb's autoscaler: turns queue depth, latency and the school timetable into
/// a worker count, and starts and stops workers to match, down to zero.
#[derive(Debug, Parser)]
#[command(name = "ebb-scaler", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The scaler's YAML config file.
    #[arg(long, env = "EBB_SCALER_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the HTTP API (/status, /scale, /metrics, /healthz).
    #[arg(long, env = "EBB_SCALER_LISTEN", default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    #[command(flatten)]
    run: ebb_scaler::RunArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Validate a config file; print each error with the key it concerns.
    CheckConfig {
        /// The config file to check.
        file: PathBuf,
    },
    /// Print the coming timetable windows in local and UTC time.
    Timetable {
        /// The config file whose timetable to print.
        file: PathBuf,
        /// How many days ahead to look.
        #[arg(long, default_value_t = 7)]
        days: u32,
    },
    /// Replay a trace on a virtual clock against several scaling policies
    /// and report cost and SLO attainment for each.
    // Boxed: its many flags would make every other command as large.
    Simulate(Box<ebb_sim::SimulateArgs>),
    /// Write a synthetic school's questions (ebb's trace CSV) from a
    /// config's timetable.
    GenTrace(ebb_sim::school::GenTraceArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => match ScalerConfig::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Timetable { file, days }) => print_timetable(&file, days),
        Some(Command::Simulate(args)) => simulate(&args),
        Some(Command::GenTrace(args)) => gen_trace(&args),
        None => match serve(cli).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let path = cli
        .config
        .ok_or_else(|| anyhow::anyhow!("--config (EBB_SCALER_CONFIG) is required"))?;
    let config = ScalerConfig::load(&path)?;
    let _telemetry = ebb_runtime::telemetry::init("ebb-scaler")?;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {} (--listen): {err}", cli.listen))?;
    ebb_scaler::run(
        config,
        &cli.run,
        listener,
        // Workers keep running and are adopted by the next scaler.
        ebb_runtime::shutdown::first_signal("stopping the scaler; workers keep running"),
    )
    .await?;
    Ok(())
}

fn simulate(args: &ebb_sim::SimulateArgs) -> ExitCode {
    let result = ebb_sim::run(args).and_then(|simulation| {
        if let Some(dir) = &args.out {
            ebb_sim::write(&simulation, dir)?;
        }
        Ok(simulation)
    });
    match result {
        Ok(simulation) => {
            print!("{}", simulation.report.markdown());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn gen_trace(args: &ebb_sim::school::GenTraceArgs) -> ExitCode {
    use std::io::Write;
    let result = match &args.out {
        Some(path) => std::fs::File::create(path)
            .map_err(Into::into)
            .and_then(|file| {
                let mut out = std::io::BufWriter::new(file);
                let count = ebb_sim::school::generate(args, &mut out)?;
                out.flush()?;
                Ok(count)
            }),
        None => ebb_sim::school::generate(args, &mut std::io::stdout().lock()),
    };
    match result {
        Ok(count) => {
            eprintln!("{count} questions");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn print_timetable(file: &std::path::Path, days: u32) -> ExitCode {
    let config = match ScalerConfig::load(file) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let now = Utc::now();
    let windows = config
        .timetable
        .windows_starting_between(now, now + chrono::Duration::days(days.into()));
    if windows.is_empty() {
        println!("no timetable windows in the next {days} days");
    }
    for window in windows {
        let zone = config
            .timetable_entries
            .iter()
            .find(|entry| entry.name == window.name)
            .and_then(|entry| entry.timezone.parse::<chrono_tz::Tz>().ok())
            .unwrap_or(chrono_tz::UTC);
        println!(
            "{:<20} {} -> {} {}  ({} -> {} UTC)  floor {}",
            window.name,
            window
                .start
                .with_timezone(&zone)
                .format("%a %Y-%m-%d %H:%M"),
            window.end.with_timezone(&zone).format("%H:%M"),
            zone,
            window.start.format("%Y-%m-%d %H:%M"),
            window.end.format("%H:%M"),
            window.min_workers,
        );
    }
    ExitCode::SUCCESS
}
