//! Who is calling: the caller part of every key (design §2), from one `CallerSource`.
//!
//! The caller scopes keys so that no caller can be answered with another caller's recorded
//! response; that holds only as far as the source cannot be forged. `header:` trusts whatever
//! sits in front to set the header and strip it from outside requests; `xfcc` trusts Envoy's
//! `x-forwarded-client-cert` from a loopback peer only (the pod's own proxy); `mtls` trusts
//! only a client certificate idemproxy verified itself; `none` puts every call under one
//! caller. A source that cannot say who calls never guesses: the call is refused.

use crate::key::ANONYMOUS_CALLER;
use crate::status::{Reason, Refusal};
use http::{HeaderMap, HeaderName};
use std::net::SocketAddr;
use std::sync::Arc;

/// The longest caller identity kept (a SPIFFE ID is at most 2048 bytes).
pub const CALLER_BYTES_MAX: usize = 2048;

/// Envoy's and Istio's forwarded client certificate header.
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";

/// Where the caller identity comes from (`--caller-source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerSource {
    /// A header set by a trusted mesh or gateway: `header:<name>`.
    Header(HeaderName),
    /// The `URI=` of the nearest element of `x-forwarded-client-cert`, from loopback peers.
    Xfcc,
    /// The verified client certificate of idemproxy's own TLS listener.
    Mtls,
    /// No caller: one tenant, every call under the anonymous caller.
    None,
}

impl CallerSource {
    /// Parses `header:<name>`, `xfcc`, `mtls` or `none`.
    pub fn parse(value: &str) -> Result<CallerSource, String> {
        match value {
            "xfcc" => Ok(CallerSource::Xfcc),
            "mtls" => Ok(CallerSource::Mtls),
            "none" => Ok(CallerSource::None),
            _ => match value.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.as_bytes())
                    .map(CallerSource::Header)
                    .map_err(|_| format!("`{name}` is not a valid header name")),
                None => Err(format!(
                    "`{value}` is not a caller source: use header:<name>, xfcc, mtls or none"
                )),
            },
        }
    }

    /// How it is written on the command line.
    pub fn describe(&self) -> String {
        match self {
            CallerSource::Header(name) => format!("header:{name}"),
            CallerSource::Xfcc => "xfcc".into(),
            CallerSource::Mtls => "mtls".into(),
            CallerSource::None => "none".into(),
        }
    }
}

/// What a connection knows of its peer.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The TCP peer.
    pub addr: Option<SocketAddr>,
    /// The caller named by the client certificate this listener verified, or why it names
    /// none (`None`: no TLS on this listener).
    pub certificate: Option<Result<Arc<str>, String>>,
}

/// Decides the caller of each call.
#[derive(Debug, Clone)]
pub struct Callers {
    /// Where the identity comes from.
    pub source: CallerSource,
    /// A call without an identity is refused instead of filed under the anonymous caller.
    pub require: bool,
}

impl Callers {
    /// The caller of a call with `headers` from `peer`, or the refusal to answer with.
    pub fn caller_of(&self, headers: &HeaderMap, peer: &Peer) -> Result<String, Refusal> {
        let found = match &self.source {
            CallerSource::None => return Ok(ANONYMOUS_CALLER.to_owned()),
            CallerSource::Header(name) => match single_header(headers, name)
                .map_err(|SentTwice| invalid(format!("more than one {name} header")))?
            {
                None => None,
                Some(value) => Some(
                    value
                        .to_str()
                        .ok()
                        .filter(|caller| !caller.is_empty())
                        .map(str::to_owned)
                        .ok_or_else(|| {
                            invalid(format!("the {name} header is not visible ASCII"))
                        })?,
                ),
            },
            CallerSource::Xfcc => {
                let mut values = headers.get_all(XFCC_HEADER).iter();
                match (values.next(), values.next()) {
                    (None, _) => None,
                    (Some(_), Some(_)) => {
                        return Err(invalid(format!("more than one {XFCC_HEADER} header")))
                    }
                    (Some(value), None) => {
                        let loopback = peer.addr.is_some_and(|addr| addr.ip().is_loopback());
                        if !loopback {
                            return Err(invalid(format!(
                                "{XFCC_HEADER} is accepted only from the pod's own proxy (a loopback peer)"
                            )));
                        }
                        let value = value
                            .to_str()
                            .map_err(|_| invalid(format!("{XFCC_HEADER} is not visible ASCII")))?;
                        xfcc_caller(value)
                            .map_err(|why| invalid(format!("{XFCC_HEADER}: {why}")))?
                    }
                }
            }
            CallerSource::Mtls => match &peer.certificate {
                Some(Ok(caller)) => Some(caller.to_string()),
                Some(Err(why)) => return Err(invalid(why.clone())),
                None => {
                    return Err(invalid(
                        "the call came without a verified client certificate",
                    ))
                }
            },
        };
        match found {
            Some(caller) if caller.len() > CALLER_BYTES_MAX => Err(invalid(format!(
                "the caller identity is longer than {CALLER_BYTES_MAX} bytes"
            ))),
            Some(caller) => Ok(caller),
            None if self.require => Err(Refusal::new(
                Reason::CallerMissing,
                format!(
                    "this sidecar requires a caller identity ({}), and the call has none",
                    self.source.describe()
                ),
            )),
            None => Ok(ANONYMOUS_CALLER.to_owned()),
        }
    }
}

