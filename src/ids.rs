//! Identifiers: who a record belongs to, what it is called, where it may live.
//!
//! Every identifier here is validated when it is made, so a value of one of
//! these types is always well formed. [`PhoneNumber`] is personal data: it is
//! zeroized on drop and its `Debug` and `Display` show only the last two digits.
//!
//! ```
//! use custodian::ids::{PhoneNumber, Region};
//!
//! let number: PhoneNumber = "+447700900123".parse()?;
//! assert_eq!(format!("{number}"), "+…23");
//! assert!("07700 900123".parse::<PhoneNumber>().is_err()); // not E.164
//!
//! let region: Region = "eu".parse()?;
//! assert_eq!(region.as_str(), "eu");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::rng::OsRng;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// A business id is a decimal number from 1 to 2^64 - 1.
    #[error("business id must be a decimal number from 1 to 18446744073709551615")]
    BusinessId,
    /// A message id is 32 lowercase hexadecimal digits.
    #[error("message id must be 32 lowercase hexadecimal digits")]
    MessageId,
    /// A phone number is `+` then 7 to 15 digits, the first not 0 (E.164).
    #[error("phone number must be E.164: '+' then 7 to 15 digits, the first not 0")]
    PhoneNumber,
    /// A region is 2 to 15 characters of `a-z`, `0-9` and inner `-`.
    #[error("region must be 2 to 15 characters of a-z, 0-9 and inner '-'")]
    Region,
}

/// A business (a WhatsApp Business Account), by its numeric id.
///
/// Zero is not a business id, so a zeroed field can never name one.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BusinessId(std::num::NonZeroU64);

impl BusinessId {
    /// The business with this id; `None` for zero.
    pub const fn new(id: u64) -> Option<Self> {
        match std::num::NonZeroU64::new(id) {
            Some(id) => Some(Self(id)),
            None => None,
        }
    }

    /// The numeric id.
    pub const fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Debug for BusinessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BusinessId({})", self.0)
    }
}

impl fmt::Display for BusinessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for BusinessId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        // `u64::from_str` accepts a leading '+'; an id is digits only.
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.starts_with('0') {
            return Err(IdError::BusinessId);
        }
        s.parse::<u64>()
            .ok()
            .and_then(Self::new)
            .ok_or(IdError::BusinessId)
    }
}

impl Serialize for BusinessId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

impl<'de> Deserialize<'de> for BusinessId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let id = u64::deserialize(d)?;
        Self::new(id).ok_or_else(|| serde::de::Error::custom(IdError::BusinessId))
    }
}

/// The id of a stored record (a message, a sealed session): 128 bits.
///
/// Ids are drawn from a cryptographically secure generator, or hashed from
/// what names the record (an inbound message's Signal header; a host's
/// idempotency key for a send, under its business's secret key), so two
/// records never share one in practice; the envelope derives each record's
/// key from it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId([u8; 16]);

impl MessageId {
    /// Length of a message id in bytes.
    pub const LEN: usize = 16;

    /// A fresh random id from the operating system's generator.
    pub fn random() -> Self {
        Self::random_from(&mut OsRng)
    }

    /// A fresh random id from `rng` (inject a seeded generator for reproducible tests).
    pub fn random_from<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        Self(id)
    }

    /// The id with these bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The id's bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for MessageId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        // Lowercase only, so that every id has exactly one spelling.
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(IdError::MessageId);
        }
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id).map_err(|_| IdError::MessageId)?;
        Ok(Self(id))
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A consumer's phone number in strict E.164 form (`+` then 7 to 15 digits).
///
/// Personal data: the digits are zeroized when the value is dropped, and
/// `Debug`/`Display` print only the last two (`+…23`), so a number can be
/// logged by mistake without being disclosed. The full number is reached
/// only through [`PhoneNumber::expose`], which names what it does.
///
/// It deliberately does not implement `Serialize`: a number leaves the crate
/// only inside a sealed envelope or through the visibility policy.
///
/// Nor does it implement `Zeroize`: a wiped number is no longer E.164 and
/// every accessor would break on it, so wiping happens only in `Drop`, when
/// nothing can read the value again.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber(String);

