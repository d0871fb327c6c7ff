// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Ids and numbers: the serde visitors for ids and for numbers written as JSON numbers or strings.

use super::*;

pub(super) const ID_EXPECTED: &str =
    "an id: 1 to 64 ASCII letters, digits, '-', '_' or '.', starting with a letter or digit";

pub(super) fn valid_id(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && s.len() <= MAX_ID_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub(super) struct IdVisitor;

impl Visitor<'_> for IdVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(ID_EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<String, E> {
        if valid_id(v) {
            Ok(v.to_owned())
        } else {
            Err(E::invalid_value(Unexpected::Str(v), &self))
        }
    }
}

pub(super) fn deserialize_device_id<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<DeviceId, D::Error> {
    d.deserialize_str(IdVisitor).map(DeviceId::new)
}

pub(super) fn id_schema() -> Schema {
    json_schema!({
        "type": "string",
        "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
    })
}

/// The schema of a device id (the runtime's [`DeviceId`] knows no schemas).
pub(super) struct IdSchema;

impl JsonSchema for IdSchema {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Id".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        id_schema()
    }
}

/// The id of a bus in a topology (`pio0`, `mmio0`). Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct BusId(Arc<str>);

impl BusId {
    /// A bus id from its name.
    pub fn new(name: impl AsRef<str>) -> Self {
        BusId(Arc::from(name.as_ref()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BusId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for BusId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_str(IdVisitor).map(BusId::new)
    }
}

impl JsonSchema for BusId {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "BusId".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        id_schema()
    }
}

/// An unsigned integer type a topology number can be read into.
pub(super) trait Unsigned: Copy + TryFrom<u64> + Into<u64> {
    const MAX: u64;
    const EXPECTED: &'static str;
}

impl Unsigned for u8 {
    const MAX: u64 = u8::MAX as u64;
    const EXPECTED: &'static str = "an integer from 0 to 255 (a JSON number, \
        or a string of decimal digits or of 0x and hex digits)";
}

impl Unsigned for u16 {
    const MAX: u64 = u16::MAX as u64;
    const EXPECTED: &'static str = "an integer from 0 to 65535 (a JSON number, \
        or a string of decimal digits or of 0x and hex digits)";
}

impl Unsigned for u64 {
    const MAX: u64 = u64::MAX;
    const EXPECTED: &'static str = "an integer from 0 to 2^64-1 (a JSON number, \
        or a string of decimal digits or of 0x and hex digits)";
}

/// A number written as a JSON number or as a decimal or `0x` hex string.
pub(super) struct Num<T>(pub(super) T);

pub(super) struct NumVisitor<T>(pub(super) PhantomData<T>);

/// Reads `1016` or `0x3f8`; nothing else (no sign, no spaces, no `_`).
pub(crate) fn parse_unsigned(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        None => None,
    }
}

impl<T: Unsigned> Visitor<'_> for NumVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTED)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<T, E> {
        T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<T, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<T, E> {
        Err(E::invalid_type(Unexpected::Float(v), &self))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<T, E> {
        parse_unsigned(v)
            .and_then(|n| T::try_from(n).ok())
            .ok_or_else(|| E::invalid_value(Unexpected::Str(v), &self))
    }
}

impl<'de, T: Unsigned> Deserialize<'de> for Num<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(NumVisitor(PhantomData)).map(Num)
    }
}

impl<T: Unsigned> Serialize for Num<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u64(self.0.into())
    }
}

impl<T: Unsigned> JsonSchema for Num<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Number".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "anyOf": [
                { "type": "integer", "minimum": 0, "maximum": T::MAX },
                { "type": "string", "pattern": "^(0[xX][0-9a-fA-F]+|[0-9]+)$" }
            ]
        })
    }
}

pub(super) fn deserialize_num<'de, D: Deserializer<'de>, T: Unsigned>(
    d: D,
) -> std::result::Result<T, D::Error> {
    Num::<T>::deserialize(d).map(|n| n.0)
}

pub(super) fn deserialize_opt_num<'de, D: Deserializer<'de>, T: Unsigned>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    Option::<Num<T>>::deserialize(d).map(|n| n.map(|n| n.0))
}

pub(super) fn deserialize_addr<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<BusAddr, D::Error> {
    deserialize_num::<D, u64>(d).map(BusAddr)
}

pub(super) fn default_queues() -> u16 {
    1
}
