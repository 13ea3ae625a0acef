//! Where and as whom the replication client connects: parsed from a `postgres://` URL.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// The port PostgreSQL listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 5432;
/// The host when the URL names none (Unix-domain sockets are not supported).
pub const DEFAULT_HOST: &str = "localhost";
/// The `application_name` the server shows in `pg_stat_replication`.
pub const DEFAULT_APPLICATION_NAME: &str = "outbox-relay";
/// How long TCP connect, startup and authentication may take together.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The URL query parameters [`ConnectConfig::from_url`] understands.
const SUPPORTED_PARAMETERS: &str = "application_name, connect_timeout, sslmode, sslrootcert, \
     sslcert, sslkey, user, password, dbname, host, port";

/// Whether and how the connection uses TLS: libpq's `sslmode`.
///
/// | mode | TLS | server certificate |
/// | --- | --- | --- |
/// | `disable` | never | - |
/// | `allow`, `prefer` | if the server offers it, else plain | chain checked only when a root certificate is given |
/// | `require` | always | chain checked only when a root certificate is given |
/// | `verify-ca` | always | chain checked against the root certificate |
/// | `verify-full` | always | chain and host name checked |
///
/// `prefer` is the default, as in libpq. `allow` (libpq: plain first, TLS only if the
/// server insists) is treated like `prefer`. Without a root certificate, `prefer` and
/// `require` encrypt but accept any certificate (the handshake signatures are still
/// checked); `verify-ca` and `verify-full` need a root certificate (`sslrootcert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// Like [`SslMode::Prefer`].
    Allow,
    /// TLS when the server offers it, plain TCP when it answers that it does not.
    #[default]
    Prefer,
    /// TLS or no connection.
    Require,
    /// TLS, with the server's certificate chain checked against the root
    /// certificate; the host name is not checked.
    VerifyCa,
    /// TLS, with the chain checked and the certificate valid for the host name (or
    /// IP address) connected to.
    VerifyFull,
}

impl SslMode {
    /// The mode as written in a URL (`verify-full`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server that does not accept TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// Whether the server's certificate must chain to a root certificate, which
    /// must therefore be configured.
    pub fn verifies_certificate(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ConfigError;

    fn from_str(mode: &str) -> Result<SslMode, ConfigError> {
        Ok(match mode {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(ConfigError::InvalidParameter {
                    name: "sslmode",
                    value: mode.to_owned(),
                    expected: "disable, allow, prefer, require, verify-ca or verify-full",
                })
            }
        })
    }
}

/// A password: never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The connection URL is not one the replication client can use.
///
/// Messages never repeat the URL: it may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Not a `postgres://` or `postgresql://` URL.
    #[error("the connection string is not a postgres:// or postgresql:// URL")]
    NotAUrl,
    /// A `%` escape is not two hex digits, or decodes to invalid UTF-8.
    #[error("the {part} in the connection URL has invalid percent-encoding")]
    InvalidPercentEncoding {
        /// Which part of the URL.
        part: &'static str,
    },
    /// The port is not a number between 1 and 65535.
    #[error("the port {value:?} in the connection URL is not a number between 1 and 65535")]
    InvalidPort {
        /// The port as written.
        value: String,
    },
    /// Several comma-separated hosts (libpq's failover list).
    #[error(
        "the connection URL names several hosts; the replication client connects to exactly one"
    )]
    MultipleHosts,
    /// A Unix-domain socket path as host.
    #[error("the connection URL names a Unix-domain socket ({host}); the replication client connects over TCP only")]
    UnixSocket {
        /// The socket directory.
        host: String,
    },
    /// No user name.
    #[error("the connection URL names no user (postgres://USER:PASSWORD@HOST:PORT/DATABASE)")]
    MissingUser,
    /// A query parameter this client does not know.
    #[error(
        "unknown parameter {name:?} in the connection URL (supported: {SUPPORTED_PARAMETERS})"
    )]
    UnknownParameter {
        /// The parameter's name.
        name: String,
    },
    /// A known query parameter with a value it cannot take.
    #[error("invalid value {value:?} for {name} in the connection URL: expected {expected}")]
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// The value as written.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// `verify-ca` or `verify-full` without `sslrootcert`.
    #[error(
        "sslmode={sslmode} checks the server's certificate and needs the certificate of the \
         CA that signed it: add sslrootcert=/path/to/ca.crt (PEM) to the connection URL, or use \
         sslmode=require to encrypt without checking"
    )]
    MissingRootCert {
        /// The requested mode.
        sslmode: SslMode,
    },
    /// Only one of `sslcert` and `sslkey`.
    #[error("the connection URL has {given} but not {missing}: a client certificate needs both")]
    IncompleteClientCert {
        /// The parameter given.
        given: &'static str,
        /// The parameter missing.
        missing: &'static str,
    },
}

