//! The producer's trace context carried by a message: a W3C `traceparent` (and
//! `tracestate`) message attribute, as OpenTelemetry's AWS SDK instrumentations inject it, or
//! the `AWSTraceHeader` system attribute in X-Ray's format, as AWS sets it for SNS → SQS and
//! other integrations. Pure parsing: exporting spans belongs to telemetry.

/// The message attribute holding a W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The message attribute holding the vendors' part of a W3C trace context.
pub const TRACESTATE: &str = "tracestate";
/// The SQS system attribute holding an X-Ray trace header.
pub const AWS_TRACE_HEADER: &str = "AWSTraceHeader";
/// The trace context's message attributes: a message made from another (a DLQ copy, a
/// redriven message) keeps them right after the redrive markers, so it stays in its trace.
pub const TRACE_ATTRIBUTES: [&str; 2] = [TRACEPARENT, TRACESTATE];

/// A remote span context: the trace and the span a message's processing continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// The producer's span: 16 lowercase hex digits, not all zero. None for an X-Ray header
    /// without a `Parent` (the trace is known, not the span).
    pub parent_id: Option<String>,
    /// The producer's sampling decision.
    pub sampled: bool,
    /// The W3C `tracestate`, passed on unchanged.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context a message carries: its `traceparent` attribute (with `tracestate`) if it
    /// is valid, else its `AWSTraceHeader` if that is.
    pub fn of_message(
        traceparent: Option<&str>,
        tracestate: Option<&str>,
        aws_trace_header: Option<&str>,
    ) -> Option<TraceContext> {
        let w3c = traceparent.and_then(parse_traceparent).map(|mut context| {
            context.tracestate = tracestate
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
            context
        });
        w3c.or_else(|| aws_trace_header.and_then(parse_xray))
    }

    /// As a W3C `traceparent` header (version 00), when the parent span is known.
    pub fn traceparent(&self) -> Option<String> {
        let parent = self.parent_id.as_deref()?;
        let flags = if self.sampled { "01" } else { "00" };
        Some(format!("00-{}-{parent}-{flags}", self.trace_id))
    }
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn all_zero(text: &str) -> bool {
    text.bytes().all(|b| b == b'0')
}

/// A W3C `traceparent`: `version-traceid-parentid-flags`. Version `ff` and all-zero ids are
/// invalid; version 00 has exactly four fields, later versions may append more.
pub fn parse_traceparent(header: &str) -> Option<TraceContext> {
    let mut fields = header.trim().split('-');
    let (version, trace_id, parent_id, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let rest = fields.next();
    let valid = is_hex(version, 2)
        && version != "ff"
        && (version != "00" || rest.is_none())
        && is_hex(trace_id, 32)
        && !all_zero(trace_id)
        && is_hex(parent_id, 16)
        && !all_zero(parent_id)
        && is_hex(flags, 2);
    if !valid {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceContext {
        trace_id: trace_id.to_owned(),
        parent_id: Some(parent_id.to_owned()),
        sampled: flags & 1 == 1,
        tracestate: None,
    })
}

/// An X-Ray trace header: `Root=1-{8 hex time}-{24 hex};Parent={16 hex};Sampled={0|1}`
/// (fields in any order, others ignored). The W3C trace id is the root's two hex parts
/// joined, which is how X-Ray and OpenTelemetry's X-Ray propagator convert it.
pub fn parse_xray(header: &str) -> Option<TraceContext> {
    let (mut root, mut parent, mut sampled) = (None, None, false);
    for field in header.split(';') {
        let (name, value) = field.trim().split_once('=')?;
        match name.trim() {
            "Root" => root = Some(value.trim()),
            "Parent" => parent = Some(value.trim()),
            "Sampled" => sampled = value.trim() == "1",
            _ => {}
        }
    }
    let mut parts = root?.split('-');
    let (version, time, random) = (parts.next()?, parts.next()?, parts.next()?);
    if version != "1" || parts.next().is_some() || !is_hex(time, 8) || !is_hex(random, 24) {
        return None;
    }
    let trace_id = format!("{time}{random}");
    if all_zero(&trace_id) {
        return None;
    }
    let parent_id = match parent {
        Some(p) if is_hex(p, 16) && !all_zero(p) => Some(p.to_owned()),
        Some(_) => return None,
        None => None,
    };
    Some(TraceContext {
        trace_id,
        parent_id,
        sampled,
        tracestate: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn a_w3c_traceparent_is_read_and_written_back() {
        let header = format!("00-{TRACE}-00f067aa0ba902b7-01");
        let context = parse_traceparent(&header).unwrap();
        assert_eq!(context.trace_id, TRACE);
        assert_eq!(context.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert!(context.sampled);
        assert_eq!(context.traceparent().unwrap(), header);
        let unsampled = parse_traceparent(&format!("00-{TRACE}-00f067aa0ba902b7-00")).unwrap();
        assert!(!unsampled.sampled);
        // A later version may carry more fields; version 00 may not.
        assert!(parse_traceparent(&format!("01-{TRACE}-00f067aa0ba902b7-01-extra")).is_some());
        assert!(parse_traceparent(&format!("00-{TRACE}-00f067aa0ba902b7-01-extra")).is_none());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            &format!("ff-{TRACE}-00f067aa0ba902b7-01"),
            &format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            &format!("00-{TRACE}-0000000000000000-01"),
            &format!("00-{}-00f067aa0ba902b7-01", TRACE.to_uppercase()),
            &format!("00-{TRACE}-00f067aa0ba902b-01"),
            &format!("00-{TRACE}-00f067aa0ba902b7-1"),
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_xray_header_becomes_the_same_trace() {
        let header = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
        let context = parse_xray(header).unwrap();
        assert_eq!(context.trace_id, "5759e988bd862e3fe1be46a994272793");
        assert_eq!(context.parent_id.as_deref(), Some("53995c3f42cd8ad8"));
        assert!(context.sampled);
        assert_eq!(
            context.traceparent().unwrap(),
            "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01"
        );
        // Order and extra fields do not matter; no Parent: the trace without a span.
        let rootless =
            parse_xray("Sampled=0;Lineage=a:1;Root=1-5759e988-bd862e3fe1be46a994272793").unwrap();
        assert_eq!(rootless.parent_id, None);
        assert!(!rootless.sampled);
        assert_eq!(rootless.traceparent(), None);
        for bad in [
            "Root=2-5759e988-bd862e3fe1be46a994272793",
            "Parent=53995c3f42cd8ad8",
            "Root=1-zz59e988-bd862e3fe1be46a994272793",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=xyz",
        ] {
            assert_eq!(parse_xray(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_w3c_attribute_wins_and_keeps_its_tracestate() {
        let w3c = format!("00-{TRACE}-00f067aa0ba902b7-01");
        let xray = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
        let context =
            TraceContext::of_message(Some(&w3c), Some("congo=t61rcWkgMzE"), Some(xray)).unwrap();
        assert_eq!(context.trace_id, TRACE);
        assert_eq!(context.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        // An invalid traceparent falls back to the X-Ray header.
        let fallback = TraceContext::of_message(Some("nonsense"), None, Some(xray)).unwrap();
        assert_eq!(fallback.trace_id, "5759e988bd862e3fe1be46a994272793");
        assert_eq!(TraceContext::of_message(None, Some("a=b"), None), None);
    }
}
