//! Arbitrary JSON for the file-format targets: a small tree of any shape ([`AnyJson`]), and
//! strings and numbers drawn mostly from pools of values the parsers accept
//! ([`Text`], [`Number`]), so structured inputs get past the first check.

use arbitrary::{Arbitrary, Unstructured};
use serde_json::{Map, Value};

/// Deepest nesting of an [`AnyJson`].
const MAX_DEPTH: u32 = 4;
/// Most members of one array or object of an [`AnyJson`].
const MAX_MEMBERS: usize = 4;

/// Any JSON value, at most [`MAX_DEPTH`] deep.
#[derive(Debug, Clone, PartialEq)]
pub struct AnyJson(pub Value);

impl<'a> Arbitrary<'a> for AnyJson {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        any_value(u, 0).map(AnyJson)
    }
}

fn any_value(u: &mut Unstructured<'_>, depth: u32) -> arbitrary::Result<Value> {
    let choices = if depth >= MAX_DEPTH { 5 } else { 7 };
    Ok(match u.choose_index(choices)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Number::arbitrary(u)?.0,
        3 => Value::String(Text::arbitrary(u)?.0),
        4 => Value::String(u.arbitrary()?),
        5 => {
            let n = u.int_in_range(0..=MAX_MEMBERS)?;
            Value::Array(
                (0..n)
                    .map(|_| any_value(u, depth + 1))
                    .collect::<arbitrary::Result<_>>()?,
            )
        }
        _ => {
            let n = u.int_in_range(0..=MAX_MEMBERS)?;
            let mut map = Map::new();
            for _ in 0..n {
                map.insert(Text::arbitrary(u)?.0, any_value(u, depth + 1)?);
            }
            Value::Object(map)
        }
    })
}

/// Strings the formats use: names, paths, sizes, addresses, tags; sometimes anything.
const STRINGS: &[&str] = &[
    "",
    "a",
    "web",
    "db-1",
    "data",
    "/",
    "/data",
    "/data/db",
    "/data/../etc",
    "/dev/x",
    "/proc",
    "relative/path",
    "//double",
    "/data/",
    "ext4",
    "xfs",
    "btrfs",
    "until-shutdown",
    "processes",
    "stdout",
    "off",
    "file=/tmp/console.log",
    "file=",
    "512M",
    "1G",
    "4096",
    "0",
    "1k",
    "18446744073709551615",
    "99999999999999999999T",
    "-1",
    "0x10",
    "1.5G",
    "SN0001",
    " SN",
    "tag0",
    "0000:00:04.0",
    "0000:00:1f.7",
    "ff:ff.f",
    "52:54:00:12:34:56",
    "ff:ff:ff:ff:ff:ff",
    "tap0",
    "tapnameoverfifteenbytes",
    "PATH=/bin",
    "NOEQUALS",
    "sh",
    "-c",
    "é",
    "a\u{0}b",
];

/// A string: from [`STRINGS`], a repetition of one of them, or any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl<'a> Arbitrary<'a> for Text {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Text(match u.choose_index(8)? {
            0 => u.arbitrary()?,
            1 => u.choose(STRINGS)?.repeat(u.int_in_range(2..=40)?),
            _ => u.choose(STRINGS)?.to_string(),
        }))
    }
}

/// A number: small, on a limit, or any (negative and fractional included).
#[derive(Debug, Clone, PartialEq)]
pub struct Number(pub Value);

impl<'a> Arbitrary<'a> for Number {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        const EDGES: &[u64] = &[
            0,
            1,
            2,
            3,
            4,
            8,
            16,
            20,
            64,
            128,
            255,
            256,
            1024,
            65535,
            65536,
            0xffff_fffe,
            0xffff_ffff,
            1 << 32,
            u64::MAX,
        ];
        Ok(Number(match u.choose_index(6)? {
            0 => Value::from(u.arbitrary::<i64>()?),
            1 => serde_json::Number::from_f64(u.arbitrary()?)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            2 => Value::from(u.arbitrary::<u64>()?),
            _ => Value::from(*u.choose(EDGES)?),
        }))
    }
}

/// A field of a structured input: absent, a value of the pool, or any JSON at all.
#[derive(Debug, Clone, PartialEq, Arbitrary)]
pub enum Field<T> {
    Absent,
    Valid(T),
    Any(AnyJson),
}

impl<T: Into<Value>> Field<T> {
    /// Inserts the field into `map` under `key` unless absent.
    pub fn put(self, map: &mut Map<String, Value>, key: &str) {
        match self {
            Field::Absent => {}
            Field::Valid(v) => {
                map.insert(key.to_string(), v.into());
            }
            Field::Any(v) => {
                map.insert(key.to_string(), v.0);
            }
        }
    }
}

impl From<Text> for Value {
    fn from(t: Text) -> Value {
        Value::String(t.0)
    }
}

impl From<Number> for Value {
    fn from(n: Number) -> Value {
        n.0
    }
}

/// Serialized JSON, sometimes with a byte flipped or cut short, so the structured inputs
/// also reach the syntax errors next to valid documents.
#[derive(Debug, Clone, Arbitrary)]
pub enum Damage {
    None,
    Truncate(u16),
    Flip(u16, u8),
    Trailing(u8),
}

impl Damage {
    /// `value` as JSON bytes, damaged.
    pub fn apply(&self, value: &Value) -> Vec<u8> {
        let mut bytes = serde_json::to_vec(value).expect("a Value always serializes");
        match *self {
            Damage::None => {}
            Damage::Truncate(at) => bytes.truncate(usize::from(at) % (bytes.len() + 1)),
            Damage::Flip(at, xor) => {
                if !bytes.is_empty() {
                    let i = usize::from(at) % bytes.len();
                    bytes[i] ^= xor;
                }
            }
            Damage::Trailing(b) => bytes.push(b),
        }
        bytes
    }
}
