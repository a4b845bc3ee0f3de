//! The `coordinator` binary: flags, settings (rules are checked here: a cycle
//! stops start-up with the cycle named), tracing, then the server.

use clap::Parser;
use coordinator::server::Application;
use coordinator::settings::{Flags, Settings};

/// mimalloc: the event path allocates many small strings (JSON, selectors,
/// Redis arguments); it is faster at that than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    let settings = match Settings::load(&flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("coordinator: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    shared::service::init_tracing(settings.log_json);
    let app = match Application::build(settings) {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "coordinator failed to start");
            return std::process::ExitCode::from(1);
        }
    };
    match app.run_until_stopped(shared::service::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "coordinator failed");
            std::process::ExitCode::from(1)
        }
    }
}
