//! How the binary talks to a person: one-line errors and their exit codes, tables measured
//! by display width, progress bars (plain lines when not on a terminal), redacted URLs.

use comfy_table::{CellAlignment, ContentArrangement, Table};
use indicatif::{ProgressBar, ProgressStyle};
use sqs_worker::redrive::RedriveError;
use sqs_worker::sqs::SqsError;
use sqs_worker::startup::StartupError;
use sqs_worker::worker::WorkerError;

/// A mistake only an operator can fix (a malformed URL, a queue that does not exist,
/// refused credentials, an invalid option): the binary exits 2 with this one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OperatorError(pub String);

/// An error and its causes in one line, each cause once: sqlx and the AWS SDK repeat their
/// inner error's text in their own, which `{:#}` would print twice.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(text.as_str()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text.lines().next().unwrap_or_default());
    }
    line
}

/// The exit status for an error that ended a command: 2 for an operator's mistake, 1 for
/// anything else (an outage that outlasted `--startup-timeout`, a failed redrive).
pub fn exit_status(error: &anyhow::Error) -> u8 {
    let sqs_fatal = |e: &SqsError| !e.kind.is_transient();
    let fatal = error.chain().any(|cause| {
        cause.is::<OperatorError>()
            || cause.downcast_ref::<StartupError>().is_some_and(StartupError::is_fatal)
            || cause.downcast_ref::<WorkerError>().is_some_and(WorkerError::is_fatal)
            || cause.downcast_ref::<SqsError>().is_some_and(sqs_fatal)
            || matches!(cause.downcast_ref::<RedriveError>(), Some(RedriveError::Sqs(e)) if sqs_fatal(e))
            || matches!(cause.downcast_ref::<RedriveError>(), Some(RedriveError::Config(_)))
    });
    if fatal { 2 } else { 1 }
}

pub(super) fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

pub(super) fn scope_note(scope: Option<&str>) -> String {
    scope
        .map(|s| format!(" in scope {s:?}"))
        .unwrap_or_default()
}

/// A table for people: a header row, no borders, columns measured by display width (CJK and
/// emoji keep them straight) and, on a terminal, wrapped to its width rather than cut.
pub(super) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    if !header.is_empty() {
        table.set_header(header.to_vec());
    }
    if let Some((_, width)) = console::Term::stdout().size_checked() {
        table
            .set_width(width)
            .set_content_arrangement(ContentArrangement::Dynamic);
    }
    table
}

pub(super) fn align_right(table: &mut Table, columns: &[usize]) {
    for &i in columns {
        if let Some(column) = table.column_mut(i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// A progress bar on stderr: with a length, a bar with ETA; without one, a spinner.
pub(super) fn progress_bar(length: Option<u64>, template: &str) -> ProgressBar {
    let bar = match length {
        Some(length) => ProgressBar::new(length),
        None => ProgressBar::new_spinner(),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// Name–value pairs as a two-column table.
pub(super) fn print_fields(rows: &[(&str, String)]) {
    let mut fields = table(&[]);
    for (name, value) in rows {
        fields.add_row(vec![(*name).to_owned(), value.clone()]);
    }
    println!("{}", fields.trim_fmt());
}

/// Hide the password of a database URL for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
