//! Card numbers and the tokens that stand for them.
//!
//! A card number exists in the shop only between the client and the payment
//! service's vault (`POST /cards`): the vault answers with a [`CardToken`], and
//! only the token and the last four digits travel on — in orders, saga state,
//! commands, topics and idempotency fingerprints. A token carries the last four
//! digits in its text (`card_1111_<32 hex>`), which the shop may show and store
//! anyway, so that the order service needs no call to the vault to show them; the
//! random part is what the vault looks up.

use std::fmt;

/// The prefix of every card token.
const TOKEN_PREFIX: &str = "card_";
/// Hex digits of a token's random part (128 bits).
const TOKEN_RANDOM_HEX: usize = 32;

/// A card number: 12 to 19 digits, spaces and dashes between them dropped. Its
/// `Debug` and `Display` show only the last four digits.
#[derive(Clone, PartialEq, Eq)]
pub struct CardNumber(String);

impl CardNumber {
    /// The digits of `text`, or why it is not a card number.
    pub fn parse(text: &str) -> Result<CardNumber, String> {
        let digits: String = text.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
        if (12..=19).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
            Ok(CardNumber(digits))
        } else {
            Err("cardNumber must have 12 to 19 digits".to_owned())
        }
    }

    /// The digits; only the vault should need them.
    pub fn digits(&self) -> &str {
        &self.0
    }

    /// The last four digits, the part that may be shown and kept.
    pub fn last4(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }
}

impl fmt::Debug for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CardNumber(…{})", self.last4())
    }
}

impl fmt::Display for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "…{}", self.last4())
    }
}

/// A token the payment service's vault gave for a card: `card_<last4>_<32 hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CardToken(String);

impl CardToken {
    /// The token for a card ending in `last4` with the random part `random`.
    pub fn new(last4: &str, random: [u8; 16]) -> CardToken {
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        CardToken(format!("{TOKEN_PREFIX}{last4}_{hex}"))
    }

    /// `text` if it has a token's form (it may still be unknown to the vault).
    pub fn parse(text: &str) -> Result<CardToken, String> {
        let bad = || format!("{text:?} is not a card token (card_<last 4 digits>_<32 hex digits>)");
        let rest = text.strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
        let (last4, random) = rest.split_once('_').ok_or_else(bad)?;
        let digits = last4.len() == 4 && last4.bytes().all(|b| b.is_ascii_digit());
        let hex = random.len() == TOKEN_RANDOM_HEX
            && random
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if digits && hex {
            Ok(CardToken(text.to_owned()))
        } else {
            Err(bad())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The card's last four digits, read from the token.
    pub fn last4(&self) -> &str {
        &self.0[TOKEN_PREFIX.len()..TOKEN_PREFIX.len() + 4]
    }
}

impl fmt::Display for CardToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_numbers_keep_their_digits_and_show_only_the_last_four() {
        let card = CardNumber::parse("4111 1111-1111 1234").expect("a card number");
        assert_eq!(card.digits(), "4111111111111234");
        assert_eq!(card.last4(), "1234");
        assert_eq!(format!("{card:?} {card}"), "CardNumber(…1234) …1234");
        for bad in [
            "",
            "1234",
            "4111 1111 111",
            "41111111111111111111",
            "4111x11111111111",
        ] {
            assert!(CardNumber::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_carry_the_last_four_digits_and_parse_back() {
        let token = CardToken::new("1234", [0xab; 16]);
        assert_eq!(token.as_str(), "card_1234_abababababababababababababababab");
        assert_eq!(token.last4(), "1234");
        assert_eq!(CardToken::parse(token.as_str()), Ok(token));
        for bad in [
            "",
            "card_1234",
            "card_123_abababababababababababababababab",
            "card_1234_ABABABABABABABABABABABABABABABAB",
            "card_1234_abab",
            "tok_1234_abababababababababababababababab",
            "4111111111111234",
        ] {
            assert!(CardToken::parse(bad).is_err(), "{bad:?}");
        }
    }
}
