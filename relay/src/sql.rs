//! SQL text the relay builds: quoted identifiers and string literals.
//!
//! Names come from configuration (table, publication, slot) and are trusted, but a
//! literal must still stay a literal whatever the server's settings: with
//! `standard_conforming_strings = off` a backslash escapes the next character
//! inside `'...'`, so a value holding `\'` would end the literal early. A value
//! with a backslash is therefore written as an escape string (`E'...'`) with every
//! backslash doubled, which means the same under either setting.
//!
//! The replication protocol's own command grammar has no escape strings; its
//! quoting lives in [`crate::replication`].

/// Quotes an SQL identifier (`"..."`, embedded quotes doubled).
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal that keeps its value under any setting of
/// `standard_conforming_strings`.
pub fn literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_quote_quotes_and_escape_backslashes() {
        assert_eq!(literal("pub"), "'pub'");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal(r"back\slash"), r"E'back\\slash'");
        assert_eq!(
            literal(r"x\'; DROP TABLE t; --"),
            r"E'x\\''; DROP TABLE t; --'"
        );
    }

    #[test]
    fn identifiers_double_their_quotes() {
        assert_eq!(ident("outbox"), "\"outbox\"");
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
    }
}
