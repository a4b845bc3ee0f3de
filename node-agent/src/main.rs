//! The `node-agent` binary: flags, settings, tracing, then the server.

use clap::Parser;
use node_agent::server::Application;
use node_agent::settings::{Flags, Settings};

/// mimalloc: no per-allocation header, so the one allocation of every L1
/// entry costs little more than its bytes, and allocating is faster.
/// Measured by `make bench` (agent memory).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    let settings = match Settings::load(&flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("node-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    shared::service::init_tracing(settings.log_json);
    let app = match Application::build(settings) {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "node agent failed to start");
            return std::process::ExitCode::from(1);
        }
    };
    match app.run_until_stopped(shared::service::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "node agent failed");
            std::process::ExitCode::from(1)
        }
    }
}
