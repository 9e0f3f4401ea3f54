//! Frame decoding, pure: a text frame's JSON or a binary frame's CBOR into the JSON data model
//! (`serde_json::Value`) that schemas validate, refusing everything the mapping does not
//! carry faithfully (docs/schemas.md): trailing bytes, duplicate keys, integers outside 64
//! bits, tags, non-text keys, NaN/Infinity, `undefined`, nesting deeper than a limit, and
//! declared lengths larger than the frame. Nothing here allocates more than the frame's size
//! allows or recurses beyond the depth limit. Also writes the error frames the gateway sends
//! back, in the sender's encoding. Schema selection and validation are `schema`'s job.

use std::cell::Cell;
use std::fmt;

use base64::Engine;
use ciborium_ll::{Decoder, Header};
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Top-level key reserved for the gateway's own frames; application frames may not use it.
pub const RESERVED_KEY: &str = "$gatehouse";
/// Longest `id` echoed in an error frame (longer ids are not echoed).
pub const MAX_ECHOED_ID_BYTES: usize = 128;
/// CBOR self-describe tag (RFC 8949 3.4.6): allowed at the top level, carries no data.
const SELF_DESCRIBE_TAG: u64 = 55799;

/// How a frame's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Text frame.
    Json,
    /// Binary frame.
    Cbor,
}

/// A WebSocket message as the core sees it: a data frame's payload, or a control frame
/// (ping, pong, close), which carries nothing to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Control,
}

impl<'a> Frame<'a> {
    /// A data frame's encoding and payload; `None` for control frames.
    pub fn data(self) -> Option<(Encoding, &'a [u8])> {
        match self {
            Frame::Text(b) => Some((Encoding::Json, b)),
            Frame::Binary(b) => Some((Encoding::Cbor, b)),
            Frame::Control => None,
        }
    }
}

/// Why a frame was refused. The code is stable (docs/schemas.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectCode {
    Malformed,
    TrailingData,
    DuplicateKey,
    IntegerOutOfRange,
    NonFiniteNumber,
    UnsupportedTag,
    UnsupportedSimpleValue,
    NonTextKey,
    TooDeep,
    LengthExceedsFrame,
    ReservedKey,
    SchemaViolation,
    MissingId,
    RateLimited,
    AuditUnavailable,
}

impl RejectCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::Malformed => "malformed",
            RejectCode::TrailingData => "trailing-data",
            RejectCode::DuplicateKey => "duplicate-key",
            RejectCode::IntegerOutOfRange => "integer-out-of-range",
            RejectCode::NonFiniteNumber => "non-finite-number",
            RejectCode::UnsupportedTag => "unsupported-tag",
            RejectCode::UnsupportedSimpleValue => "unsupported-simple-value",
            RejectCode::NonTextKey => "non-text-key",
            RejectCode::TooDeep => "too-deep",
            RejectCode::LengthExceedsFrame => "length-exceeds-frame",
            RejectCode::ReservedKey => "reserved-key",
            RejectCode::SchemaViolation => "schema-violation",
            RejectCode::MissingId => "missing-id",
            RejectCode::RateLimited => "rate-limited",
            RejectCode::AuditUnavailable => "audit-unavailable",
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused frame: code, JSON pointer of the failing place, short message, the frame's id.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub code: RejectCode,
    pub pointer: String,
    pub message: String,
    pub id: Option<Value>,
}

impl Rejection {
    pub fn new(code: RejectCode, pointer: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            pointer: pointer.into(),
            message: message.into(),
            id: None,
        }
    }
}

/// One step of the path from the root to the value being decoded, kept on the stack; turned
/// into a JSON pointer only when something is refused.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

#[derive(Clone, Copy)]
struct Path<'a> {
    seg: Option<Seg<'a>>,
    parent: Option<&'a Path<'a>>,
}

impl<'a> Path<'a> {
    const ROOT: Path<'static> = Path {
        seg: None,
        parent: None,
    };

    fn pointer(&self) -> String {
        let mut segs = Vec::new();
        let mut node = Some(self);
        while let Some(n) = node {
            if let Some(s) = n.seg {
                segs.push(s);
            }
            node = n.parent;
        }
        let mut out = String::new();
        for s in segs.iter().rev() {
            out.push('/');
            match s {
                Seg::Key(k) => out.push_str(&k.replace('~', "~0").replace('/', "~1")),
                Seg::Index(i) => out.push_str(&i.to_string()),
            }
        }
        out
    }
}

