// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The restart policy of a vhost-user device: `vhost_user.restart`.

use super::*;

/// The longest backoff a policy may ask for: one hour.
pub const MAX_BACKOFF_MS: u64 = 3_600_000;

/// The backoff before the first restart when a policy leaves it out.
pub const DEFAULT_BACKOFF_MS: u64 = 100;

/// The longest backoff when a policy leaves it out.
pub const DEFAULT_MAX_BACKOFF_MS: u64 = 5_000;

/// What the fleet does when a vhost-user device fails (a contained panic,
/// or a shrunk memory file): `"never"` restart it (the default: it stays
/// stopped with its failure), or restart it on the same socket, at most
/// `limit` times in the run, after a backoff that doubles with each
/// restart up to its cap.
///
/// As JSON, `"never"` or `{ "limit", "backoff_ms?", "max_backoff_ms?" }`:
///
/// ```
/// use std::time::Duration;
/// use switchboard_devices::host::topology::RestartPolicy;
///
/// let p: RestartPolicy = serde_json::from_str(r#"{ "limit": 3, "backoff_ms": "100" }"#)?;
/// assert_eq!(p.limit(), 3);
/// assert_eq!(p.backoff(0), Duration::from_millis(100));
/// assert_eq!(p.backoff(2), Duration::from_millis(400));
/// assert_eq!(p.backoff(10), Duration::from_millis(5_000));
/// let never: RestartPolicy = serde_json::from_str(r#""never""#)?;
/// assert_eq!(never, RestartPolicy::Never);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    /// A failed device stays stopped.
    #[default]
    Never,
    /// A failed device is restarted, as limited here.
    Limited(RestartLimits),
}

/// How often, and how soon, a failed device is restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartLimits {
    /// Most restarts in the run (at least 1); a failure after the last one
    /// leaves the device stopped.
    #[serde(deserialize_with = "deserialize_num")]
    #[schemars(with = "Num<u64>")]
    pub limit: u64,
    /// Milliseconds from the failure to the first restart (default 100),
    /// doubled for each restart after it.
    #[serde(default = "default_backoff_ms", deserialize_with = "deserialize_num")]
    #[schemars(with = "Num<u64>")]
    pub backoff_ms: u64,
    /// The longest backoff, in milliseconds (default 5000; at least
    /// `backoff_ms`, at most one hour).
    #[serde(
        default = "default_max_backoff_ms",
        deserialize_with = "deserialize_num"
    )]
    #[schemars(with = "Num<u64>")]
    pub max_backoff_ms: u64,
}

fn default_backoff_ms() -> u64 {
    DEFAULT_BACKOFF_MS
}

fn default_max_backoff_ms() -> u64 {
    DEFAULT_MAX_BACKOFF_MS
}

impl RestartLimits {
    /// At most `limit` restarts, with the default backoff.
    pub fn new(limit: u64) -> Self {
        RestartLimits {
            limit,
            backoff_ms: DEFAULT_BACKOFF_MS,
            max_backoff_ms: DEFAULT_MAX_BACKOFF_MS,
        }
    }
}

impl RestartPolicy {
    /// Whether it never restarts (what serialization leaves out).
    pub fn is_never(&self) -> bool {
        *self == RestartPolicy::Never
    }

    /// Most restarts in the run (0 for `Never`).
    pub fn limit(&self) -> u64 {
        match self {
            RestartPolicy::Never => 0,
            RestartPolicy::Limited(l) => l.limit,
        }
    }

    /// The wait before restart number `done + 1`: `backoff_ms * 2^done`,
    /// at most `max_backoff_ms`.
    pub fn backoff(&self, done: u64) -> Duration {
        match self {
            RestartPolicy::Never => Duration::ZERO,
            RestartPolicy::Limited(l) => {
                let factor = 1u64.checked_shl(done.min(63) as u32).unwrap_or(u64::MAX);
                Duration::from_millis(l.backoff_ms.saturating_mul(factor).min(l.max_backoff_ms))
            }
        }
    }

    /// Checks the numbers: a limit of at least 1, a cap of at most
    /// [`MAX_BACKOFF_MS`] and not below the first backoff.
    ///
    /// ```
    /// use switchboard_devices::host::topology::{RestartLimits, RestartPolicy};
    ///
    /// let e = RestartPolicy::Limited(RestartLimits::new(0)).check();
    /// assert_eq!(e[0].field, "vhost_user.restart.limit");
    /// ```
    pub fn check(&self) -> Vec<Invalid> {
        let RestartPolicy::Limited(l) = self else {
            return Vec::new();
        };
        let mut errors = Vec::new();
        if l.limit == 0 {
            errors.push(Invalid::new(
                "vhost_user.restart.limit",
                "expected a limit of at least 1 restart (write `\"restart\": \"never\"` for \
                 none), found 0"
                    .into(),
            ));
        }
        if l.max_backoff_ms > MAX_BACKOFF_MS {
            errors.push(Invalid::new(
                "vhost_user.restart.max_backoff_ms",
                format!(
                    "expected at most {MAX_BACKOFF_MS} ms (one hour), found {}",
                    l.max_backoff_ms
                ),
            ));
        } else if l.backoff_ms > l.max_backoff_ms {
            errors.push(Invalid::new(
                "vhost_user.restart.backoff_ms",
                format!(
                    "expected at most `max_backoff_ms` ({} ms), found {}",
                    l.max_backoff_ms, l.backoff_ms
                ),
            ));
        }
        errors
    }
}

const NEVER: &str = "never";

impl Serialize for RestartPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            RestartPolicy::Never => s.serialize_str(NEVER),
            RestartPolicy::Limited(l) => l.serialize(s),
        }
    }
}

struct PolicyVisitor;

impl<'de> Visitor<'de> for PolicyVisitor {
    type Value = RestartPolicy;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"never\" or { \"limit\", \"backoff_ms\", \"max_backoff_ms\" }")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<RestartPolicy, E> {
        if v == NEVER {
            Ok(RestartPolicy::Never)
        } else {
            Err(E::invalid_value(Unexpected::Str(v), &self))
        }
    }

    fn visit_map<A: de::MapAccess<'de>>(
        self,
        map: A,
    ) -> std::result::Result<RestartPolicy, A::Error> {
        RestartLimits::deserialize(de::value::MapAccessDeserializer::new(map))
            .map(RestartPolicy::Limited)
    }
}

impl<'de> Deserialize<'de> for RestartPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(PolicyVisitor)
    }
}

impl JsonSchema for RestartPolicy {
    fn schema_name() -> Cow<'static, str> {
        "RestartPolicy".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let limits = generator.subschema_for::<RestartLimits>();
        json_schema!({
            "description": "What is done when the device fails: \"never\" restart it (the \
                default), or restart it on the same socket at most `limit` times, after a \
                backoff that doubles with each restart.",
            "anyOf": [
                { "type": "string", "const": NEVER },
                limits
            ]
        })
    }
}
