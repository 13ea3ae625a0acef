//! PostgreSQL log sequence numbers.
//!
//! An LSN is a byte position in the write-ahead log. The server prints it as two
//! hexadecimal halves (`16/B374D848`); on the wire it is a big-endian `u64`. Ordering
//! LSNs is what the acknowledgement logic is built on, so the type is `Ord` and
//! cannot be confused with an ordinary integer.

use std::fmt;
use std::str::FromStr;

/// A position in the write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(u64);

impl Lsn {
    /// The invalid position `0/0`, which the server uses for "none".
    pub const ZERO: Lsn = Lsn(0);

    /// Wraps a raw WAL position.
    pub const fn new(raw: u64) -> Lsn {
        Lsn(raw)
    }

    /// The raw WAL position.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Whether this is the invalid position `0/0`.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl From<u64> for Lsn {
    fn from(raw: u64) -> Lsn {
        Lsn(raw)
    }
}

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> u64 {
        lsn.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not an LSN of the form `HI/LO` (hexadecimal, each half at most 32 bits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {text:?}: expected two hexadecimal halves such as 16/B374D848")]
pub struct ParseLsnError {
    text: String,
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(text: &str) -> Result<Lsn, ParseLsnError> {
        let err = || ParseLsnError {
            text: text.to_owned(),
        };
        let (hi, lo) = text.split_once('/').ok_or_else(err)?;
        let half = |s: &str| {
            if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(s, 16).map_err(|_| err())
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_like_the_server() {
        assert_eq!(Lsn::new(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!(Lsn::new(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn parses_server_text() {
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(Lsn::new(0x16_B374_D848)));
        assert_eq!("0/1a".parse::<Lsn>(), Ok(Lsn::new(0x1a)));
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "/",
            "16",
            "16/",
            "/1",
            "x/1",
            "1/1/1",
            "123456789/0",
            "+1/0",
            " 1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn orders_by_position() {
        assert!("1/0".parse::<Lsn>().unwrap() > "0/FFFFFFFF".parse::<Lsn>().unwrap());
    }

    proptest! {
        #[test]
        fn text_round_trips(raw in any::<u64>()) {
            let lsn = Lsn::new(raw);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
        }
    }
}