/// A header that must come once came more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentTwice;

/// The one value of header `name`, or none; `SentTwice` when it came more than once. Two values are
/// refused, never one picked (the caller and the key header alike): a client's
/// `x-caller-id: alice` followed by the gateway's `x-caller-id: mallory` would otherwise be
/// keyed as alice and could be answered with alice's recorded outcome.
pub fn single_header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a http::HeaderValue>, SentTwice> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        _ => Err(SentTwice),
    }
}

fn invalid(why: impl Into<String>) -> Refusal {
    Refusal::new(Reason::CallerInvalid, why)
}

/// The `URI=` value of the nearest (last) element of an `x-forwarded-client-cert` value, or
/// `None` when that element has no URI. Anything not in Envoy's grammar is an error: a
/// caller is never guessed from a header that does not parse.
pub fn xfcc_caller(value: &str) -> Result<Option<String>, String> {
    let elements = parse_xfcc(value)?;
    let nearest = elements.last().ok_or("the header is empty")?;
    let mut uris = nearest
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case("uri"));
    match (uris.next(), uris.next()) {
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err("the nearest element has more than one URI".into()),
        (Some((_, uri)), None) if uri.is_empty() => {
            Err("the nearest element's URI is empty".into())
        }
        (Some((_, uri)), None) => Ok(Some(uri.clone())),
    }
}