/// Decoding limits.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Deepest nesting of arrays and maps (the top-level value is depth 1).
    pub max_depth: usize,
}

// ---------------------------------------------------------------- JSON

/// Checks every integer literal (no fraction, no exponent) fits in 64 bits, so that what is
/// validated is what is forwarded (serde_json would silently turn it into a float).
fn check_json_integers(bytes: &[u8]) -> Result<(), Rejection> {
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'-' | b'0'..=b'9' => {
                let start = i;
                let mut integral = true;
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'0'..=b'9' => {}
                        b'.' | b'e' | b'E' | b'+' | b'-' => integral = false,
                        _ => break,
                    }
                    i += 1;
                }
                if integral {
                    let literal = &bytes[start..i];
                    let text = std::str::from_utf8(literal).unwrap_or("");
                    let fits = text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok();
                    if !fits && literal.iter().any(u8::is_ascii_digit) {
                        return Err(Rejection::new(
                            RejectCode::IntegerOutOfRange,
                            "",
                            format!("integer {} does not fit in 64 bits", truncate(text, 32)),
                        ));
                    }
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

struct JsonSeed<'a> {
    depth: usize,
    limits: DecodeLimits,
    path: Path<'a>,
    failure: &'a Cell<Option<Rejection>>,
}

impl<'a> JsonSeed<'a> {
    fn fail<E: serde::de::Error>(&self, code: RejectCode, pointer: String, message: String) -> E {
        self.failure
            .set(Some(Rejection::new(code, pointer, message.clone())));
        E::custom(message)
    }
}

impl<'de, 'a> DeserializeSeed<'de> for JsonSeed<'a> {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'a> Visitor<'de> for JsonSeed<'a> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| {
                self.fail(
                    RejectCode::NonFiniteNumber,
                    self.path.pointer(),
                    "number is not finite".into(),
                )
            })
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth >= self.limits.max_depth {
            return Err(self.fail(
                RejectCode::TooDeep,
                self.path.pointer(),
                format!("nesting deeper than {}", self.limits.max_depth),
            ));
        }
        let mut out = Vec::new();
        loop {
            let path = Path {
                seg: Some(Seg::Index(out.len())),
                parent: Some(&self.path),
            };
            let seed = JsonSeed {
                depth: self.depth + 1,
                limits: self.limits,
                path,
                failure: self.failure,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth >= self.limits.max_depth {
            return Err(self.fail(
                RejectCode::TooDeep,
                self.path.pointer(),
                format!("nesting deeper than {}", self.limits.max_depth),
            ));
        }
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                let pointer = Path {
                    seg: Some(Seg::Key(&key)),
                    parent: Some(&self.path),
                }
                .pointer();
                return Err(self.fail(
                    RejectCode::DuplicateKey,
                    pointer,
                    format!("duplicate key {:?}", truncate(&key, 32)),
                ));
            }
            let value = {
                let path = Path {
                    seg: Some(Seg::Key(&key)),
                    parent: Some(&self.path),
                };
                map.next_value_seed(JsonSeed {
                    depth: self.depth + 1,
                    limits: self.limits,
                    path,
                    failure: self.failure,
                })?
            };
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// Decodes a text frame's JSON, strictly.
pub fn decode_json(bytes: &[u8], limits: DecodeLimits) -> Result<Value, Rejection> {
    check_json_integers(bytes)?;
    let failure = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let seed = JsonSeed {
        depth: 0,
        limits,
        path: Path::ROOT,
        failure: &failure,
    };
    let value = match seed.deserialize(&mut de) {
        Ok(v) => v,
        Err(e) => {
            return Err(failure.take().unwrap_or_else(|| {
                Rejection::new(RejectCode::Malformed, "", format!("not valid JSON: {e}"))
            }))
        }
    };
    de.end()
        .map_err(|_| Rejection::new(RejectCode::TrailingData, "", "bytes after the JSON value"))?;
    Ok(value)
}

// ---------------------------------------------------------------- CBOR

struct Cbor<'b> {
    decoder: Decoder<&'b [u8]>,
    len: usize,
    limits: DecodeLimits,
    /// Scratch space for text and byte-string chunks, allocated once per frame.
    scratch: [u8; 256],
}

fn cbor_err(offset: usize) -> Rejection {
    Rejection::new(
        RejectCode::Malformed,
        "",
        format!("not valid CBOR (at byte {offset})"),
    )
}

