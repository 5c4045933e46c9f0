//! Start-up during an outage: try again what may mend, fail at once on what cannot.
//!
//! A running worker rides out an SQS or database outage; one starting during it should too,
//! instead of exiting into a restart loop. Transient failures (connection refused, DNS,
//! timeouts, 5xx, a database still starting) are retried with backoff, one line each, until
//! a start-up deadline; failures no retry can mend (a malformed URL, a queue that does not
//! exist, refused credentials, a database that does not exist) end the start at once with
//! one line saying what to fix.

use std::future::Future;
use std::time::{Duration, Instant};

/// What a failed start-up attempt means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Trying again may succeed; the text says what failed.
    Transient(String),
    /// Trying again cannot succeed; the text says what failed and what to fix.
    Fatal(String),
}

/// Why a start-up step gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    /// A failure that retrying cannot mend: the operator must fix something (exit 2).
    #[error("{0}")]
    Fatal(String),
    /// Still failing at the start-up deadline (exit 1).
    #[error("{0}")]
    GaveUp(String),
}

impl StartupError {
    /// True for a mistake in the configuration or the environment that only an operator
    /// can fix.
    pub fn is_fatal(&self) -> bool {
        matches!(self, StartupError::Fatal(_))
    }
}

/// The first wait between attempts; it doubles up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(15);

/// Run `attempt` until it succeeds, `judge` calls a failure fatal, or `deadline` passes.
/// Each transient failure is one WARN line naming `what`, the failure and the next try.
pub async fn retry_until<T, E, F, Fut>(
    what: &str,
    deadline: Instant,
    attempt: F,
    judge: impl Fn(&E) -> Verdict,
) -> Result<T, StartupError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    retry_with_waits(what, deadline, FIRST_WAIT, attempt, judge).await
}

async fn retry_with_waits<T, E, F, Fut>(
    what: &str,
    deadline: Instant,
    first_wait: Duration,
    mut attempt: F,
    judge: impl Fn(&E) -> Verdict,
) -> Result<T, StartupError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let mut wait = first_wait;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let error = match attempt().await {
            Ok(value) => {
                if attempts > 1 {
                    tracing::info!(attempts, "{what} succeeded");
                }
                return Ok(value);
            }
            Err(error) => error,
        };
        let problem = match judge(&error) {
            Verdict::Fatal(problem) => return Err(StartupError::Fatal(problem)),
            Verdict::Transient(problem) => problem,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StartupError::GaveUp(format!(
                "{problem}; gave up after {attempts} attempts in {} (--startup-timeout)",
                humantime::format_duration(whole_seconds(started.elapsed()))
            )));
        }
        let pause = wait.min(left);
        tracing::warn!(
            attempt = attempts,
            retry_in_secs = (pause.as_secs_f64() * 10.0).round() / 10.0,
            deadline_in_secs = left.as_secs(),
            "{what}: {problem}; trying again"
        );
        tokio::time::sleep(pause).await;
        wait = (wait * 2).min(MAX_WAIT);
    }
}

fn whole_seconds(duration: Duration) -> Duration {
    Duration::from_secs(duration.as_secs().max(1))
}

/// Judge a database connection failure at start: an unreachable or starting server is
/// transient; a malformed URL, a database that does not exist or refused credentials are not.
pub fn judge_database(error: &sqlx::Error, redacted_url: &str) -> Verdict {
    let unreachable = |why: String| {
        Verdict::Transient(format!(
            "cannot reach the database at {redacted_url}: {why}"
        ))
    };
    match error {
        sqlx::Error::Configuration(why) => Verdict::Fatal(format!(
            "the database URL {redacted_url} is not valid ({why}); give one like \
             postgres://user:password@host:5432/dbname (--database-url or DATABASE_URL)"
        )),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // cannot_connect_now (starting up or shutting down), too_many_connections,
            // admin_shutdown, crash_shutdown.
            Some("57P03" | "53300" | "57P01" | "57P02") => unreachable(db.message().to_owned()),
            Some("3D000") => Verdict::Fatal(format!(
                "the database in {redacted_url} does not exist ({}); create it, or fix \
                 --database-url / DATABASE_URL",
                db.message()
            )),
            Some("28P01" | "28000") => Verdict::Fatal(format!(
                "the database refused the credentials in {redacted_url} ({}); fix the user \
                 or password in --database-url / DATABASE_URL",
                db.message()
            )),
            _ => Verdict::Fatal(format!(
                "the database at {redacted_url} refused the connection: {}",
                db.message()
            )),
        },
        sqlx::Error::Io(io) => unreachable(io.to_string()),
        sqlx::Error::PoolTimedOut => unreachable("timed out waiting for a connection".into()),
        sqlx::Error::Tls(why) => unreachable(format!("TLS: {why}")),
        sqlx::Error::Protocol(why) => unreachable(why.clone()),
        other => unreachable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_WAIT: Duration = Duration::from_millis(5);

    #[tokio::test]
    async fn transient_failures_are_retried_until_the_deadline() {
        let deadline = Instant::now() + Duration::from_secs(3600);
        let mut calls = 0;
        let result = retry_with_waits(
            "probe",
            deadline,
            TEST_WAIT,
            || {
                calls += 1;
                let outcome = if calls < 4 { Err("refused") } else { Ok(calls) };
                async move { outcome }
            },
            |e: &&str| Verdict::Transient(e.to_string()),
        )
        .await;
        assert_eq!(result, Ok(4));
    }

    #[tokio::test]
    async fn a_fatal_failure_ends_at_once() {
        let deadline = Instant::now() + Duration::from_secs(3600);
        let mut calls = 0;
        let result: Result<(), _> = retry_with_waits(
            "probe",
            deadline,
            TEST_WAIT,
            || {
                calls += 1;
                async { Err("no such queue") }
            },
            |e: &&str| Verdict::Fatal(format!("{e}: fix it")),
        )
        .await;
        assert_eq!(calls, 1);
        assert_eq!(
            result,
            Err(StartupError::Fatal("no such queue: fix it".into()))
        );
    }

    #[tokio::test]
    async fn a_passed_deadline_gives_up_with_the_last_problem() {
        let result: Result<(), _> = retry_until(
            "probe",
            Instant::now(),
            || async { Err("refused") },
            |e: &&str| Verdict::Transient(e.to_string()),
        )
        .await;
        let error = result.unwrap_err();
        assert!(!error.is_fatal());
        assert!(
            error
                .to_string()
                .starts_with("refused; gave up after 1 attempts"),
            "{error}"
        );
    }

    #[test]
    fn database_failures_are_judged() {
        let url = "postgres://u:***@db/x";
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(
            matches!(judge_database(&io, url), Verdict::Transient(t) if t.contains("cannot reach"))
        );
        let config = sqlx::Error::Configuration("relative URL without a base".into());
        assert!(
            matches!(judge_database(&config, url), Verdict::Fatal(t) if t.contains("not valid"))
        );
    }
}
