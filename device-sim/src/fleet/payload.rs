//! Telemetry that fits a device type's schema: a generator built from the type's
//! `telemetry.schema.json` (the JSON Schema subset device schemas use: `type`, `const`,
//! `enum`, `properties`/`required`, numeric bounds, string lengths, arrays, `anyOf`/`oneOf`
//! first branch), checked against the schema itself when it is built, so a schema the
//! generator cannot satisfy is a clear error before any device connects. Also makes invalid
//! frames (each one checked to be refused by the schema) for a configurable share, and pads
//! frames to a requested size through a free-form string property.
//!
//! Two property names have a meaning: `seq` (integer) is the device's frame counter and `ts`
//! (integer) the send time in milliseconds since the Unix epoch, which the sample ingest
//! backend turns into end-to-end latency.

use std::path::Path;

use serde_json::{Map, Number, Value};

/// How frames go on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// JSON in text frames.
    Json,
    /// CBOR in binary frames.
    Cbor,
    /// Half of each, chosen per frame.
    Mix,
}

impl std::str::FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "json" => Ok(Encoding::Json),
            "cbor" => Ok(Encoding::Cbor),
            "mix" => Ok(Encoding::Mix),
            other => Err(format!("unknown encoding {other:?} (json, cbor or mix)")),
        }
    }
}

/// One device type's frame generator.
pub struct Generator {
    schema: Value,
    validator: jsonschema::Validator,
    /// The property used for padding, if the schema has a free-form string one.
    pad: Option<String>,
}

/// A frame ready to send.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

impl Frame {
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(t) => t.len(),
            Frame::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GeneratorError {
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
    #[error("schema does not compile: {0}")]
    Compile(String),
    #[error("the generator cannot produce a frame this schema accepts: {0}")]
    Unsatisfiable(String),
}

/// What a frame carries besides the generated values.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    pub seq: u64,
    pub ts_ms: i64,
}

impl Generator {
    /// Reads `<schemas>/<device_type>/telemetry.schema.json`.
    pub fn load(schemas: &Path, device_type: &str) -> Result<Self, GeneratorError> {
        let path = schemas.join(device_type).join("telemetry.schema.json");
        let read_err = |reason: String| GeneratorError::Read {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| read_err(e.to_string()))?;
        let schema: Value = serde_json::from_str(&text).map_err(|e| read_err(e.to_string()))?;
        Self::new(schema)
    }

    pub fn new(schema: Value) -> Result<Self, GeneratorError> {
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| GeneratorError::Compile(e.to_string()))?;
        let pad = pad_property(&schema);
        let generator = Self {
            schema,
            validator,
            pad,
        };
        // Prove it on a spread of seeds before any device depends on it.
        let mut rng = fastrand::Rng::with_seed(0);
        for seq in 0..32 {
            let v = generator.value(&mut rng, Stamp { seq, ts_ms: 0 });
            let problem = generator
                .validator
                .iter_errors(&v)
                .next()
                .map(|e| format!("{e} at {} in {v}", e.instance_path()));
            if let Some(problem) = problem {
                return Err(GeneratorError::Unsatisfiable(problem));
            }
        }
        Ok(generator)
    }

    /// A value the schema accepts.
    pub fn value(&self, rng: &mut fastrand::Rng, stamp: Stamp) -> Value {
        generate(&self.schema, rng, stamp, None)
    }

    /// A value the schema refuses: without a required property, out of a numeric range, or
    /// of the wrong type altogether (the first of those the schema actually refuses).
    pub fn invalid_value(&self, rng: &mut fastrand::Rng, stamp: Stamp) -> Value {
        let valid = self.value(rng, stamp);
        let mut candidates = Vec::new();
        if let (Value::Object(map), Some(Value::Array(required))) =
            (&valid, self.schema.get("required"))
        {
            for name in required.iter().filter_map(Value::as_str) {
                let mut m = map.clone();
                m.remove(name);
                candidates.push(Value::Object(m));
            }
            if let Some(Value::Object(props)) = self.schema.get("properties") {
                for (name, prop) in props {
                    if let Some(max) = prop.get("maximum").and_then(Value::as_f64) {
                        let mut m = map.clone();
                        m.insert(name.clone(), number(max + 1000.0, true));
                        candidates.push(Value::Object(m));
                    }
                }
            }
        }
        candidates.push(Value::String("not a reading".into()));
        candidates.push(Value::Array(vec![]));
        let start = rng.usize(..candidates.len());
        (0..candidates.len())
            .map(|i| &candidates[(start + i) % candidates.len()])
            .find(|c| !self.validator.is_valid(c))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// A frame the schema accepts (or refuses, with `invalid`), padded towards `size` bytes
    /// when the schema has a free-form string property, encoded as asked.
    pub fn frame(
        &self,
        rng: &mut fastrand::Rng,
        stamp: Stamp,
        encoding: Encoding,
        invalid: bool,
        size: Option<usize>,
    ) -> Frame {
        let mut value = if invalid {
            self.invalid_value(rng, stamp)
        } else {
            self.value(rng, stamp)
        };
        let binary = match encoding {
            Encoding::Json => false,
            Encoding::Cbor => true,
            Encoding::Mix => rng.bool(),
        };
        if let (Some(size), Some(pad), Value::Object(map)) = (size, &self.pad, &mut value) {
            let bare = encode(&Value::Object(map.clone()), binary).len();
            // The padding property's name, quotes and separators (JSON), or its header (CBOR).
            let overhead = pad.len() + if binary { 4 } else { 6 };
            if size > bare + overhead {
                map.insert(
                    pad.clone(),
                    Value::String("x".repeat(size - bare - overhead)),
                );
            }
        }
        encode(&value, binary)
    }
}