impl<'b> Cbor<'b> {
    fn remaining(&mut self) -> usize {
        self.len.saturating_sub(self.decoder.offset())
    }

    fn pull(&mut self) -> Result<Header, Rejection> {
        let offset = self.decoder.offset();
        self.decoder.pull().map_err(|_| cbor_err(offset))
    }

    /// Refuses a declared length whose content cannot fit in the bytes left (each array item
    /// and each map key or value takes at least one byte), before anything is allocated.
    fn fits(
        &mut self,
        declared: Option<usize>,
        needed_bytes: Option<usize>,
        path: &Path<'_>,
        what: &str,
        unit: &str,
    ) -> Result<(), Rejection> {
        match (declared, needed_bytes) {
            (Some(n), Some(needed)) if needed > self.remaining() => Err(Rejection::new(
                RejectCode::LengthExceedsFrame,
                path.pointer(),
                format!(
                    "{what} of {n} {unit} declared in a frame with {} bytes left",
                    self.remaining()
                ),
            )),
            _ => Ok(()),
        }
    }

    fn text(&mut self, len: Option<usize>, path: &Path<'_>) -> Result<String, Rejection> {
        self.fits(len, len, path, "text", "bytes")?;
        let offset = self.decoder.offset();
        let mut out = String::with_capacity(len.unwrap_or(0));
        let mut segments = self.decoder.text(len);
        while let Some(mut segment) = segments.pull().map_err(|_| cbor_err(offset))? {
            while let Some(chunk) = segment
                .pull(&mut self.scratch)
                .map_err(|_| cbor_err(offset))?
            {
                out.push_str(chunk);
            }
        }
        Ok(out)
    }

    fn bytes(&mut self, len: Option<usize>, path: &Path<'_>) -> Result<Vec<u8>, Rejection> {
        self.fits(len, len, path, "byte string", "bytes")?;
        let offset = self.decoder.offset();
        let mut out = Vec::with_capacity(len.unwrap_or(0));
        let mut segments = self.decoder.bytes(len);
        while let Some(mut segment) = segments.pull().map_err(|_| cbor_err(offset))? {
            while let Some(chunk) = segment
                .pull(&mut self.scratch)
                .map_err(|_| cbor_err(offset))?
            {
                out.extend_from_slice(chunk);
            }
        }
        Ok(out)
    }

    /// Decodes one item whose header was already pulled.
    fn item(&mut self, header: Header, depth: usize, path: &Path<'_>) -> Result<Value, Rejection> {
        match header {
            Header::Positive(n) => Ok(Value::from(n)),
            Header::Negative(n) => {
                // The value is -1 - n.
                match i64::try_from(n) {
                    Ok(n) => Ok(Value::from(-1 - n)),
                    Err(_) => Err(Rejection::new(
                        RejectCode::IntegerOutOfRange,
                        path.pointer(),
                        "negative integer below -2^63",
                    )),
                }
            }
            Header::Float(f) => serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| {
                    Rejection::new(
                        RejectCode::NonFiniteNumber,
                        path.pointer(),
                        "NaN or Infinity",
                    )
                }),
            Header::Simple(ciborium_ll::simple::FALSE) => Ok(Value::Bool(false)),
            Header::Simple(ciborium_ll::simple::TRUE) => Ok(Value::Bool(true)),
            Header::Simple(ciborium_ll::simple::NULL) => Ok(Value::Null),
            Header::Simple(s) => Err(Rejection::new(
                RejectCode::UnsupportedSimpleValue,
                path.pointer(),
                format!("CBOR simple value {s} (undefined or unassigned) has no JSON equivalent"),
            )),
            Header::Tag(t) => Err(Rejection::new(
                RejectCode::UnsupportedTag,
                path.pointer(),
                format!("CBOR tag {t} is not supported"),
            )),
            Header::Break => Err(cbor_err(self.decoder.offset())),
            Header::Text(len) => self.text(len, path).map(Value::String),
            Header::Bytes(len) => {
                let bytes = self.bytes(len, path)?;
                Ok(Value::String(
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
                ))
            }
            Header::Array(len) => {
                if depth >= self.limits.max_depth {
                    return Err(Rejection::new(
                        RejectCode::TooDeep,
                        path.pointer(),
                        format!("nesting deeper than {}", self.limits.max_depth),
                    ));
                }
                self.fits(len, len, path, "array", "items")?;
                let mut out = Vec::with_capacity(len.unwrap_or(0));
                loop {
                    if len.is_some_and(|n| out.len() == n) {
                        break;
                    }
                    let header = self.pull()?;
                    if len.is_none() && header == Header::Break {
                        break;
                    }
                    let child = Path {
                        seg: Some(Seg::Index(out.len())),
                        parent: Some(path),
                    };
                    out.push(self.item(header, depth + 1, &child)?);
                }
                Ok(Value::Array(out))
            }
            Header::Map(len) => {
                if depth >= self.limits.max_depth {
                    return Err(Rejection::new(
                        RejectCode::TooDeep,
                        path.pointer(),
                        format!("nesting deeper than {}", self.limits.max_depth),
                    ));
                }
                self.fits(
                    len,
                    len.map(|n| n.saturating_mul(2)),
                    path,
                    "map",
                    "entries",
                )?;
                let mut out = Map::new();
                let mut count = 0usize;
                loop {
                    if len.is_some_and(|n| count == n) {
                        break;
                    }
                    let header = self.pull()?;
                    if len.is_none() && header == Header::Break {
                        break;
                    }
                    let key = match header {
                        Header::Text(l) => self.text(l, path)?,
                        _ => {
                            return Err(Rejection::new(
                                RejectCode::NonTextKey,
                                path.pointer(),
                                "map keys must be text strings",
                            ))
                        }
                    };
                    if out.contains_key(&key) {
                        let p = Path {
                            seg: Some(Seg::Key(&key)),
                            parent: Some(path),
                        };
                        return Err(Rejection::new(
                            RejectCode::DuplicateKey,
                            p.pointer(),
                            format!("duplicate key {:?}", truncate(&key, 32)),
                        ));
                    }
                    let value = {
                        let child = Path {
                            seg: Some(Seg::Key(&key)),
                            parent: Some(path),
                        };
                        let header = self.pull()?;
                        if header == Header::Break {
                            return Err(cbor_err(self.decoder.offset()));
                        }
                        self.item(header, depth + 1, &child)?
                    };
                    out.insert(key, value);
                    count += 1;
                }
                Ok(Value::Object(out))
            }
        }
    }
}

