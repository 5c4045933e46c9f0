//! The redriven copy of a DLQ message: its markers set, fitted to the target queue.

use crate::sqs::{OutgoingMessage, ReceivedMessage};
use crate::{message, spans, sqs};

/// The message sent back: same body, same attributes, markers set.
pub fn redriven_message(
    message: &ReceivedMessage,
    redrive_count: u32,
    final_pass: bool,
    fifo: bool,
) -> OutgoingMessage {
    let mut markers = vec![
        (message::ATTR_DLQ_REDRIVEN, sqs::string_attribute("true")),
        (
            message::ATTR_REDRIVE_COUNT,
            sqs::number_attribute(redrive_count),
        ),
    ];
    if final_pass {
        markers.push((message::ATTR_DLQ_FINAL_PASS, sqs::string_attribute("true")));
    }
    // The markers must fit; the worker's failure notes are the first to give way.
    // The trace context comes right after them: the redriven message stays in its trace.
    let attributes = sqs::fit_attributes(
        markers,
        &spans::attributes_with_trace(message),
        &[message::ATTR_DLQ_FINAL_PASS],
        |name| match name {
            message::trace::TRACEPARENT | message::trace::TRACESTATE => 0,
            message::ATTR_FAILURE_REASON => 2,
            message::ATTR_FAILURE_DETAIL => 3,
            _ => 1,
        },
    );
    OutgoingMessage {
        body: message.body.clone(),
        attributes,
        message_group_id: fifo.then(|| {
            message
                .message_group_id()
                .unwrap_or("sqs-worker-redrive")
                .to_owned()
        }),
        deduplication_id: fifo.then(|| format!("{}-redrive-{redrive_count}", message.message_id)),
        delay: None,
    }
}

/// Make a redriven message fit the target queue's `max_bytes` (body and attributes): the
/// worker's failure detail is shortened first, then the message's own attributes and the
/// failure reason go. The redrive markers never go: without them the message would start
/// its redrives afresh and could loop, so a body that leaves them no room is an error (the
/// message stays in the DLQ and the run reports it as failed).
pub(super) fn fit_redriven(
    outgoing: &mut OutgoingMessage,
    max_bytes: usize,
) -> Result<Vec<String>, String> {
    let dropped = sqs::fit_message_size(
        &outgoing.body,
        &mut outgoing.attributes,
        max_bytes,
        message::ATTR_FAILURE_DETAIL,
        &message::KEEP_LONGEST,
    );
    if dropped
        .iter()
        .any(|name| message::REDRIVE_MARKERS.contains(&name.as_str()))
    {
        return Err(format!(
            "the body ({} bytes) leaves no room for the redrive markers within the target \
             queue's MaximumMessageSize ({max_bytes} bytes); raise it, or handle this message \
             by hand",
            outgoing.body.len()
        ));
    }
    Ok(dropped)
}