impl Drop for PhoneNumber {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for PhoneNumber {}

impl PhoneNumber {
    /// Fewest digits accepted (the shortest numbering plans in use).
    pub const MIN_DIGITS: usize = 7;
    /// Most digits E.164 allows.
    pub const MAX_DIGITS: usize = 15;

    /// The full number, `+` and digits. Every call site is a disclosure:
    /// use it only to hand the number to a party the policy allows.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The digits after `+`.
    pub fn digits(&self) -> &str {
        &self.0[1..]
    }
}

impl FromStr for PhoneNumber {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let digits = s.strip_prefix('+').ok_or(IdError::PhoneNumber)?;
        let valid = (Self::MIN_DIGITS..=Self::MAX_DIGITS).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::PhoneNumber)
        }
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The length stays hidden too: it narrows the country.
        let tail = &self.0[self.0.len() - 2..];
        write!(f, "+…{tail}")
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber({self})")
    }
}

/// A consumer's phone number as the crate indexes it: a keyed hash (HMAC
/// under a key of the business), never the number itself. Two businesses get
/// unrelated hashes for one consumer, and without the business's key a hash
/// reveals nothing. Only the key hierarchy makes them; anything may hold them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PhoneHash([u8; 16]);

impl PhoneHash {
    /// Length in bytes.
    pub const LEN: usize = 16;

    /// The hash with these bytes (as read back from a store).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The hash's bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for PhoneHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not even a prefix: with the business's index key, a few bytes
        // narrow a number down to a handful of candidates.
        f.write_str("PhoneHash(..)")
    }
}

/// A storage region a business may pin its content to ("local storage").
///
/// 2 to 15 characters of `a-z`, `0-9` and `-` (not first or last), such as
/// `eu`, `us` or `in-south`. `Copy`, so it travels in headers for free.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Region {
    len: u8,
    bytes: [u8; Region::MAX_LEN],
}

impl Region {
    /// `local`: the region of a store that makes no residency claim (an
    /// in-process store, a test). A business pinned to a named region never
    /// matches it.
    pub const LOCAL: Self = Self {
        len: 5,
        bytes: *b"local\0\0\0\0\0\0\0\0\0\0",
    };

    /// Fewest characters in a region name.
    pub const MIN_LEN: usize = 2;
    /// Most characters in a region name.
    pub const MAX_LEN: usize = 15;

    /// The region named by these bytes, if they are a valid name.
    pub fn from_bytes(name: &[u8]) -> Result<Self, IdError> {
        let valid = (Self::MIN_LEN..=Self::MAX_LEN).contains(&name.len())
            && name
                .iter()
                .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && name.first() != Some(&b'-')
            && name.last() != Some(&b'-');
        if !valid {
            return Err(IdError::Region);
        }
        let mut bytes = [0u8; Self::MAX_LEN];
        bytes[..name.len()].copy_from_slice(name);
        // Lossless: the length was checked against MAX_LEN (15) above.
        Ok(Self {
            len: name.len() as u8,
            bytes,
        })
    }

