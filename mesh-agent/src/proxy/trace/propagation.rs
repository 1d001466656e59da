//! Trace context on the wire: W3C Trace Context (`traceparent`) and Zipkin's B3, single
//! header (`b3`) and multi-header (`X-B3-*`), read from a request and written on the
//! requests the proxy sends upstream.
//!
//! Parsing is strict where a loose reading could join unrelated traces (ids must be
//! lower-case hex of the exact length and not all zero, as both specifications say) and
//! bounded (a header longer than `MAX_HEADER_LEN` is not read at all). A header that does
//! not parse is ignored, never an error for the request: the request then starts a trace
//! of its own, as the W3C specification asks of a participant.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The longest propagation header read (bytes); a W3C `traceparent` of a future version may
/// carry more fields than version 00's 55 characters, not kilobytes.
pub const MAX_HEADER_LEN: usize = 512;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Which header(s) carried the incoming context: the proxy answers in the same format
/// (and always adds `traceparent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// A remote parent: the caller's span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: u128,
    pub span_id: u64,
    /// B3 allows 64-bit trace ids; they are written back in the width they came in.
    pub short_trace_id: bool,
    pub format: Format,
}

/// What a request's headers say about its trace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Incoming {
    pub parent: Option<Parent>,
    /// The caller's sampling decision; None: deferred (B3 without a decision, or no
    /// context at all), the proxy's ratio decides.
    pub sampled: Option<bool>,
}

/// The one value of header `name`, if there is exactly one and it is short enough.
fn single<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    let mut all = h.get_all(name).iter();
    let v = all.next()?;
    if all.next().is_some() || v.len() > MAX_HEADER_LEN {
        return None;
    }
    v.to_str().ok().map(str::trim)
}

/// `s` as lower-case hex of exactly `len` digits.
fn hex(s: &str, len: usize) -> Option<u128> {
    if s.len() != len || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

/// A 64- or 128-bit B3 trace id (not zero); true when it was 64-bit.
fn b3_trace_id(s: &str) -> Option<(u128, bool)> {
    let id = match s.len() {
        16 => (hex(s, 16)?, true),
        32 => (hex(s, 32)?, false),
        _ => return None,
    };
    (id.0 != 0).then_some(id)
}

fn span_id(s: &str) -> Option<u64> {
    hex(s, 16)
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| *v != 0)
}