/// How to reach the server and log in; the connection always asks for
/// `replication=database`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    host: String,
    port: u16,
    user: String,
    password: Option<Secret>,
    dbname: String,
    application_name: String,
    connect_timeout: Duration,
    ssl_mode: SslMode,
    ssl_root_cert: Option<PathBuf>,
    ssl_client_cert: Option<ClientCert>,
}

/// A client certificate and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClientCert {
    cert: PathBuf,
    key: PathBuf,
}

impl ConnectConfig {
    /// A configuration for `user` on `dbname` at `host`, with the default port,
    /// no password, the default application name and connect timeout, and
    /// [`SslMode::Prefer`] without root or client certificates.
    pub fn new(
        host: impl Into<String>,
        user: impl Into<String>,
        dbname: impl Into<String>,
    ) -> ConnectConfig {
        ConnectConfig {
            host: host.into(),
            port: DEFAULT_PORT,
            user: user.into(),
            password: None,
            dbname: dbname.into(),
            application_name: DEFAULT_APPLICATION_NAME.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            ssl_mode: SslMode::default(),
            ssl_root_cert: None,
            ssl_client_cert: None,
        }
    }

    /// Parses `postgres://user:password@host:port/dbname?param=value&...`
    /// (`postgresql://` too).
    ///
    /// User, password, host, database and parameter values are percent-decoded. The
    /// port defaults to 5432, the host to `localhost`, the database to the user's
    /// name. Parameters: `application_name`, `connect_timeout` (whole seconds, at
    /// least 1), `sslmode` (see [`SslMode`]; default `prefer`), `sslrootcert` (a PEM
    /// file of trusted CA certificates; required by `verify-ca` and `verify-full`,
    /// and when given, `prefer` and `require` check the chain too, as in libpq),
    /// `sslcert` and `sslkey` (a client certificate and its key as PEM files, both or
    /// neither), and `user`, `password`, `dbname`, `host`, `port`, which override the
    /// URL's parts as in libpq. Empty `sslrootcert`, `sslcert` and `sslkey` values
    /// count as not given. Files are read when connecting.
    pub fn from_url(url: &str) -> Result<ConnectConfig, ConfigError> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or(ConfigError::NotAUrl)?;
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash + 1..]),
            None => (rest, ""),
        };
        // The last '@' ends the user info: an unescaped '@' in a password survives.
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };

        let mut user = None;
        let mut password = None;
        if let Some(userinfo) = userinfo {
            let (raw_user, raw_password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            user = Some(percent_decode(raw_user, "user")?).filter(|u| !u.is_empty());
            if let Some(raw) = raw_password {
                password = Some(Secret::new(percent_decode(raw, "password")?));
            }
        }

        let (raw_host, raw_port) = split_host_port(hostport)?;
        let mut host = Some(percent_decode(raw_host, "host")?).filter(|h| !h.is_empty());
        let mut port = raw_port.map(parse_port).transpose()?;
        let mut dbname = Some(percent_decode(path, "database name")?).filter(|d| !d.is_empty());
        let mut application_name = None;
        let mut connect_timeout = None;
        let mut ssl_mode = SslMode::default();
        let mut ssl_root_cert = None;
        let mut ssl_cert = None;
        let mut ssl_key = None;

        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = percent_decode(raw_name, "parameter name")?;
            let value = percent_decode(raw_value, "parameter value")?;
            match name.as_str() {
                "application_name" => application_name = Some(value),
                "connect_timeout" => connect_timeout = Some(parse_connect_timeout(&value)?),
                "sslmode" => ssl_mode = value.parse()?,
                "sslrootcert" => ssl_root_cert = non_empty_path(value),
                "sslcert" => ssl_cert = non_empty_path(value),
                "sslkey" => ssl_key = non_empty_path(value),
                "user" => user = Some(value).filter(|u| !u.is_empty()),
                "password" => password = Some(Secret::new(value)),
                "dbname" => dbname = Some(value).filter(|d| !d.is_empty()),
                "host" => host = Some(value).filter(|h| !h.is_empty()),
                "port" => port = Some(parse_port(&value)?),
                _ => return Err(ConfigError::UnknownParameter { name }),
            }
        }

        let host = host.unwrap_or_else(|| DEFAULT_HOST.to_owned());
        if host.contains(',') {
            return Err(ConfigError::MultipleHosts);
        }
        if host.starts_with('/') {
            return Err(ConfigError::UnixSocket { host });
        }
        let user = user.ok_or(ConfigError::MissingUser)?;
        if ssl_mode.verifies_certificate() && ssl_root_cert.is_none() {
            return Err(ConfigError::MissingRootCert { sslmode: ssl_mode });
        }
        let ssl_client_cert = match (ssl_cert, ssl_key) {
            (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::IncompleteClientCert {
                    given: "sslcert",
                    missing: "sslkey",
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::IncompleteClientCert {
                    given: "sslkey",
                    missing: "sslcert",
                })
            }
        };
        Ok(ConnectConfig {
            dbname: dbname.unwrap_or_else(|| user.clone()),
            host,
            port: port.unwrap_or(DEFAULT_PORT),
            user,
            password,
            application_name: application_name
                .unwrap_or_else(|| DEFAULT_APPLICATION_NAME.to_owned()),
            connect_timeout: connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            ssl_mode,
            ssl_root_cert,
            ssl_client_cert,
        })
    }

    /// The server's host name or IP address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The server's TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The role to log in as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The password, if any.
    pub fn password(&self) -> Option<&Secret> {
        self.password.as_ref()
    }

    /// The database whose changes are decoded.
    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    /// The `application_name` sent at startup.
    pub fn application_name(&self) -> &str {
        &self.application_name
    }

    /// How long TCP connect, startup and authentication may take together.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Whether and how TLS is used.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The PEM file of CA certificates the server's certificate must chain to.
    pub fn ssl_root_cert(&self) -> Option<&Path> {
        self.ssl_root_cert.as_deref()
    }

    /// The client certificate and key PEM files, if the client presents one.
    pub fn ssl_client_cert(&self) -> Option<(&Path, &Path)> {
        self.ssl_client_cert
            .as_ref()
            .map(|c| (c.cert.as_path(), c.key.as_path()))
    }

    /// Sets the port.
    pub fn with_port(mut self, port: u16) -> ConnectConfig {
        self.port = port;
        self
    }

    /// Sets the password.
    pub fn with_password(mut self, password: Secret) -> ConnectConfig {
        self.password = Some(password);
        self
    }

    /// Sets the `application_name`.
    pub fn with_application_name(mut self, name: impl Into<String>) -> ConnectConfig {
        self.application_name = name.into();
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> ConnectConfig {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the TLS mode. `verify-ca` and `verify-full` also need
    /// [`with_ssl_root_cert`](Self::with_ssl_root_cert), or connecting fails.
    pub fn with_ssl_mode(mut self, mode: SslMode) -> ConnectConfig {
        self.ssl_mode = mode;
        self
    }

    /// Sets the PEM file of CA certificates the server's certificate must chain to.
    pub fn with_ssl_root_cert(mut self, path: impl Into<PathBuf>) -> ConnectConfig {
        self.ssl_root_cert = Some(path.into());
        self
    }

    /// Sets a client certificate (chain) and its private key, both PEM files.
    pub fn with_ssl_client_cert(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> ConnectConfig {
        self.ssl_client_cert = Some(ClientCert {
            cert: cert.into(),
            key: key.into(),
        });
        self
    }
}

/// Splits `host[:port]` or `[v6addr][:port]`.
fn split_host_port(hostport: &str) -> Result<(&str, Option<&str>), ConfigError> {
    if let Some(bracketed) = hostport.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(ConfigError::NotAUrl);
        };
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(ConfigError::NotAUrl),
            },
        };
    }
    if hostport.contains(',') {
        return Err(ConfigError::MultipleHosts);
    }
    Ok(match hostport.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (hostport, None),
    })
}

