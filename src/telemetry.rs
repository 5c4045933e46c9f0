//! Logging: a tracing subscriber writing text or JSON lines to stderr.
//!
//! Stderr, so stdout stays clean for command output (JSON listings, the demo's summary).
//! Message bodies are never logged at info level; the AWS SDK and sqlx are quiet unless
//! RUST_LOG asks for them.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

const DEFAULT_FILTER: &str = "info,aws_config=warn,aws_smithy_runtime=warn,sqlx=warn";

/// Install the global subscriber. RUST_LOG overrides the default level.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A subscriber may already be installed (tests, embedding): keep it.
    let _ = result;
}