/// Decodes a binary frame's CBOR into the JSON data model, strictly.
pub fn decode_cbor(bytes: &[u8], limits: DecodeLimits) -> Result<Value, Rejection> {
    let mut cbor = Cbor {
        decoder: Decoder::from(bytes),
        len: bytes.len(),
        limits,
        scratch: [0; 256],
    };
    let mut header = cbor.pull()?;
    if header == Header::Tag(SELF_DESCRIBE_TAG) {
        header = cbor.pull()?;
    }
    let value = cbor.item(header, 0, &Path::ROOT)?;
    if cbor.decoder.offset() != bytes.len() {
        return Err(Rejection::new(
            RejectCode::TrailingData,
            "",
            format!(
                "{} bytes after the CBOR item",
                bytes.len() - cbor.decoder.offset()
            ),
        ));
    }
    Ok(value)
}

/// Decodes a frame in `encoding` and checks the reserved key.
pub fn decode(encoding: Encoding, bytes: &[u8], limits: DecodeLimits) -> Result<Value, Rejection> {
    let value = match encoding {
        Encoding::Json => decode_json(bytes, limits)?,
        Encoding::Cbor => decode_cbor(bytes, limits)?,
    };
    if value.get(RESERVED_KEY).is_some() {
        return Err(Rejection::new(
            RejectCode::ReservedKey,
            format!("/{RESERVED_KEY}"),
            format!("the top-level key {RESERVED_KEY:?} is reserved for the gateway"),
        ));
    }
    Ok(value)
}

/// The frame's own `id`: a top-level string (at most [`MAX_ECHOED_ID_BYTES`]) or unsigned
/// integer.
pub fn frame_id(value: &Value) -> Option<Value> {
    match value.get("id")? {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_ECHOED_ID_BYTES => {
            Some(Value::String(s.clone()))
        }
        Value::Number(n) if n.is_u64() => Some(Value::Number(n.clone())),
        _ => None,
    }
}

