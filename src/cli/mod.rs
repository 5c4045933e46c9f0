//! The binary's side: options (`args`), the subcommands behind `main.rs`, the demo. Only the
//! binary uses them, so `anyhow` and printing live here and nowhere in the library.

pub mod args;
mod checkpoints;
mod console;
mod database;
mod dead_letters;
pub mod demo;
mod dlq;
mod output;
mod run;

pub use checkpoints::{prune_checkpoints, show_checkpoint, stale_checkpoints};
pub use console::console;
pub use database::{migrate, open_migrated_store};
pub use dead_letters::{dead_letter_requeue, dead_letter_show, dead_letters_list};
pub use dlq::{dlq_peek, redrive};
pub use output::{exit_status, one_line, redact_url};
pub use run::{lambda, run, send};

#[cfg(test)]
mod tests;
