//! Charts as plain SVG in the page (no script, no library): bars per reason, and dead
//! letters per day stacked by reason.

use maud::{Markup, html};

use super::render::shown;

/// Colours for reasons, picked by the reason's name, so that one reason has one colour in
/// every chart.
const PALETTE: [&str; 8] = [
    "#c0392b", "#2874a6", "#b7950b", "#1e8449", "#7d3c98", "#ca6f1e", "#566573", "#148f77",
];

/// The colour of a reason (FNV-1a of its name: stable from run to run).
fn colour(reason: &str) -> &'static str {
    let hash = reason.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    PALETTE[hash as usize % PALETTE.len()]
}

/// Horizontal bars: one per `(label, count)`, longest first as given.
pub(crate) fn bars(items: &[(String, usize)]) -> Markup {
    let most = items.iter().map(|(_, n)| *n).max().unwrap_or(1).max(1);
    let row = 26;
    let height = row * items.len().max(1) + 4;
    html! {
        svg.chart role="img" aria-label="messages per failure reason" width="640" height=(height)
            viewBox={ "0 0 640 " (height) } {
            @for (i, (label, count)) in items.iter().enumerate() {
                @let y = i * row + 2;
                @let width = 1 + count * 340 / most;
                text x="0" y=(y + 17) class="label" { (shown(label)) }
                rect x="230" y=(y) width=(width) height="20" fill=(colour(label)) {}
                text x=(236 + width) y=(y + 16) class="count" { (count) }
            }
        }
    }
}

/// One day's column: its label and its counts per reason.
pub(crate) struct Day {
    pub(crate) label: String,
    pub(crate) counts: Vec<(String, usize)>,
}

/// Vertical bars per day, stacked by reason, with a legend.
pub(crate) fn stacked_days(days: &[Day]) -> Markup {
    let mut reasons: Vec<&str> = Vec::new();
    for day in days {
        for (reason, _) in &day.counts {
            if !reasons.contains(&reason.as_str()) {
                reasons.push(reason);
            }
        }
    }
    let most = days
        .iter()
        .map(|d| d.counts.iter().map(|(_, n)| n).sum::<usize>())
        .max()
        .unwrap_or(1)
        .max(1);
    let (plot, column) = (160usize, 72usize);
    let width = column * days.len().max(1) + 10;
    html! {
        svg.chart role="img" aria-label="dead letters per day by reason" width=(width) height=(plot + 40)
            viewBox={ "0 0 " (width) " " (plot + 40) } {
            @for (i, day) in days.iter().enumerate() {
                @let x = i * column + 10;
                @let total: usize = day.counts.iter().map(|(_, n)| n).sum();
                @let mut top = plot;
                @for (reason, count) in &day.counts {
                    @let h = (count * (plot - 20) / most).max(1);
                    @let y = { top -= h; top };
                    rect x=(x) y=(y + 4) width=(column - 16) height=(h) fill=(colour(reason)) {
                        title { (shown(reason)) ": " (count) }
                    }
                }
                text x=(x) y=(plot + 20) class="label" { (day.label) }
                text x=(x) y=(top) class="count" { (total) }
            }
        }
        ul.legend {
            @for reason in &reasons {
                li {
                    // A presentation attribute, not a style: the page allows no inline styles.
                    svg.swatch width="12" height="12" { rect width="12" height="12" fill=(colour(reason)) {} }
                    " " (shown(reason))
                }
            }
        }
    }
}