/// W3C `traceparent`: `version-trace_id-parent_id-flags`. Version `ff` is invalid;
/// version 00 has exactly these four fields; a later version may append `-`-separated
/// fields, which are ignored (the specification's forward compatibility rule).
pub fn parse_traceparent(v: &str) -> Option<(Parent, bool)> {
    let b = v.as_bytes();
    if b.len() < 55 || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    let version = hex(&v[0..2], 2)?;
    if version == 0xff || (version == 0 && b.len() != 55) {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = hex(&v[3..35], 32).filter(|t| *t != 0)?;
    let span_id = span_id(&v[36..52])?;
    let flags = hex(&v[53..55], 2)?;
    Some((
        Parent {
            trace_id,
            span_id,
            short_trace_id: false,
            format: Format::W3c,
        },
        flags & 1 == 1,
    ))
}

/// B3 single header: `{trace_id}-{span_id}[-{sampling}[-{parent_span_id}]]`, or a sampling
/// decision alone (`0`, `1`, `d`).
pub fn parse_b3_single(v: &str) -> Option<Incoming> {
    let sampling = |s: &str| match s {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    };
    let mut parts = v.split('-');
    let first = parts.next()?;
    let Some(second) = parts.next() else {
        // A decision alone.
        return sampling(first).map(|s| Incoming {
            parent: None,
            sampled: Some(s),
        });
    };
    let (trace_id, short) = b3_trace_id(first)?;
    let parent_id = span_id(second)?;
    let sampled = match parts.next() {
        None => None,
        Some(s) => Some(sampling(s)?),
    };
    // The caller's own parent: checked, not used.
    if let Some(p) = parts.next() {
        span_id(p)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Incoming {
        parent: Some(Parent {
            trace_id,
            span_id: parent_id,
            short_trace_id: short,
            format: Format::B3Single,
        }),
        sampled,
    })
}

/// B3 multi-header: `X-B3-TraceId` and `X-B3-SpanId` (both or neither), `X-B3-Sampled`
/// (`1`/`0`, or the legacy `true`/`false`), `X-B3-Flags: 1` (debug, which means sampled).
pub fn parse_b3_multi(h: &HeaderMap) -> Option<Incoming> {
    let debug = single(h, &B3_FLAGS) == Some("1");
    let sampled = match single(h, &B3_SAMPLED) {
        _ if debug => Some(true),
        Some("1" | "true") => Some(true),
        Some("0" | "false") => Some(false),
        Some(_) => return None,
        None => None,
    };
    let parent = match (single(h, &B3_TRACE_ID), single(h, &B3_SPAN_ID)) {
        (Some(t), Some(s)) => {
            let (trace_id, short) = b3_trace_id(t)?;
            Some(Parent {
                trace_id,
                span_id: span_id(s)?,
                short_trace_id: short,
                format: Format::B3Multi,
            })
        }
        (None, None) => None,
        _ => return None,
    };
    if parent.is_none() && sampled.is_none() {
        return None;
    }
    Some(Incoming { parent, sampled })
}

/// The context a request arrived with: `traceparent` first, then `b3`, then `X-B3-*`; the
/// first that parses wins, one that does not parse is skipped.
pub fn extract(h: &HeaderMap) -> Incoming {
    if let Some((parent, sampled)) = single(h, &TRACEPARENT).and_then(parse_traceparent) {
        return Incoming {
            parent: Some(parent),
            sampled: Some(sampled),
        };
    }
    if let Some(i) = single(h, &B3).and_then(parse_b3_single) {
        return i;
    }
    // Only worth a look when a B3 header is there at all (the common case has none).
    if h.contains_key(&B3_TRACE_ID) || h.contains_key(&B3_SAMPLED) || h.contains_key(&B3_FLAGS) {
        if let Some(i) = parse_b3_multi(h) {
            return i;
        }
    }
    Incoming::default()
}

fn value(s: String) -> HeaderValue {
    HeaderValue::try_from(s).expect("hex and dashes are a valid header value")
}

/// Writes the context of the span `span_id` (sampled) of trace `trace_id` on an upstream
/// request: always `traceparent`, and B3 in the format the context came in (`format`)
/// and in any B3 format the request also carries (so no stale B3 context reaches the
/// upstream beside the new one), with `parent_span_id` (the proxy's request span) as B3's
/// parent. `tracestate` and `X-B3-Flags` pass through untouched.
pub fn inject(
    h: &mut HeaderMap,
    trace_id: u128,
    span_id: u64,
    parent_span_id: u64,
    format: Option<(Format, bool)>,
) {
    h.insert(
        TRACEPARENT,
        value(format!("00-{trace_id:032x}-{span_id:016x}-01")),
    );
    let tid = |short: bool| {
        if short {
            format!("{:016x}", trace_id as u64)
        } else {
            format!("{trace_id:032x}")
        }
    };
    let short = matches!(format, Some((Format::B3Single | Format::B3Multi, true)));
    if matches!(format, Some((Format::B3Single, _))) || h.contains_key(&B3) {
        h.insert(
            B3,
            value(format!(
                "{}-{span_id:016x}-1-{parent_span_id:016x}",
                tid(short)
            )),
        );
    }
    if matches!(format, Some((Format::B3Multi, _)))
        || h.contains_key(&B3_TRACE_ID)
        || h.contains_key(&B3_SAMPLED)
    {
        h.insert(B3_TRACE_ID, value(tid(short)));
        h.insert(B3_SPAN_ID, value(format!("{span_id:016x}")));
        h.insert(B3_PARENT_SPAN_ID, value(format!("{parent_span_id:016x}")));
        h.insert(B3_SAMPLED, HeaderValue::from_static("1"));
    }
}

/// For a span without a parent (a root): no B3 parent span id on the request `inject`
/// wrote (B3 is written there only when the request carried a B3 header that did not
/// parse).
pub fn drop_b3_parent(h: &mut HeaderMap, trace_id: u128, span_id: u64) {
    h.remove(&B3_PARENT_SPAN_ID);
    if h.contains_key(&B3) {
        h.insert(B3, value(format!("{trace_id:032x}-{span_id:016x}-1")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SID: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_valid_traceparent_is_read_with_its_sampled_flag() {
        let i = extract(&headers(&[("traceparent", &format!("00-{TID}-{SID}-01"))]));
        let p = i.parent.unwrap();
        assert_eq!(format!("{:032x}", p.trace_id), TID);
        assert_eq!(format!("{:016x}", p.span_id), SID);
        assert_eq!(p.format, Format::W3c);
        assert_eq!(i.sampled, Some(true));
        let i = extract(&headers(&[("traceparent", &format!("00-{TID}-{SID}-00"))]));
        assert_eq!(i.sampled, Some(false));
        // Other flag bits do not make it sampled.
        let i = extract(&headers(&[("traceparent", &format!("00-{TID}-{SID}-02"))]));
        assert_eq!(i.sampled, Some(false));
    }

    #[test]
    fn a_later_traceparent_version_may_carry_more_fields() {
        let (p, s) =
            parse_traceparent(&format!("cc-{TID}-{SID}-01-what-the-future-holds")).unwrap();
        assert_eq!(format!("{:032x}", p.trace_id), TID);
        assert!(s);
        // ...but version 00 may not.
        assert!(parse_traceparent(&format!("00-{TID}-{SID}-01-x")).is_none());
        assert!(parse_traceparent(&format!("cc-{TID}-{SID}-01x")).is_none());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        let zeros32 = "0".repeat(32);
        let zeros16 = "0".repeat(16);
        for bad in [
            String::new(),
            "garbage".into(),
            format!("ff-{TID}-{SID}-01"),
            format!("00-{}-{SID}-01", TID.to_uppercase()),
            format!("00-{zeros32}-{SID}-01"),
            format!("00-{TID}-{zeros16}-01"),
            format!("00-{TID}-{SID}-0g"),
            format!("00-{TID}-{SID}-1"),
            format!("00_{TID}-{SID}-01"),
            format!("0-{TID}-{SID}-01"),
            format!("00-{TID}{SID}-01"),
            format!("00-{}-{SID}-01", &TID[..31]),
            format!("00-{TID}-{SID}-01 trailing"),
        ] {
            assert!(parse_traceparent(&bad).is_none(), "{bad:?}");
            let i = extract(&headers(&[("traceparent", &bad)]));
            assert_eq!(i, Incoming::default(), "{bad:?}");
        }
    }

    #[test]
    fn two_traceparents_or_an_oversized_one_are_ignored() {
        let v = format!("00-{TID}-{SID}-01");
        let i = extract(&headers(&[("traceparent", &v), ("traceparent", &v)]));
        assert_eq!(i, Incoming::default());
        let long = format!("cc-{TID}-{SID}-01-{}", "a".repeat(MAX_HEADER_LEN));
        assert!(long.len() > MAX_HEADER_LEN);
        let i = extract(&headers(&[("traceparent", &long)]));
        assert_eq!(i, Incoming::default());
    }

    #[test]
    fn b3_single_header_forms() {
        let i = extract(&headers(&[("b3", &format!("{TID}-{SID}-1-{SID}"))]));
        let p = i.parent.unwrap();
        assert_eq!(
            (p.format, p.short_trace_id, i.sampled),
            (Format::B3Single, false, Some(true))
        );
        let i = extract(&headers(&[("b3", &format!("{}-{SID}-d", &TID[16..]))]));
        let p = i.parent.unwrap();
        assert!(p.short_trace_id);
        assert_eq!(p.trace_id, u128::from_str_radix(&TID[16..], 16).unwrap());
        assert_eq!(i.sampled, Some(true), "debug means sampled");
        let i = extract(&headers(&[("b3", &format!("{TID}-{SID}"))]));
        assert_eq!(i.sampled, None, "deferred");
        assert!(i.parent.is_some());
        let i = extract(&headers(&[("b3", "0")]));
        assert_eq!(
            i,
            Incoming {
                parent: None,
                sampled: Some(false)
            }
        );
        for bad in [
            format!("{TID}-{SID}-2"),
            format!("{TID}-{SID}-1-xyz"),
            format!("{TID}-{SID}-1-{SID}-extra"),
            format!("{}-{SID}-1", &TID[..20]),
            format!("{TID}-{}", SID.to_uppercase()),
            "x".into(),
        ] {
            assert_eq!(
                extract(&headers(&[("b3", &bad)])),
                Incoming::default(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn b3_multi_headers() {
        let i = extract(&headers(&[
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(i.parent.unwrap().format, Format::B3Multi);
        assert_eq!(i.sampled, Some(true));
        let i = extract(&headers(&[
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-flags", "1"),
            ("x-b3-sampled", "0"),
        ]));
        assert_eq!(i.sampled, Some(true), "debug wins");
        let i = extract(&headers(&[("x-b3-sampled", "0")]));
        assert_eq!(
            i,
            Incoming {
                parent: None,
                sampled: Some(false)
            }
        );
        // A trace id without a span id, or a bad sampled value: ignored whole.
        assert_eq!(
            extract(&headers(&[("x-b3-traceid", TID)])),
            Incoming::default()
        );
        assert_eq!(
            extract(&headers(&[
                ("x-b3-traceid", TID),
                ("x-b3-spanid", SID),
                ("x-b3-sampled", "yes")
            ])),
            Incoming::default()
        );
    }

    #[test]
    fn traceparent_wins_over_b3_and_a_bad_one_falls_through() {
        let other = "1".repeat(32);
        let i = extract(&headers(&[
            ("traceparent", &format!("00-{TID}-{SID}-01")),
            ("b3", &format!("{other}-{SID}-1")),
        ]));
        assert_eq!(i.parent.unwrap().format, Format::W3c);
        let i = extract(&headers(&[
            ("traceparent", "00-bad"),
            ("b3", &format!("{other}-{SID}-1")),
        ]));
        assert_eq!(i.parent.unwrap().format, Format::B3Single);
    }

    #[test]
    fn inject_writes_traceparent_and_answers_b3_in_kind() {
        let (t, s, p) = (0x4bf9_u128 << 64 | 0x1234, 0xabc_u64, 0xdef_u64);
        let mut h = headers(&[("traceparent", "stale"), ("tracestate", "k=v")]);
        inject(&mut h, t, s, p, Some((Format::W3c, false)));
        assert_eq!(
            h["traceparent"],
            "00-0000000000004bf90000000000001234-0000000000000abc-01"
        );
        assert_eq!(h["tracestate"], "k=v", "passed through");
        assert!(!h.contains_key("b3"));
        let mut h = HeaderMap::new();
        inject(&mut h, t, s, p, Some((Format::B3Single, true)));
        assert_eq!(
            h["b3"],
            "0000000000001234-0000000000000abc-1-0000000000000def"
        );
        let mut h = headers(&[("x-b3-sampled", "0")]);
        inject(&mut h, t, s, p, Some((Format::B3Multi, false)));
        assert_eq!(h["x-b3-traceid"], "0000000000004bf90000000000001234");
        assert_eq!(h["x-b3-spanid"], "0000000000000abc");
        assert_eq!(h["x-b3-parentspanid"], "0000000000000def");
        assert_eq!(h["x-b3-sampled"], "1");
        assert_eq!(h.get_all("x-b3-sampled").iter().count(), 1);
        // A context read from `traceparent` also refreshes B3 headers the request carries.
        let mut h = headers(&[("b3", "0"), ("x-b3-traceid", "stale")]);
        inject(&mut h, t, s, p, Some((Format::W3c, false)));
        assert_eq!(
            h["b3"],
            "0000000000004bf90000000000001234-0000000000000abc-1-0000000000000def"
        );
        assert_eq!(h["x-b3-traceid"], "0000000000004bf90000000000001234");
        // What is written reads back.
        let (back, sampled) = parse_traceparent(h["traceparent"].to_str().unwrap()).unwrap();
        assert_eq!((back.trace_id, back.span_id, sampled), (t, s, true));
    }
}
