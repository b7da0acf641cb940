use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use kubetrain_trainer::{Cli, main_with};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only where a person reads them, not in pod logs.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    main_with(Cli::parse()).await
}
