//! Money as integer cents. The REST API speaks decimal amounts with at most two
//! places (`12.5`, `12.50`); messages and code use cents, so no amount is ever
//! rounded on the way.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest amount a `numeric(12, 2)` column holds, in cents.
pub const MAX_CENTS: i64 = 9_999_999_999_999;

/// Checks the `amountCents` of saga command `message` before its barrier is
/// entered: a positive amount a `numeric(12, 2)` column holds. Anything else can
/// never be applied, so the error is definite.
pub fn check_cents(
    message: &saga_core::consumer::IncomingMessage,
    amount_cents: i64,
) -> Result<(), saga_core::consumer::HandlerError> {
    if (1..=MAX_CENTS).contains(&amount_cents) {
        return Ok(());
    }
    Err(saga_core::consumer::HandlerError::definite(format!(
        "{}: amountCents must be between 1 and {MAX_CENTS}, not {amount_cents}",
        message.message_type.as_deref().unwrap_or_default()
    )))
}

/// An amount of money in cents. Deserialises from a JSON number with at most two
/// decimal places and serialises to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(pub i64);

impl Amount {
    pub fn cents(self) -> i64 {
        self.0
    }

    /// Parses a decimal amount such as `12`, `12.5` or `12.50`.
    pub fn parse(text: &str) -> Result<Amount, String> {
        let text = text.trim();
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
            return Err(format!("{text:?} is not a decimal amount"));
        }
        if fraction.len() > 2 {
            return Err(format!("{text} has more than two decimal places"));
        }
        if (digits.split_once('.').is_some()) && fraction.is_empty() {
            return Err(format!("{text:?} is not a decimal amount"));
        }
        let fraction = format!("{fraction:0<2}");
        let cents = whole
            .parse::<i64>()
            .ok()
            .and_then(|w| w.checked_mul(100))
            .and_then(|w| w.checked_add(fraction.parse::<i64>().unwrap_or(0)))
            .filter(|c| *c <= MAX_CENTS)
            .ok_or_else(|| format!("{text} is too large"))?;
        Ok(Amount(if negative { -cents } else { cents }))
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // A JSON number with the digits of the amount (up to 12 significant digits,
        // which an f64 holds exactly enough to print back the same decimal).
        let number: serde_json::Number = self
            .to_string()
            .parse()
            .map_err(serde::ser::Error::custom)?;
        number.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Amount, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let text = match &value {
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::String(s) => s.clone(),
            other => {
                return Err(serde::de::Error::custom(format!(
                    "an amount must be a number, not {other}"
                )))
            }
        };
        Amount::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_two_places_at_most() {
        assert_eq!(Amount::parse("12"), Ok(Amount(1200)));
        assert_eq!(Amount::parse("12.5"), Ok(Amount(1250)));
        assert_eq!(Amount::parse("0.07"), Ok(Amount(7)));
        assert_eq!(Amount::parse("-3.10"), Ok(Amount(-310)));
        for bad in [
            "",
            "1.234",
            "abc",
            "1.",
            ".5",
            "1e3",
            "--1",
            "99999999999999",
        ] {
            assert!(Amount::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn json_round_trip() {
        let a: Amount = serde_json::from_str("49.9").expect("an amount");
        assert_eq!(a, Amount(4990));
        // A JSON number: trailing zeros are not kept.
        assert_eq!(serde_json::to_string(&a).expect("json"), "49.9");
        assert_eq!(
            serde_json::to_string(&Amount(123_456_789_012)).expect("json"),
            "1234567890.12"
        );
        assert_eq!(serde_json::to_string(&Amount(-5)).expect("json"), "-0.05");
        assert!(serde_json::from_str::<Amount>("1.001").is_err());
        assert!(serde_json::from_str::<Amount>("true").is_err());
    }
}
