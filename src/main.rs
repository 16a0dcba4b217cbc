//! The `pipes` command: read the settings, then serve until told to stop.

use std::process::ExitCode;

use pipes::settings::{LoadError, Settings};

// mimalloc, measured on the warm path against glibc's malloc in the same
// benchmark run; see `pipes::alloc` for what is asked of it.
#[global_allocator]
static ALLOCATOR: pipes::alloc::Allocator = pipes::alloc::Allocator;

fn main() -> ExitCode {
    pipes::host::raise_open_files_limit();
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(LoadError::Info(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(LoadError::Setting(e)) => {
            eprintln!("pipes: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match pipes::server::run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipes: {e}");
            ExitCode::from(1)
        }
    }
}
