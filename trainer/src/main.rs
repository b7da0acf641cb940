use std::process::ExitCode;

use clap::Parser;
use kubetrain_trainer::{Cli, Config, run};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match Config::from_cli(Cli::parse()) {
        Ok(config) => run(config).await.map(|_| ()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubetrain-trainer: error: {e}");
            ExitCode::FAILURE
        }
    }
}
