//! The operator console: a web page over the DLQ tooling (`redrive`, `dlq peek`,
//! `dead-letters`, `checkpoints`), served by `sqs-worker console`.
//!
//! It reads DLQs with peek semantics (a bounded sample, handed back at once, cached for a
//! few seconds: `sample.rs`), and every action goes through the same library calls as the CLI
//! ([`crate::redrive`]), so markers, the final pass and "send first, delete after" hold
//! unchanged. Each action writes an operator-log row ([`crate::store::OperatorLog`]).
//!
//! Security (`auth.rs`): loopback by default, where the Host header must name loopback (no
//! DNS rebinding); any other address needs `--auth-token`, and a login sets a session
//! cookie. Every mutation needs the session's CSRF token; `--read-only` refuses them all.
//! Pages escape everything and show control and bidi characters as visible escapes
//! (`render.rs`); a strict Content-Security-Policy forbids inline script.

// A page's refusal travels as the `Err` of its steps: a whole response, made at most once per
// request and returned at once, so boxing it would buy nothing.
#![allow(clippy::result_large_err)]

mod actions;
mod auth;
mod bulk;
mod charts;
mod pages;
mod render;
mod sample;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::message::{Envelope, KeySpec};
use crate::redrive::RedriveOptions;
use crate::store::CheckpointStore;

pub use auth::check_listen;

/// What the console serves and how.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// The DLQs shown, in order (at least one).
    pub dlq_urls: Vec<String>,
    /// Where redrives send; `None`: each DLQ's source queue (its RedrivePolicy).
    pub to: Option<String>,
    /// The target worker's checkpoint scope; `None`: the target queue's name.
    pub scope: Option<String>,
    /// The target worker's key pointers (and fingerprint fields).
    pub key: KeySpec,
    /// The target worker's envelope.
    pub envelope: Envelope,
    /// Redrives allowed per message (as `redrive --max-redrives`).
    pub max_redrives: u32,
    /// The operator named in audit rows, unless one names themself at login.
    pub operator: String,
    /// Required to log in; `None` only on loopback.
    pub auth_token: Option<String>,
    /// Show no action and refuse every mutation.
    pub read_only: bool,
    /// Most messages read per DLQ view.
    pub sample_size: usize,
    /// How long a DLQ sample is reused before the DLQ is read again.
    pub sample_for: Duration,
}

/// Most messages a view may read: reading hides them briefly and bumps their receive counts.
pub const MOST_SAMPLED: usize = 500;

/// The console's state, shared by every request.
pub(crate) struct Console {
    pub(crate) config: ConsoleConfig,
    pub(crate) client: aws_sdk_sqs::Client,
    pub(crate) store: Arc<dyn CheckpointStore>,
    pub(crate) samples: sample::Samples,
    pub(crate) sessions: auth::Sessions,
    pub(crate) bulk_runs: Mutex<HashMap<u64, Arc<bulk::BulkRun>>>,
    /// The port served, for the Host check on loopback.
    pub(crate) port: u16,
}

type Shared = Arc<Console>;

impl Console {
    /// The redrive options of DLQ number `dlq`, as `redrive` would take them.
    pub(crate) fn redrive_options(&self, dlq: usize, operator: &str) -> RedriveOptions {
        RedriveOptions {
            dlq_url: self.config.dlq_urls[dlq].clone(),
            to: self.config.to.clone(),
            max_redrives: self.config.max_redrives,
            rate: None,
            limit: None,
            dry_run: false,
            include_complete: false,
            filter: None,
            scope: self.config.scope.clone(),
            key: self.config.key.clone(),
            envelope: self.config.envelope,
            operator: operator.to_owned(),
        }
    }
}

/// Serve the console on `listener` until `shutdown`.
pub async fn serve(
    config: ConsoleConfig,
    client: aws_sdk_sqs::Client,
    store: Arc<dyn CheckpointStore>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let address: SocketAddr = listener.local_addr()?;
    if let Err(problem) = check_listen(address, config.auth_token.as_deref()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            problem,
        ));
    }
    let console = Arc::new(Console {
        sessions: auth::Sessions::new(config.auth_token.is_none(), &config.operator),
        config,
        client,
        store,
        samples: sample::Samples::default(),
        bulk_runs: Mutex::new(HashMap::new()),
        port: address.port(),
    });
    let app = router(console);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn router(console: Shared) -> Router {
    let reads = Router::new()
        .route("/", get(pages::overview::page))
        .route("/dlq/{dlq}", get(pages::browse::list))
        .route("/dlq/{dlq}/message/{id}", get(pages::browse::message))
        .route("/dlq/{dlq}/message/{id}/raw", get(pages::browse::raw_body))
        .route(
            "/dlq/{dlq}/message/{id}/edit",
            get(pages::browse::edit_form),
        )
        .route(
            "/dlq/{dlq}/message/{id}/delete",
            get(pages::browse::delete_form),
        )
        .route("/bulk/{run}", get(pages::bulk::progress))
        .route("/bulk/{run}/events", get(bulk::events))
        .route("/dead-letters", get(pages::dead_letters::list))
        .route("/dead-letters/export", get(pages::dead_letters::export))
        .route("/dead-letters/{id}", get(pages::dead_letters::show))
        .route("/checkpoints", get(pages::checkpoints::lookup))
        .route("/audit", get(pages::overview::audit));
    let mutations = Router::new()
        .route("/dlq/{dlq}/message/{id}/redrive", post(actions::redrive))
        .route(
            "/dlq/{dlq}/message/{id}/edit",
            post(actions::edit_and_redrive),
        )
        .route("/dlq/{dlq}/message/{id}/delete", post(actions::delete))
        .route("/dlq/{dlq}/bulk/dry-run", post(bulk::dry_run))
        .route("/dlq/{dlq}/bulk", post(bulk::start))
        .route("/dead-letters/{id}/requeue", post(actions::requeue))
        .route("/logout", post(auth::logout));
    Router::new()
        .merge(reads)
        .merge(mutations)
        .layer(axum::middleware::from_fn_with_state(
            console.clone(),
            auth::require_session,
        ))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/assets/console.css", get(render::stylesheet))
        .route("/assets/console.js", get(render::script))
        .layer(axum::middleware::from_fn_with_state(
            console.clone(),
            auth::guard_host,
        ))
        .layer(axum::middleware::from_fn(render::security_headers))
        .with_state(console)
}