    /// The region's name.
    pub fn as_str(&self) -> &str {
        // Validated ASCII at construction; the fallback is unreachable.
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    /// The region's name as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl FromStr for Region {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::from_bytes(s.as_bytes())
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Region({})", self.as_str())
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Region {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Region {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `IMPLEMENTS` is true exactly when `T: Zeroize`: the inherent constant,
    /// which exists only under that bound, shadows the blanket trait's.
    pub(crate) struct ZeroizeProbe<T>(std::marker::PhantomData<T>);
    pub(crate) trait NoZeroize {
        const IMPLEMENTS: bool = false;
    }
    impl<T> NoZeroize for ZeroizeProbe<T> {}
    impl<T: Zeroize> ZeroizeProbe<T> {
        pub(crate) const IMPLEMENTS: bool = true;
    }

    #[test]
    fn a_phone_number_wipes_itself_on_drop_but_cannot_be_wiped_while_in_use() {
        // The probe itself answers both ways.
        const { assert!(ZeroizeProbe::<String>::IMPLEMENTS) };
        const { assert!(!ZeroizeProbe::<Region>::IMPLEMENTS) };
        // A public `zeroize` would leave an empty string behind, on which
        // `Display` and `digits` slice out of bounds.
        const { assert!(!ZeroizeProbe::<PhoneNumber>::IMPLEMENTS) };
        fn zeroizes_on_drop<T: ZeroizeOnDrop>() {}
        zeroizes_on_drop::<PhoneNumber>();
    }

    #[test]
    fn phone_number_parse_is_strict_e164() {
        for good in [
            "+14155550123",
            "+447700900123",
            "+6834002",
            "+123456789012345",
        ] {
            assert!(good.parse::<PhoneNumber>().is_ok(), "{good}");
        }
        for bad in [
            "",
            "+",
            "14155550123",
            "+014155550123",
            "+1 415 555 0123",
            "+1-415-555-0123",
            "+123456",
            "+1234567890123456",
            "++14155550123",
            "+1415555012a",
            "+１４１５５５５０１２３",
            " +14155550123",
        ] {
            assert_eq!(
                bad.parse::<PhoneNumber>(),
                Err(IdError::PhoneNumber),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn phone_number_debug_and_display_show_only_last_two_digits() {
        let n: PhoneNumber = "+447700900123".parse().unwrap();
        assert_eq!(n.to_string(), "+…23");
        assert_eq!(format!("{n:?}"), "PhoneNumber(+…23)");
        assert_eq!(n.expose(), "+447700900123");
        assert_eq!(n.digits(), "447700900123");
    }

    #[test]
    fn business_id_rejects_zero_signs_and_leading_zeros() {
        assert_eq!("42".parse::<BusinessId>().map(BusinessId::get), Ok(42));
        for bad in ["0", "", "+42", "-1", "042", "18446744073709551616", "4 2"] {
            assert_eq!(
                bad.parse::<BusinessId>(),
                Err(IdError::BusinessId),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn region_names_are_validated() {
        assert_eq!(Region::LOCAL.as_str(), "local");
        assert_eq!("local".parse::<Region>(), Ok(Region::LOCAL));
        for good in ["eu", "us", "in-south", "me-central-1", "abcdefghijklmno"] {
            assert_eq!(
                good.parse::<Region>().map(|r| r.to_string()),
                Ok(good.to_owned())
            );
        }
        for bad in [
            "",
            "e",
            "EU",
            "-eu",
            "eu-",
            "eu_west",
            "abcdefghijklmnop",
            "é",
        ] {
            assert_eq!(bad.parse::<Region>(), Err(IdError::Region), "{bad:?}");
        }
    }

    #[test]
    fn message_ids_are_random_and_round_trip_as_lowercase_hex() {
        let a = MessageId::random();
        assert_ne!(a, MessageId::random());
        assert_eq!(a.to_string().parse::<MessageId>(), Ok(a));
        // Upper case is refused (an id with letters: a random one has none
        // about one time in three million).
        let lettered = MessageId::from_bytes([0xab; 16]);
        assert_eq!(lettered.to_string(), "ab".repeat(16));
        assert_eq!(
            lettered.to_string().to_uppercase().parse::<MessageId>(),
            Err(IdError::MessageId)
        );
        assert_eq!("00".parse::<MessageId>(), Err(IdError::MessageId));
    }

    proptest! {
        #[test]
        fn phone_number_display_never_shows_more_than_two_digits(digits in "[1-9][0-9]{6,14}") {
            let n: PhoneNumber = format!("+{digits}").parse().unwrap();
            let shown = format!("{n} {n:?}");
            prop_assert_eq!(shown.bytes().filter(u8::is_ascii_digit).count(), 4);
        }

        #[test]
        fn region_parse_never_panics_and_round_trips(s in "\\PC{0,20}") {
            if let Ok(r) = s.parse::<Region>() {
                prop_assert_eq!(r.as_str(), s.as_str());
            }
        }
    }
}
