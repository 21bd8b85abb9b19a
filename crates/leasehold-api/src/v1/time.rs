//! Durations and times as readable strings: `"1m 30s"`, `"forever"`,
//! `"2026-01-02T03:04:05.678Z"`.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration, as humantime writes it (`"1m 30s"`, `"250ms"`); `"forever"` is
/// [`Duration::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    /// The duration in words.
    pub fn text(&self) -> String {
        if self.0 == Duration::MAX {
            return "forever".into();
        }
        // Milliseconds are as fine as the API goes.
        let ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        humantime::format_duration(Duration::from_millis(ms)).to_string()
    }

    /// Reads `"30s"`, `"1h 5m"` or `"forever"`.
    ///
    /// # Errors
    /// Why the text is no duration.
    pub fn parse(s: &str) -> Result<Dur, String> {
        if s == "forever" {
            return Ok(Dur(Duration::MAX));
        }
        humantime::parse_duration(s).map(Dur).map_err(|e| {
            format!("{s:?} is not a duration ({e}); write e.g. \"30s\", \"5m\" or \"forever\"")
        })
    }
}

impl From<Duration> for Dur {
    fn from(d: Duration) -> Dur {
        Dur(d)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Dur {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration in humantime's words (\"30s\", \"1m 30s\", \"250ms\"), or \"forever\".",
            "examples": ["30s", "1h 5m", "forever"]
        })
    }
}

/// A wall-clock time, RFC 3339 in UTC with milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time(pub SystemTime);

impl Time {
    /// The time `ms` milliseconds after the Unix epoch.
    pub fn from_unix_ms(ms: u64) -> Time {
        Time(UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// Milliseconds since the Unix epoch (0 before it).
    pub fn unix_ms(&self) -> u64 {
        self.0
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_millis(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Time, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s).map(Time).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not an RFC 3339 time ({e}); write e.g. \"2026-01-02T03:04:05.678Z\""
            ))
        })
    }
}

impl JsonSchema for Time {
    fn schema_name() -> Cow<'static, str> {
        "Time".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "format": "date-time",
            "description": "A wall-clock time, RFC 3339 in UTC with milliseconds."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times_read_back() {
        for d in [Duration::from_millis(1500), Duration::ZERO, Duration::MAX] {
            let j = serde_json::to_string(&Dur(d)).unwrap();
            assert_eq!(serde_json::from_str::<Dur>(&j).unwrap(), Dur(d), "{j}");
        }
        assert_eq!(
            serde_json::to_string(&Dur(Duration::from_secs(90))).unwrap(),
            "\"1m 30s\""
        );
        let e = serde_json::from_str::<Dur>("\"soon\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a duration"), "{e}");
        assert!(serde_json::from_str::<Dur>("30").is_err());
        let t = Time::from_unix_ms(1_767_323_045_678);
        let j = serde_json::to_string(&t).unwrap();
        assert_eq!(j, "\"2026-01-02T03:04:05.678Z\"");
        assert_eq!(
            serde_json::from_str::<Time>(&j).unwrap().unix_ms(),
            1_767_323_045_678
        );
    }
}
