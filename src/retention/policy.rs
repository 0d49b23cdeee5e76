//! Retention periods: how long each business keeps each class of message,
//! under a ceiling no configuration can raise.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{Error as _, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{BusinessId, Region};
use crate::keys::EpochLength;
use crate::store::Direction;
use crate::time::Timestamp;

/// The most any message may be kept: 30 days. Not configurable.
pub const CEILING: Duration = Duration::from_secs(30 * 24 * 3600);
/// The default time content may stay in use outside its region: 60 minutes.
pub const DEFAULT_IN_USE_TTL: Duration = Duration::from_secs(3600);

/// Why a retention configuration was refused. `field` names where, in the
/// file's own terms (`business.1001.inbound`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct PolicyError {
    /// The offending field.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl PolicyError {
    fn new(field: impl Into<String>, problem: impl fmt::Display) -> Self {
        Self {
            field: field.into(),
            problem: problem.to_string(),
        }
    }
}

/// Retention of one business (or the default), per class of message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Periods {
    /// Messages from consumers.
    pub inbound: Duration,
    /// Messages from the business (what retransmission needs).
    pub outbound: Duration,
}

impl Periods {
    /// Both classes kept for `period`.
    pub const fn both(period: Duration) -> Self {
        Self {
            inbound: period,
            outbound: period,
        }
    }

    /// The period of `direction`.
    pub const fn of(&self, direction: Direction) -> Duration {
        match direction {
            Direction::Inbound => self.inbound,
            Direction::Outbound => self.outbound,
        }
    }

    /// The longer of the two: how long anything about a consumer of the
    /// business may be kept.
    pub fn longest(&self) -> Duration {
        self.inbound.max(self.outbound)
    }
}

/// What the configuration says about one business.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusinessRetention {
    /// Its retention periods.
    pub periods: Periods,
    /// The region its content must be stored in ("local storage"), if
    /// pinned: a named region, never [`Region::LOCAL`].
    pub region: Option<Region>,
}

/// Retention for every business: a default, per-business (and per-class)
/// shorter periods, the epoch length and the in-use TTL. Every period is at
/// most [`CEILING`]: a configuration that asks for more is refused, never
/// clamped.
///
/// The file form (TOML or JSON), every field optional:
///
/// ```toml
/// retention = "30d"      # the default, for both classes
/// epoch = "1h"           # expiry epoch length (1s to 1d)
/// in_use_ttl = "60m"     # content in use outside its region
///
/// [business.1001]
/// retention = "7d"
/// outbound = "3d"        # per class: inbound, outbound
/// region = "eu"          # local storage: content at rest only in this region
/// ```
///
/// Durations are an integer and a unit: `ms`, `s`, `m`, `h` or `d`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    default: Periods,
    epoch_length: EpochLength,
    in_use_ttl: Duration,
    businesses: BTreeMap<BusinessId, BusinessRetention>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            default: Periods::both(CEILING),
            epoch_length: EpochLength::DEFAULT,
            in_use_ttl: DEFAULT_IN_USE_TTL,
            businesses: BTreeMap::new(),
        }
    }
}

fn check_period(field: &str, d: Duration) -> Result<Duration, PolicyError> {
    if d.is_zero() {
        return Err(PolicyError::new(
            field,
            "a retention period must be positive",
        ));
    }
    if d > CEILING {
        return Err(PolicyError::new(
            field,
            format_args!("{} exceeds the 30-day ceiling", format_duration(d)),
        ));
    }
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        // A file says it in whole milliseconds at the finest.
        return Err(PolicyError::new(
            field,
            "a period is a whole number of milliseconds",
        ));
    }
    Ok(d)
}

impl RetentionPolicy {
    /// The default periods, applied to businesses not configured.
    pub fn default_periods(&self) -> Periods {
        self.default
    }