/// The error frame for a rejection, in `encoding`:
/// `{"$gatehouse":"error","code":..,"pointer":..,"message":..,"id":..}` (`id` only when the
/// refused frame had one).
pub fn error_frame(encoding: Encoding, rejection: &Rejection) -> Vec<u8> {
    let mut map = Map::new();
    map.insert(RESERVED_KEY.into(), Value::String("error".into()));
    map.insert("code".into(), Value::String(rejection.code.as_str().into()));
    map.insert("pointer".into(), Value::String(rejection.pointer.clone()));
    map.insert("message".into(), Value::String(rejection.message.clone()));
    if let Some(id) = &rejection.id {
        map.insert("id".into(), id.clone());
    }
    let value = Value::Object(map);
    match encoding {
        Encoding::Json => serde_json::to_vec(&value).unwrap_or_default(),
        Encoding::Cbor => {
            let mut out = Vec::new();
            // Writing a JSON value to a Vec cannot fail.
            let _ = ciborium::into_writer(&value, &mut out);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const LIMITS: DecodeLimits = DecodeLimits { max_depth: 8 };

    fn cbor(v: &ciborium::Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    fn code_json(text: &str) -> RejectCode {
        decode(Encoding::Json, text.as_bytes(), LIMITS)
            .unwrap_err()
            .code
    }

    #[test]
    fn json_accepts_plain_documents() {
        let v = decode_json(
            br#"{"a":[1,-2,3.5,"x",true,null],"b":{"c":18446744073709551615}}"#,
            LIMITS,
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"a":[1,-2,3.5,"x",true,null],"b":{"c":18446744073709551615u64}})
        );
        assert_eq!(decode_json(b" {} \n", LIMITS).unwrap(), json!({}));
        assert_eq!(
            decode_json(br#""\"1234567890123456789012\"""#, LIMITS).unwrap(),
            json!("\"1234567890123456789012\"")
        );
    }

    #[test]
    fn json_refusals() {
        assert_eq!(code_json(r#"{"a":1}x"#), RejectCode::TrailingData);
        assert_eq!(code_json(r#"{"a":1}{"a":2}"#), RejectCode::TrailingData);
        assert_eq!(code_json(r#"{"a":1,"a":2}"#), RejectCode::DuplicateKey);
        assert_eq!(
            code_json(r#"{"a":123456789012345678901234}"#),
            RejectCode::IntegerOutOfRange
        );
        assert_eq!(
            code_json(r#"[-9223372036854775809]"#),
            RejectCode::IntegerOutOfRange
        );
        assert_eq!(code_json(r#"[[[[[[[[[1]]]]]]]]]"#), RejectCode::TooDeep);
        assert_eq!(code_json(r#"{"a":"#), RejectCode::Malformed);
        assert_eq!(code_json(r#"NaN"#), RejectCode::Malformed);
        assert_eq!(
            code_json(r#"{"$gatehouse":"error"}"#),
            RejectCode::ReservedKey
        );
        let r = decode_json(br#"{"x":{"y/z":[0,{"k":1,"k":2}]}}"#, LIMITS).unwrap_err();
        assert_eq!(
            (r.code, r.pointer.as_str()),
            (RejectCode::DuplicateKey, "/x/y~1z/1/k")
        );
        // Floats stay allowed; only integer literals must fit.
        assert!(decode_json(b"[1e300, 1.5e-300, 123456789012345678901234.0]", LIMITS).is_ok());
    }

    #[test]
    fn cbor_maps_onto_the_json_model() {
        use ciborium::Value as C;
        let v = C::Map(vec![
            (C::Text("t".into()), C::Float(21.5)),
            (C::Text("n".into()), C::Integer((-5).into())),
            (C::Text("u".into()), C::Integer(u64::MAX.into())),
            (C::Text("b".into()), C::Bytes(vec![0xfb, 0xff])),
            (C::Text("a".into()), C::Array(vec![C::Bool(true), C::Null])),
        ]);
        assert_eq!(
            decode_cbor(&cbor(&v), LIMITS).unwrap(),
            json!({"t":21.5,"n":-5,"u":u64::MAX,"b":"-_8","a":[true,null]})
        );
        // Self-describe tag at the top is fine.
        let mut tagged = vec![0xd9, 0xd9, 0xf7];
        tagged.extend(cbor(&C::Integer(1.into())));
        assert_eq!(decode_cbor(&tagged, LIMITS).unwrap(), json!(1));
        // Indefinite-length text and map.
        let indefinite = [0xbf, 0x61, b'k', 0x7f, 0x61, b'a', 0x61, b'b', 0xff, 0xff];
        assert_eq!(decode_cbor(&indefinite, LIMITS).unwrap(), json!({"k":"ab"}));
    }

    #[test]
    fn cbor_refusals() {
        use ciborium::Value as C;
        let code = |bytes: &[u8]| decode(Encoding::Cbor, bytes, LIMITS).unwrap_err().code;
        let mut trailing = cbor(&C::Integer(1.into()));
        trailing.push(0x00);
        assert_eq!(code(&trailing), RejectCode::TrailingData);
        assert_eq!(
            code(&[0xa2, 0x61, b'a', 0x01, 0x61, b'a', 0x02]),
            RejectCode::DuplicateKey
        );
        assert_eq!(
            code(&cbor(&C::Map(vec![(C::Integer(1.into()), C::Null)]))),
            RejectCode::NonTextKey
        );
        assert_eq!(
            code(&cbor(&C::Tag(1, Box::new(C::Integer(0.into()))))),
            RejectCode::UnsupportedTag
        );
        assert_eq!(
            code(&cbor(&C::Float(f64::NAN))),
            RejectCode::NonFiniteNumber
        );
        assert_eq!(
            code(&cbor(&C::Float(f64::INFINITY))),
            RejectCode::NonFiniteNumber
        );
        assert_eq!(code(&[0xf7]), RejectCode::UnsupportedSimpleValue); // undefined
        assert_eq!(
            code(&[0x3b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            RejectCode::IntegerOutOfRange
        );
        // A 14-byte frame claiming a 2^32-byte text or a 2^32-item array allocates nothing.
        assert_eq!(
            code(&[0x7a, 0xff, 0xff, 0xff, 0xff, b'a']),
            RejectCode::LengthExceedsFrame
        );
        assert_eq!(
            code(&[0x9a, 0xff, 0xff, 0xff, 0xff, 0x01]),
            RejectCode::LengthExceedsFrame
        );
        assert_eq!(
            code(&[0xba, 0x00, 0x01, 0x00, 0x00, 0x01]),
            RejectCode::LengthExceedsFrame
        );
        assert_eq!(code(&[0x81; 20]), RejectCode::TooDeep);
        assert_eq!(code(&[0x9f; 20]), RejectCode::TooDeep);
        assert_eq!(code(&[]), RejectCode::Malformed);
        assert_eq!(code(&[0x62, 0xff, 0xfe]), RejectCode::Malformed); // invalid UTF-8
        assert_eq!(code(&[0xff]), RejectCode::Malformed); // lone break
        let r = decode_cbor(
            &cbor(&C::Map(vec![(
                C::Text("a".into()),
                C::Array(vec![C::Null, C::Tag(2, Box::new(C::Null))]),
            )])),
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(
            (r.code, r.pointer.as_str()),
            (RejectCode::UnsupportedTag, "/a/1")
        );
    }

    #[test]
    fn error_frames_in_both_encodings() {
        let mut r = Rejection::new(RejectCode::SchemaViolation, "/t", "21 is less than 30");
        r.id = Some(json!(7));
        let j: Value = serde_json::from_slice(&error_frame(Encoding::Json, &r)).unwrap();
        assert_eq!(
            j,
            json!({"$gatehouse":"error","code":"schema-violation","pointer":"/t","message":"21 is less than 30","id":7})
        );
        let c: Value = ciborium::from_reader(error_frame(Encoding::Cbor, &r).as_slice()).unwrap();
        assert_eq!(c, j);
        assert_eq!(frame_id(&json!({"id":"abc"})), Some(json!("abc")));
        assert_eq!(frame_id(&json!({"id":-1})), None);
        assert_eq!(frame_id(&json!({"id":"x".repeat(200)})), None);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "[a-z0-9 ]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z]{1,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn json_round_trips(v in arb_json()) {
            let text = serde_json::to_vec(&v).unwrap();
            prop_assert_eq!(decode_json(&text, LIMITS).unwrap(), v);
        }

        #[test]
        fn cbor_round_trips(v in arb_json()) {
            let mut bytes = Vec::new();
            ciborium::into_writer(&v, &mut bytes).unwrap();
            prop_assert_eq!(decode_cbor(&bytes, LIMITS).unwrap(), v);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(Encoding::Json, &bytes, LIMITS);
            let _ = decode(Encoding::Cbor, &bytes, LIMITS);
        }

        #[test]
        fn mutated_cbor_never_panics(v in arb_json(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
            let mut bytes = Vec::new();
            ciborium::into_writer(&v, &mut bytes).unwrap();
            for (i, b) in flips {
                let n = bytes.len();
                bytes[i % n] ^= b;
            }
            let _ = decode(Encoding::Cbor, &bytes, LIMITS);
        }
    }
}