fn encode(value: &Value, binary: bool) -> Frame {
    if binary {
        let mut out = Vec::with_capacity(128);
        ciborium::into_writer(value, &mut out).expect("a JSON value always encodes as CBOR");
        Frame::Binary(out)
    } else {
        Frame::Text(value.to_string())
    }
}

/// A top-level optional property that takes any string of any length.
fn pad_property(schema: &Value) -> Option<String> {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let props = schema.get("properties")?.as_object()?;
    props
        .iter()
        .find(|(name, p)| {
            !required.contains(&name.as_str())
                && types(p).contains(&"string")
                && p.get("maxLength").is_none()
                && p.get("pattern").is_none()
                && p.get("enum").is_none()
                && p.get("const").is_none()
                && p.get("format").is_none()
        })
        .map(|(name, _)| name.clone())
}

fn types(schema: &Value) -> Vec<&str> {
    match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn number(x: f64, integer: bool) -> Value {
    if integer {
        Value::Number(Number::from(x.round() as i64))
    } else {
        Number::from_f64((x * 10.0).round() / 10.0)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

fn generate(schema: &Value, rng: &mut fastrand::Rng, stamp: Stamp, name: Option<&str>) -> Value {
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    if let Some(Value::Array(options)) = schema.get("enum") {
        if !options.is_empty() {
            return options[rng.usize(..options.len())].clone();
        }
    }
    for combinator in ["anyOf", "oneOf"] {
        if let Some(Value::Array(branches)) = schema.get(combinator) {
            if let Some(first) = branches.first() {
                return generate(first, rng, stamp, name);
            }
        }
    }
    let ty = types(schema)
        .first()
        .copied()
        .unwrap_or(if schema.get("properties").is_some() {
            "object"
        } else {
            "null"
        });
    match ty {
        "object" => {
            let mut out = Map::new();
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(Value::Object(props)) = schema.get("properties") {
                for (key, prop) in props {
                    if required.contains(&key.as_str()) {
                        out.insert(key.clone(), generate(prop, rng, stamp, Some(key)));
                    }
                }
            }
            Value::Object(out)
        }
        "integer" | "number" => {
            let integer = ty == "integer";
            match (name, integer) {
                (Some("seq"), true) => return Value::from(stamp.seq),
                (Some("ts"), true) => return Value::from(stamp.ts_ms),
                _ => {}
            }
            let bound = |k: &str| schema.get(k).and_then(Value::as_f64);
            let lo = bound("minimum")
                .or(bound("exclusiveMinimum").map(|x| x + 1.0))
                .unwrap_or(0.0);
            let hi = bound("maximum")
                .or(bound("exclusiveMaximum").map(|x| x - 1.0))
                .unwrap_or(lo + 100.0)
                .max(lo);
            let x = if integer {
                let (lo, hi) = (lo.ceil() as i64, hi.floor() as i64);
                return Value::from(if hi >= lo { rng.i64(lo..=hi) } else { lo });
            } else {
                lo + rng.f64() * (hi - lo)
            };
            let v = number(x, false);
            // Rounding to one decimal can step over a bound; clamp back inside.
            match v.as_f64() {
                Some(r) if r < lo || r > hi => number(lo, false),
                _ => v,
            }
        }
        "boolean" => Value::Bool(rng.bool()),
        "string" => {
            let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(1) as usize;
            let max = schema
                .get("maxLength")
                .and_then(Value::as_u64)
                .map(|m| m as usize)
                .unwrap_or(min.max(8));
            let len = if max > min { rng.usize(min..=max) } else { min };
            Value::String((0..len).map(|_| rng.alphanumeric()).collect())
        }
        "array" => {
            let min = schema.get("minItems").and_then(Value::as_u64).unwrap_or(0) as usize;
            let items = schema.get("items").cloned().unwrap_or(Value::Null);
            Value::Array(
                (0..min.max(1))
                    .map(|_| generate(&items, rng, stamp, None))
                    .collect(),
            )
        }
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(device_type: &str) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../schemas")
            .join(device_type)
            .join("telemetry.schema.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn decode(frame: &Frame) -> Value {
        match frame {
            Frame::Text(t) => serde_json::from_str(t).unwrap(),
            Frame::Binary(b) => ciborium::from_reader(b.as_slice()).unwrap(),
        }
    }

    #[test]
    fn every_generated_frame_fits_the_shipped_schemas_in_both_encodings() {
        for ty in ["env-sensor", "door-lock"] {
            let s = schema(ty);
            let validator = jsonschema::validator_for(&s).unwrap();
            let g = Generator::new(s).unwrap();
            let mut rng = fastrand::Rng::with_seed(42);
            let mut binary = 0;
            for seq in 0..2000 {
                let stamp = Stamp {
                    seq,
                    ts_ms: 1_700_000_000_000 + seq as i64,
                };
                let frame = g.frame(&mut rng, stamp, Encoding::Mix, false, None);
                binary += matches!(frame, Frame::Binary(_)) as u32;
                let v = decode(&frame);
                assert!(validator.is_valid(&v), "{ty}: {v}");
                assert_eq!(v["seq"], seq);
                assert_eq!(v["ts"], stamp.ts_ms);
            }
            assert!((800..1200).contains(&binary), "{binary} binary of 2000");
        }
    }

    #[test]
    fn invalid_frames_are_refused_by_the_schema() {
        let s = schema("env-sensor");
        let validator = jsonschema::validator_for(&s).unwrap();
        let g = Generator::new(s).unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        for seq in 0..500 {
            let f = g.frame(
                &mut rng,
                Stamp { seq, ts_ms: 1 },
                Encoding::Cbor,
                true,
                None,
            );
            assert!(!validator.is_valid(&decode(&f)));
        }
    }

    #[test]
    fn frames_are_padded_to_the_requested_size_and_stay_valid() {
        let s = schema("env-sensor");
        let validator = jsonschema::validator_for(&s).unwrap();
        let g = Generator::new(s).unwrap();
        let mut rng = fastrand::Rng::with_seed(9);
        for encoding in [Encoding::Json, Encoding::Cbor] {
            for seq in 0..200 {
                let stamp = Stamp {
                    seq,
                    ts_ms: 1_733_000_000_000,
                };
                let f = g.frame(&mut rng, stamp, encoding, false, Some(200));
                assert!((196..=204).contains(&f.len()), "{encoding:?}: {}", f.len());
                assert!(validator.is_valid(&decode(&f)));
            }
        }
    }

    #[test]
    fn a_schema_the_generator_cannot_satisfy_is_refused_with_the_reason() {
        let s = serde_json::json!({
            "type": "object",
            "required": ["code"],
            "properties": { "code": { "type": "string", "pattern": "^[0-9]{6}$" } }
        });
        let e = Generator::new(s).err().expect("refused").to_string();
        assert!(e.contains("cannot produce"), "{e}");
    }
}