    /// Set the default periods; each must be within the ceiling.
    pub fn with_default(mut self, periods: Periods) -> Result<Self, PolicyError> {
        check_period("inbound", periods.inbound)?;
        check_period("outbound", periods.outbound)?;
        self.default = periods;
        Ok(self)
    }

    /// Configure one business; its periods must be within the ceiling.
    pub fn with_business(
        mut self,
        business: BusinessId,
        config: BusinessRetention,
    ) -> Result<Self, PolicyError> {
        check_period(
            &format!("business.{business}.inbound"),
            config.periods.inbound,
        )?;
        check_period(
            &format!("business.{business}.outbound"),
            config.periods.outbound,
        )?;
        check_region(&format!("business.{business}.region"), config.region)?;
        self.businesses.insert(business, config);
        Ok(self)
    }

    /// Set the epoch length.
    pub fn with_epoch_length(mut self, length: EpochLength) -> Self {
        self.epoch_length = length;
        self
    }

    /// Set the in-use TTL (at most the ceiling).
    pub fn with_in_use_ttl(mut self, ttl: Duration) -> Result<Self, PolicyError> {
        self.in_use_ttl = check_period("in_use_ttl", ttl)?;
        Ok(self)
    }

    /// The periods that apply to `business`.
    pub fn periods(&self, business: BusinessId) -> Periods {
        self.businesses
            .get(&business)
            .map_or(self.default, |b| b.periods)
    }

    /// How long `business` keeps messages going `direction`.
    pub fn period(&self, business: BusinessId, direction: Direction) -> Duration {
        self.periods(business).of(direction)
    }

    /// When a message of `business` going `direction`, stored at `now`, expires.
    pub fn expiry(&self, business: BusinessId, direction: Direction, now: Timestamp) -> Timestamp {
        now.saturating_add(self.period(business, direction))
    }

    /// The region `business` pinned its content to, if any.
    pub fn region(&self, business: BusinessId) -> Option<Region> {
        self.businesses.get(&business).and_then(|b| b.region)
    }

    /// The expiry epoch length.
    pub fn epoch_length(&self) -> EpochLength {
        self.epoch_length
    }

    /// How long content may stay in use outside its business's region.
    pub fn in_use_ttl(&self) -> Duration {
        self.in_use_ttl
    }

    /// The configured businesses.
    pub fn businesses(&self) -> impl Iterator<Item = (BusinessId, &BusinessRetention)> {
        self.businesses.iter().map(|(b, r)| (*b, r))
    }

    /// Whether this policy keeps some business's messages of some class
    /// longer than `before` does.
    pub(crate) fn lengthens(&self, before: &Self) -> bool {
        let named = self.businesses.keys().chain(before.businesses.keys());
        Direction::ALL.into_iter().any(|d| {
            self.default.of(d) > before.default.of(d)
                || named
                    .clone()
                    .any(|&b| self.period(b, d) > before.period(b, d))
        })
    }

