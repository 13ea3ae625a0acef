//! The server's ErrorResponse as the client keeps it, and whether retrying can
//! help. The wire parser ([`super::protocol`]) builds it; [`super::error`] carries it.

use std::fmt;

/// An ErrorResponse from the server, with the fields worth keeping.
///
/// Boxed inside, so that results carrying a [`ReplicationError`] stay small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError(Box<Fields>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Fields {
    severity: String,
    code: String,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
}

impl ServerError {
    /// Builds a server error from its fields.
    pub fn new(
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    ) -> ServerError {
        ServerError(Box::new(Fields {
            severity,
            code,
            message,
            detail,
            hint,
        }))
    }

    /// `ERROR`, `FATAL`, `PANIC` (or `WARNING`, `NOTICE`, ... for a notice).
    pub fn severity(&self) -> &str {
        &self.0.severity
    }

    /// The SQLSTATE code, such as `55006`.
    pub fn code(&self) -> &str {
        &self.0.code
    }

    /// The primary message.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The optional detail message.
    pub fn detail(&self) -> Option<&str> {
        self.0.detail.as_deref()
    }

    /// The optional hint.
    pub fn hint(&self) -> Option<&str> {
        self.0.hint.as_deref()
    }

    /// Whether retrying (on a new connection, after a pause) can succeed.
    ///
    /// Transient: connection exceptions (class 08), too many connections (53300),
    /// administrator shutdown, crash shutdown and "cannot connect now" (57P01 to
    /// 57P03). Everything else, including a slot that is active elsewhere (55006,
    /// which callers retry for a bounded time themselves), a missing slot (42704) and
    /// authentication failures (class 28), is definite.
    pub fn is_transient(&self) -> bool {
        let code = self.code();
        code.starts_with("08") || matches!(code, "53300" | "57P01" | "57P02" | "57P03")
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity(), self.code(), self.message())?;
        if let Some(detail) = self.detail() {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = self.hint() {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}
