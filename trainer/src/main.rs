use std::io::IsTerminal;
use std::process::ExitCode;

use kubetrain_api::contract::Role;
use kubetrain_trainer::{Cli, main_with};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only where a person reads them, not in pod logs.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = match Cli::from_env_and_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // A data-parallel worker does its math on a blocking thread and only I/O on the async
    // ones, one step at a time: a single async thread saves the cross-thread wake-ups that
    // made each push+pull ~30% slower (1 worker, batch 256). A PS keeps the default, one
    // thread per core: it serves every worker's pushes and pulls at once.
    if cli.mode == "DataParallel" && cli.role == Role::Worker {
        runtime.worker_threads(1);
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(main_with(cli)),
        Err(e) => {
            eprintln!("kubetrain-trainer: error: starting the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