    /// Parse and validate a TOML configuration.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = crate::visibility::from_toml_at(text)
            .map_err(|(field, e)| PolicyError::new(field.as_deref().unwrap_or("(file)"), e))?;
        file.validate()
    }

    /// Parse and validate a JSON configuration (a leading byte-order mark
    /// skipped, as the TOML reader skips it).
    pub fn from_json(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = crate::visibility::from_json_at(text)
            .map_err(|(field, e)| PolicyError::new(field.as_deref().unwrap_or("(file)"), e))?;
        file.validate()
    }

    /// What the policy says, in 64 hex digits: SHA-256 over its JSON file
    /// form ([`to_file`](Self::to_file)). The audit trail names each policy
    /// put in force by it.
    pub fn digest(&self) -> String {
        // A file of strings, numbers and a map with string keys: it always
        // serialises.
        let json = serde_json::to_vec(&self.to_file()).unwrap_or_default();
        hex::encode(Sha256::digest(json))
    }

    /// The file form of this policy.
    pub fn to_file(&self) -> PolicyFile {
        let periods = |p: Periods| {
            (
                Some(format_duration(p.inbound)),
                Some(format_duration(p.outbound)),
            )
        };
        let (inbound, outbound) = periods(self.default);
        PolicyFile {
            retention: None,
            inbound,
            outbound,
            epoch: Some(format_duration(self.epoch_length.as_duration())),
            in_use_ttl: Some(format_duration(self.in_use_ttl)),
            business: self
                .businesses
                .iter()
                .map(|(b, r)| {
                    let (inbound, outbound) = periods(r.periods);
                    (
                        b.to_string(),
                        BusinessFile {
                            retention: None,
                            inbound,
                            outbound,
                            region: r.region,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// A retention configuration as written in a file (see [`RetentionPolicy`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Default period for both classes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// Default period for inbound messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<String>,
    /// Default period for outbound messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<String>,
    /// Epoch length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// In-use TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use_ttl: Option<String>,
    /// Per-business settings, keyed by business id. A business given twice
    /// is refused, in every format (JSON would keep the last silently).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "unique_businesses"
    )]
    pub business: BTreeMap<String, BusinessFile>,
}

/// Read the `business` table, refusing a key given twice, naming it: the
/// same file must mean the same policy in TOML (which refuses duplicate keys
/// itself) and JSON (whose maps keep the last value).
fn unique_businesses<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, BusinessFile>, D::Error> {
    struct Unique;

    impl<'de> Visitor<'de> for Unique {
        type Value = BTreeMap<String, BusinessFile>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table of business settings keyed by business id")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut businesses = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if businesses.contains_key(&key) {
                    return Err(A::Error::custom(format_args!(
                        "business.{key}: business {key:?} is configured twice"
                    )));
                }
                let settings = map.next_value()?;
                businesses.insert(key, settings);
            }
            Ok(businesses)
        }
    }

    deserializer.deserialize_map(Unique)
}

/// One business's settings in a file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusinessFile {
    /// Period for both classes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// Period for inbound messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<String>,
    /// Period for outbound messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<String>,
    /// Pinned region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Region>,
}

/// Resolve `retention`, then per-class overrides, each checked against the ceiling.
fn resolve_periods(
    prefix: &str,
    base: Periods,
    retention: Option<&str>,
    inbound: Option<&str>,
    outbound: Option<&str>,
) -> Result<Periods, PolicyError> {
    let field = |name: &str| {
        if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}.{name}")
        }
    };
    let read = |name: &str, text: Option<&str>| -> Result<Option<Duration>, PolicyError> {
        text.map(|t| {
            let f = field(name);
            parse_duration(t)
                .map_err(|p| PolicyError::new(f.clone(), p))
                .and_then(|d| check_period(&f, d))
        })
        .transpose()
    };
    let both = read("retention", retention)?;
    let mut periods = both.map_or(base, Periods::both);
    if let Some(d) = read("inbound", inbound)? {
        periods.inbound = d;
    }
    if let Some(d) = read("outbound", outbound)? {
        periods.outbound = d;
    }
    Ok(periods)
}

impl PolicyFile {
    /// Check every field and build the policy.
    pub fn validate(&self) -> Result<RetentionPolicy, PolicyError> {
        let mut policy = RetentionPolicy::default();
        policy.default = resolve_periods(
            "",
            policy.default,
            self.retention.as_deref(),
            self.inbound.as_deref(),
            self.outbound.as_deref(),
        )?;
        if let Some(text) = &self.epoch {
            let d = parse_duration(text).map_err(|p| PolicyError::new("epoch", p))?;
            policy.epoch_length = EpochLength::new(d).ok_or_else(|| {
                PolicyError::new("epoch", "an epoch is 1s to 1d, in whole milliseconds")
            })?;
        }
        if let Some(text) = &self.in_use_ttl {
            let d = parse_duration(text).map_err(|p| PolicyError::new("in_use_ttl", p))?;
            policy.in_use_ttl = check_period("in_use_ttl", d)?;
        }
        for (key, b) in &self.business {
            let prefix = format!("business.{key}");
            let business: BusinessId = key.parse().map_err(|e| {
                PolicyError::new(prefix.clone(), format_args!("not a business id: {e}"))
            })?;
            let periods = resolve_periods(
                &prefix,
                policy.default,
                b.retention.as_deref(),
                b.inbound.as_deref(),
                b.outbound.as_deref(),
            )?;
            check_region(&format!("{prefix}.region"), b.region)?;
            policy.businesses.insert(
                business,
                BusinessRetention {
                    periods,
                    region: b.region,
                },
            );
        }
        Ok(policy)
    }
}