/// Envoy's XFCC grammar: elements separated by `,`, pairs by `;`, `key=value`, a value
/// either bare (no `,;="`) or double-quoted with `\"` and `\\` escapes.
fn parse_xfcc(value: &str) -> Result<Vec<Vec<(String, String)>>, String> {
    const KEYS: [&str; 7] = ["by", "hash", "cert", "chain", "subject", "uri", "dns"];
    let mut elements = Vec::new();
    let mut pairs = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            if matches!(c, ',' | ';' | '"') {
                return Err(format!("unexpected `{c}` in a key"));
            }
            key.push(c);
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("`{key}` has no value"));
        }
        let key = key.trim().to_owned();
        if !KEYS.iter().any(|known| key.eq_ignore_ascii_case(known)) {
            return Err(format!("unknown key `{key}`"));
        }
        let mut item = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("an unterminated quoted value".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(escaped @ ('"' | '\\')) => item.push(escaped),
                        _ => return Err("a bad escape in a quoted value".into()),
                    },
                    Some(c) => item.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if matches!(c, ',' | ';') {
                    break;
                }
                if matches!(c, '=' | '"') {
                    return Err(format!("unexpected `{c}` in the value of `{key}`"));
                }
                item.push(c);
                chars.next();
            }
        }
        pairs.push((key, item));
        match chars.next() {
            None => {
                elements.push(pairs);
                return Ok(elements);
            }
            Some(';') => {}
            Some(',') => elements.push(std::mem::take(&mut pairs)),
            Some(c) => return Err(format!("unexpected `{c}` after a quoted value")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPIFFE: &str = "spiffe://cluster.local/ns/billing/sa/consumer";

    #[test]
    fn the_nearest_element_names_the_caller() {
        let one = format!("By=spiffe://cluster.local/ns/pay/sa/api;Hash=abc;URI={SPIFFE}");
        assert_eq!(xfcc_caller(&one).unwrap().as_deref(), Some(SPIFFE));
        let two = format!("URI=spiffe://far/edge,By=x;URI={SPIFFE}");
        assert_eq!(xfcc_caller(&two).unwrap().as_deref(), Some(SPIFFE));
        let quoted = format!("Subject=\"CN=a,O=b;\\\"q\\\"\";URI={SPIFFE}");
        assert_eq!(xfcc_caller(&quoted).unwrap().as_deref(), Some(SPIFFE));
        assert_eq!(xfcc_caller("Hash=abc").unwrap(), None);
    }

    #[test]
    fn anything_outside_the_grammar_is_refused() {
        for bad in [
            "",
            "URI",
            "URI=a;URI=b",
            "Subject=\"unterminated;URI=a",
            "Subject=\"bad \\x escape\";URI=a",
            "Subject=CN=a;URI=b",
            "Nope=1;URI=a",
            "URI=",
            "Subject=\"a\"x;URI=b",
            "URI=a,",
        ] {
            assert!(xfcc_caller(bad).is_err(), "{bad:?} must be refused");
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    fn loopback() -> Peer {
        Peer {
            addr: Some("127.0.0.6:40000".parse().unwrap()),
            certificate: None,
        }
    }

    #[test]
    fn xfcc_is_taken_only_from_a_loopback_peer() {
        let callers = Callers {
            source: CallerSource::Xfcc,
            require: false,
        };
        let forged = headers(&[(XFCC_HEADER, &format!("URI={SPIFFE}"))]);
        assert_eq!(callers.caller_of(&forged, &loopback()).unwrap(), SPIFFE);
        let outside = Peer {
            addr: Some("10.0.0.9:40000".parse().unwrap()),
            certificate: None,
        };
        let refused = callers.caller_of(&forged, &outside).unwrap_err();
        assert_eq!(refused.reason, Reason::CallerInvalid);
        let twice = headers(&[(XFCC_HEADER, "URI=a"), (XFCC_HEADER, "URI=b")]);
        assert!(callers.caller_of(&twice, &loopback()).is_err());
        assert_eq!(
            callers.caller_of(&HeaderMap::new(), &loopback()).unwrap(),
            ANONYMOUS_CALLER
        );
    }

    #[test]
    fn a_required_caller_is_never_the_anonymous_one() {
        for source in [
            CallerSource::Header(HeaderName::from_static("x-caller-id")),
            CallerSource::Xfcc,
        ] {
            let callers = Callers {
                source,
                require: true,
            };
            let refused = callers
                .caller_of(&HeaderMap::new(), &loopback())
                .unwrap_err();
            assert_eq!(refused.reason, Reason::CallerMissing);
        }
        let none = Callers {
            source: CallerSource::None,
            require: true,
        };
        let headers = headers(&[("x-caller-id", "ignored")]);
        assert_eq!(
            none.caller_of(&headers, &loopback()).unwrap(),
            ANONYMOUS_CALLER
        );
    }

    #[test]
    fn mtls_takes_only_what_the_handshake_verified() {
        let callers = Callers {
            source: CallerSource::Mtls,
            require: false,
        };
        let spoofed = headers(&[(XFCC_HEADER, "URI=spiffe://evil"), ("x-caller-id", "evil")]);
        let verified = Peer {
            addr: None,
            certificate: Some(Ok(Arc::from(SPIFFE))),
        };
        assert_eq!(callers.caller_of(&spoofed, &verified).unwrap(), SPIFFE);
        let two = Peer {
            addr: None,
            certificate: Some(Err("two URI SANs".into())),
        };
        assert_eq!(
            callers.caller_of(&spoofed, &two).unwrap_err().reason,
            Reason::CallerInvalid
        );
    }

    #[test]
    fn sources_parse_and_print_back() {
        for written in ["header:x-caller-id", "xfcc", "mtls", "none"] {
            assert_eq!(CallerSource::parse(written).unwrap().describe(), written);
        }
        assert!(CallerSource::parse("header:Bad Name").is_err());
        assert!(CallerSource::parse("cookie").is_err());
    }
}