fn parse_port(text: &str) -> Result<u16, ConfigError> {
    match text.parse::<u16>() {
        Ok(port) if port != 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(ConfigError::InvalidPort {
            value: text.to_owned(),
        }),
    }
}

fn parse_connect_timeout(text: &str) -> Result<Duration, ConfigError> {
    match text.parse::<u64>() {
        Ok(secs) if secs > 0 && text.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(Duration::from_secs(secs))
        }
        _ => Err(ConfigError::InvalidParameter {
            name: "connect_timeout",
            value: text.to_owned(),
            expected: "a whole number of seconds, at least 1",
        }),
    }
}

/// A path parameter; empty means not given, as in libpq.
fn non_empty_path(value: String) -> Option<PathBuf> {
    Some(value).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Decodes `%XX` escapes (a `+` stays a `+`, as in libpq).
fn percent_decode(text: &str, part: &'static str) -> Result<String, ConfigError> {
    let err = || ConfigError::InvalidPercentEncoding { part };
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        if byte == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(err)?;
            let hex = std::str::from_utf8(hex).map_err(|_| err())?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            out.push(u8::from_str_radix(hex, 16).map_err(|_| err())?);
            i += 3;
        } else {
            out.push(byte);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_url() {
        let config = ConnectConfig::from_url(
            "postgres://relay:s%40cr%3At@db.example:6543/orders?application_name=my%20relay&connect_timeout=3&sslmode=disable",
        )
        .unwrap();
        assert_eq!(config.host(), "db.example");
        assert_eq!(config.port(), 6543);
        assert_eq!(config.user(), "relay");
        assert_eq!(config.password().unwrap().expose(), "s@cr:t");
        assert_eq!(config.dbname(), "orders");
        assert_eq!(config.application_name(), "my relay");
        assert_eq!(config.connect_timeout(), Duration::from_secs(3));
    }

    #[test]
    fn fills_in_defaults() {
        let config = ConnectConfig::from_url("postgresql://relay@10.0.0.1").unwrap();
        assert_eq!(config.host(), "10.0.0.1");
        assert_eq!(config.port(), DEFAULT_PORT);
        assert_eq!(config.password(), None);
        assert_eq!(config.dbname(), "relay");
        assert_eq!(config.application_name(), DEFAULT_APPLICATION_NAME);
        assert_eq!(config.connect_timeout(), DEFAULT_CONNECT_TIMEOUT);

        let config = ConnectConfig::from_url("postgres://relay@/").unwrap();
        assert_eq!(config.host(), DEFAULT_HOST);
        assert_eq!(config.dbname(), "relay");
    }

    #[test]
    fn parses_ipv6_hosts_and_query_overrides() {
        let config = ConnectConfig::from_url("postgres://u:p@[::1]:7000/d").unwrap();
        assert_eq!((config.host(), config.port()), ("::1", 7000));
        let config =
            ConnectConfig::from_url("postgres://[::1]/d?user=x&password=y%26z&port=7001&dbname=e")
                .unwrap();
        assert_eq!(config.user(), "x");
        assert_eq!(config.password().unwrap().expose(), "y&z");
        assert_eq!((config.port(), config.dbname()), (7001, "e"));
        // An unescaped '@' in the password: the last '@' ends the user info.
        let config = ConnectConfig::from_url("postgres://u:p@ss@h/d").unwrap();
        assert_eq!(config.password().unwrap().expose(), "p@ss");
        assert_eq!(config.host(), "h");
    }

    #[test]
    fn sslmode_defaults_to_prefer_without_certificates() {
        for config in [
            ConnectConfig::from_url("postgres://u@h/d").unwrap(),
            ConnectConfig::new("h", "u", "d"),
        ] {
            assert_eq!(config.ssl_mode(), SslMode::Prefer);
            assert_eq!(config.ssl_root_cert(), None);
            assert_eq!(config.ssl_client_cert(), None);
        }
    }

    #[test]
    fn parses_every_sslmode() {
        let modes = [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Allow),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ];
        for (text, mode) in modes {
            let config = ConnectConfig::from_url(&format!(
                "postgres://u@h/d?sslmode={text}&sslrootcert=%2Fetc%2Fca%20file.crt"
            ))
            .unwrap();
            assert_eq!(config.ssl_mode(), mode);
            assert_eq!(mode.as_str(), text);
            assert_eq!(mode.to_string(), text);
            assert_eq!(text.parse::<SslMode>(), Ok(mode));
            assert_eq!(
                config.ssl_root_cert(),
                Some(Path::new("/etc/ca file.crt")),
                "{text}"
            );
        }
        assert!(SslMode::Require.requires_tls() && !SslMode::Prefer.requires_tls());
        assert!(SslMode::VerifyCa.verifies_certificate());
        assert!(!SslMode::Require.verifies_certificate());
    }

    #[test]
    fn tls_without_verification_needs_no_root_certificate() {
        for mode in ["disable", "allow", "prefer", "require"] {
            let config =
                ConnectConfig::from_url(&format!("postgres://u@h/d?sslmode={mode}")).unwrap();
            assert_eq!(config.ssl_root_cert(), None);
        }
        // An empty value counts as not given.
        let config =
            ConnectConfig::from_url("postgres://u@h/d?sslrootcert=&sslmode=require").unwrap();
        assert_eq!(config.ssl_root_cert(), None);
    }

    #[test]
    fn verifying_modes_need_a_root_certificate() {
        for (text, mode) in [
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            for url in [
                format!("postgres://u@h/d?sslmode={text}"),
                format!("postgres://u@h/d?sslmode={text}&sslrootcert="),
            ] {
                let err = ConnectConfig::from_url(&url).unwrap_err();
                assert_eq!(err, ConfigError::MissingRootCert { sslmode: mode });
                let message = err.to_string();
                assert!(message.contains(&format!("sslmode={text}")), "{message}");
                assert!(message.contains("sslrootcert="), "{message}");
            }
        }
    }

    #[test]
    fn rejects_unknown_sslmodes_with_a_clear_message() {
        for bad in ["maybe", "VERIFY-FULL", "verify_full", "", "on"] {
            let err =
                ConnectConfig::from_url(&format!("postgres://u@h/d?sslmode={bad}")).unwrap_err();
            assert_eq!(
                err,
                ConfigError::InvalidParameter {
                    name: "sslmode",
                    value: bad.to_owned(),
                    expected: "disable, allow, prefer, require, verify-ca or verify-full",
                }
            );
            let message = err.to_string();
            assert!(
                message.contains(&format!("invalid value {bad:?} for sslmode")),
                "{message}"
            );
            assert!(message.contains("verify-full"), "{message}");
        }
    }

    #[test]
    fn parses_a_client_certificate_pair() {
        let config = ConnectConfig::from_url(
            "postgres://u@h/d?sslcert=%2Fkeys%2Fclient.crt&sslkey=%2Fkeys%2Fclient.key",
        )
        .unwrap();
        assert_eq!(
            config.ssl_client_cert(),
            Some((Path::new("/keys/client.crt"), Path::new("/keys/client.key")))
        );
        assert_eq!(
            ConnectConfig::from_url("postgres://u@h/d?sslcert=c.crt"),
            Err(ConfigError::IncompleteClientCert {
                given: "sslcert",
                missing: "sslkey"
            })
        );
        let err = ConnectConfig::from_url("postgres://u@h/d?sslkey=c.key").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the connection URL has sslkey but not sslcert: a client certificate needs both"
        );
    }

    #[test]
    fn builder_sets_tls_settings() {
        let config = ConnectConfig::new("h", "u", "d")
            .with_ssl_mode(SslMode::VerifyFull)
            .with_ssl_root_cert("/ca.crt")
            .with_ssl_client_cert("/c.crt", "/c.key");
        assert_eq!(config.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(config.ssl_root_cert(), Some(Path::new("/ca.crt")));
        assert_eq!(
            config.ssl_client_cert(),
            Some((Path::new("/c.crt"), Path::new("/c.key")))
        );
    }

    #[test]
    fn rejects_bad_urls() {
        let cases = [
            ("host=h user=u", ConfigError::NotAUrl),
            ("mysql://u@h/d", ConfigError::NotAUrl),
            ("postgres://h/d", ConfigError::MissingUser),
            (
                "postgres://u@h:0/d",
                ConfigError::InvalidPort { value: "0".into() },
            ),
            (
                "postgres://u@h:65536/d",
                ConfigError::InvalidPort {
                    value: "65536".into(),
                },
            ),
            (
                "postgres://u@h:+5/d",
                ConfigError::InvalidPort { value: "+5".into() },
            ),
            ("postgres://u@h1,h2/d", ConfigError::MultipleHosts),
            (
                "postgres://u@%2Fvar%2Frun/d",
                ConfigError::UnixSocket {
                    host: "/var/run".into(),
                },
            ),
            (
                "postgres://u:%zz@h/d",
                ConfigError::InvalidPercentEncoding { part: "password" },
            ),
            (
                "postgres://u:%c3@h/d",
                ConfigError::InvalidPercentEncoding { part: "password" },
            ),
            (
                "postgres://u@h/d?options=-c",
                ConfigError::UnknownParameter {
                    name: "options".into(),
                },
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(ConnectConfig::from_url(url), Err(expected), "{url}");
        }
        for bad in ["0", "-1", "1.5", "x", ""] {
            assert!(matches!(
                ConnectConfig::from_url(&format!("postgres://u@h/d?connect_timeout={bad}")),
                Err(ConfigError::InvalidParameter {
                    name: "connect_timeout",
                    ..
                })
            ));
        }
    }

    #[test]
    fn never_shows_the_password() {
        let config = ConnectConfig::from_url("postgres://u:hunter2@h/d").unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
        let secret = config.password().unwrap();
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!secret.to_string().contains("hunter2"));
        let err =
            ConnectConfig::from_url("postgres://u:hunter2@h/d?sslmode=verify-full").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }
}