/// A business is pinned to a named region, never to [`Region::LOCAL`]: that
/// is what a store making no residency claim reports, so a pin to it would
/// be met by any such store wherever it runs.
fn check_region(field: &str, region: Option<Region>) -> Result<(), PolicyError> {
    if region == Some(Region::LOCAL) {
        return Err(PolicyError::new(
            field,
            "`local` is the region of a store that makes no residency claim; pin a named region",
        ));
    }
    Ok(())
}

/// Parse `<integer><unit>`, unit one of `ms`, `s`, `m`, `h`, `d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{text:?} is not a duration like \"30d\", \"12h\", \"90m\" or \"45s\""
        ));
    }
    let millis = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => return Err(format!("{text:?} has no unit: use ms, s, m, h or d")),
        _ => return Err(format!("{text:?} has unit {unit:?}: use ms, s, m, h or d")),
    };
    // Digits alone, so the one way to fail is a number past `u64`.
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is too long"))?;
    n.checked_mul(millis)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// The largest whole unit that expresses `d` exactly; `parse_duration`
/// reads it back as the same duration for every whole number of
/// milliseconds (below that, the nanoseconds are dropped).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_business_given_twice_is_refused_in_json_naming_it() {
        let text = r#"{"business": {"5": {"retention": "7d"}, "6": {}, "5": {"retention": "1d"}}}"#;
        let err = RetentionPolicy::from_json(text).unwrap_err();
        assert_eq!(err.field, "business");
        assert!(
            err.problem
                .starts_with("business.5: business \"5\" is configured twice"),
            "{err}"
        );
        // TOML refuses it too, by its own rule.
        let text = "[business.5]\nretention = \"7d\"\n[business.5]\nretention = \"1d\"\n";
        assert!(RetentionPolicy::from_toml(text).is_err());
        // The same business once is fine.
        let once = r#"{"business": {"5": {"retention": "7d"}, "6": {}}}"#;
        let policy = RetentionPolicy::from_json(once).unwrap();
        let five = BusinessId::new(5).unwrap();
        assert_eq!(
            policy.periods(five),
            Periods::both(Duration::from_secs(7 * 86_400))
        );
    }

    /// A JSON file's error of shape names the field, with the line and
    /// column: a value of the wrong type, an unknown field.
    #[test]
    fn a_json_error_names_the_field() {
        let err = RetentionPolicy::from_json(r#"{"business": {"5": {"retention": 7}}}"#);
        let err = err.unwrap_err();
        assert_eq!(err.field, "business.5.retention");
        assert!(err.problem.contains("line 1 column"), "{err}");
        let err = RetentionPolicy::from_json(r#"{"retension": "7d"}"#).unwrap_err();
        assert_eq!(err.field, "retension", "{err}");
        // A TOML file's, the same field.
        let err = RetentionPolicy::from_toml("[business.5]\nretention = 7\n").unwrap_err();
        assert_eq!(err.field, "business.5.retention", "{err}");
        assert!(err.problem.contains("line 2"), "{err}");
        let err = RetentionPolicy::from_json(r#"{"retention": "7d"} x"#).unwrap_err();
        assert_eq!(err.field, "(file)", "{err}");
    }

    /// A TOML file's error says where the problem is, as a JSON file's does.
    #[test]
    fn a_toml_error_names_its_line() {
        let text = "retention = \"7d\"\n\n[business.1002]\nretension = \"3d\"\n";
        let err = RetentionPolicy::from_toml(text).unwrap_err();
        assert!(err.problem.contains("line 4"), "{err}");
        assert!(err.problem.contains("retension"), "{err}");
    }

    /// `local` (what a store making no residency claim reports) is no pin:
    /// a file or a builder naming it is refused, naming the field.
    #[test]
    fn a_business_cannot_be_pinned_to_local() {
        let err = RetentionPolicy::from_toml("[business.5]\nregion = \"local\"\n").unwrap_err();
        assert_eq!(err.field, "business.5.region");
        let five = BusinessId::new(5).unwrap();
        let pinned = |region: &str| BusinessRetention {
            periods: Periods::both(CEILING),
            region: Some(region.parse().unwrap()),
        };
        let err = RetentionPolicy::default()
            .with_business(five, pinned("local"))
            .unwrap_err();
        assert_eq!(err.field, "business.5.region");
        let policy = RetentionPolicy::default()
            .with_business(five, pinned("eu"))
            .unwrap();
        assert_eq!(policy.region(five), Some("eu".parse().unwrap()));
    }

    /// A duration is written in the largest unit that says it exactly,
    /// and read back the same.
    #[test]
    fn a_duration_is_written_in_its_largest_exact_unit() {
        for (ms, text) in [
            (0, "0ms"),
            (999, "999ms"),
            (1000, "1s"),
            (1500, "1500ms"),
            (90_000, "90s"),
            (120_000, "2m"),
            (7_200_000, "2h"),
            (90_000_000, "25h"),
            (2_592_000_000, "30d"),
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d));
        }
    }

    /// Mostly durations that load (1 to 30 of a unit), some that may not.
    fn duration_text() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            2 => Just(None),
            4 => (1u64..=30, prop::sample::select(vec!["ms", "s", "m", "h", "d"]))
                .prop_map(|(n, unit)| Some(format!("{n}{unit}"))),
            1 => (
                0u64..3_000_000,
                prop::sample::select(vec!["ms", "s", "m", "h", "d", "", "x"])
            )
                .prop_map(|(n, unit)| Some(format!("{n}{unit}"))),
        ]
    }

    /// Mostly epoch lengths that load (1s to 1d), some that may not.
    fn epoch_text() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            3 => prop::sample::select(vec![None, Some("1s"), Some("90s"), Some("30m"), Some("1h"), Some("1d")])
                .prop_map(|e| e.map(str::to_owned)),
            1 => duration_text(),
        ]
    }

    fn business_file() -> impl Strategy<Value = BusinessFile> {
        (
            duration_text(),
            duration_text(),
            duration_text(),
            prop::option::of(prop::sample::select(vec!["eu", "us", "in-south", "local"])),
        )
            .prop_map(|(retention, inbound, outbound, region)| BusinessFile {
                retention,
                inbound,
                outbound,
                region: region.and_then(|r| r.parse().ok()),
            })
    }

    fn policy_file() -> impl Strategy<Value = PolicyFile> {
        (
            (duration_text(), duration_text(), duration_text()),
            (epoch_text(), duration_text()),
            prop::collection::btree_map(
                prop_oneof![
                    8 => (1u64..6).prop_map(|b| b.to_string()),
                    1 => Just("0".to_owned()),
                ],
                business_file(),
                0..4,
            ),
        )
            .prop_map(
                |((retention, inbound, outbound), (epoch, in_use_ttl), business)| PolicyFile {
                    retention,
                    inbound,
                    outbound,
                    epoch,
                    in_use_ttl,
                    business,
                },
            )
    }

    proptest! {
        /// One configuration written as TOML and as JSON loads to the same
        /// policy, or is refused for the same field; what loads is written
        /// back (`to_file`) in either format and read again unchanged.
        #[test]
        fn json_and_toml_files_load_to_the_same_policy(file in policy_file()) {
            let toml_text = toml::to_string(&file).unwrap();
            let json_text = serde_json::to_string(&file).unwrap();
            let from_toml = RetentionPolicy::from_toml(&toml_text);
            let from_json = RetentionPolicy::from_json(&json_text);
            match (&from_toml, &from_json) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(a), Err(b)) => prop_assert_eq!(&a.field, &b.field),
                _ => prop_assert!(false, "{from_toml:?} vs {from_json:?}"),
            }
            if let Ok(policy) = from_toml {
                let written = policy.to_file();
                let toml_text = toml::to_string(&written).unwrap();
                let json_text = serde_json::to_string(&written).unwrap();
                prop_assert_eq!(RetentionPolicy::from_toml(&toml_text).unwrap(), policy.clone());
                prop_assert_eq!(RetentionPolicy::from_json(&json_text).unwrap(), policy);
            }
        }

        /// The builder makes the policy a file makes from the same settings,
        /// and the policy lists back what it was given.
        #[test]
        fn the_builder_makes_what_the_file_makes(file in policy_file()) {
            let Ok(loaded) = file.validate() else {
                return Ok(());
            };
            let listed: Vec<_> = loaded.businesses().map(|(b, r)| (b, *r)).collect();
            let mut built = RetentionPolicy::default()
                .with_default(loaded.default_periods())
                .unwrap()
                .with_epoch_length(loaded.epoch_length())
                .with_in_use_ttl(loaded.in_use_ttl())
                .unwrap();
            for (business, retention) in &listed {
                built = built.with_business(*business, *retention).unwrap();
            }
            prop_assert_eq!(&built, &loaded);
            let named: Vec<String> = listed.iter().map(|(b, _)| b.to_string()).collect();
            let in_file: Vec<&String> = file.business.keys().collect();
            prop_assert_eq!(named.iter().collect::<Vec<_>>(), in_file);
            for (business, retention) in listed {
                prop_assert_eq!(loaded.periods(business), retention.periods);
                prop_assert_eq!(loaded.region(business), retention.region);
            }
            let epoch = file.epoch.as_deref().map_or(Ok(EpochLength::DEFAULT), |text| {
                parse_duration(text).map(|d| EpochLength::new(d).unwrap())
            });
            prop_assert_eq!(loaded.epoch_length(), epoch.unwrap());
        }

        /// A policy's digest is SHA-256 over its JSON file form, in hex: two
        /// policies share one exactly when they say the same.
        #[test]
        fn a_digest_names_what_a_policy_says(a in policy_file(), b in policy_file()) {
            let (Ok(a), Ok(b)) = (a.validate(), b.validate()) else {
                return Ok(());
            };
            let json = serde_json::to_vec(&a.to_file()).unwrap();
            prop_assert_eq!(a.digest(), hex::encode(Sha256::digest(json)));
            prop_assert_eq!(a.digest() == b.digest(), a == b);
        }

        /// One policy lengthens another exactly where it keeps some
        /// business's messages of some class longer (a business named in
        /// either, or in neither: by the defaults).
        #[test]
        fn a_policy_lengthens_another_where_some_period_is_longer(
            a in policy_file(),
            b in policy_file(),
        ) {
            let (Ok(a), Ok(b)) = (a.validate(), b.validate()) else {
                return Ok(());
            };
            let mut longer = false;
            for business in (1..7).filter_map(BusinessId::new) {
                for d in Direction::ALL {
                    longer |= a.period(business, d) > b.period(business, d);
                }
            }
            prop_assert_eq!(a.lengthens(&b), longer);
            prop_assert!(!a.lengthens(&a));
        }
    }
}
