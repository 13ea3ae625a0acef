//! Passwords and email addresses: what is accepted, and how passwords are hashed
//! and checked.
//!
//! Passwords are hashed with argon2id (the `argon2` crate's defaults: 19 MiB, two
//! passes, one lane, as OWASP recommends) under a fresh random salt, and stored as
//! PHC strings, which carry their parameters: a hash made under other parameters
//! still verifies. Hashing is deliberately slow and memory-hungry, so it runs on
//! the blocking pool, at most [`concurrency`] at a time: a burst of sign-ins
//! queues instead of taking the memory of hundreds of hashes at once.
//!
//! A sign-in for an email nobody has is checked against [`dummy_hash`] (a hash of a
//! random password made with the same parameters), so an unknown email costs as
//! much time as a wrong password and the answer's timing does not tell which.

use std::sync::OnceLock;

use anyhow::Context as _;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::Argon2;
use tokio::sync::Semaphore;

/// The shortest password accepted, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// The longest password accepted, in bytes (more only costs hashing time).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// The longest email address accepted (RFC 5321's path limit).
pub const MAX_EMAIL_BYTES: usize = 254;

/// `Ok` when `password` is long enough and not absurdly long.
pub fn check_password(password: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(format!(
            "the password must have at least {MIN_PASSWORD_CHARS} characters"
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(format!(
            "the password must have at most {MAX_PASSWORD_BYTES} bytes"
        ));
    }
    Ok(())
}

/// The address as stored: trimmed; refused unless it looks like `local@domain.tld`
/// (one `@`, no spaces, a dot in the domain). Whether it is deliverable is not
/// checked. Uniqueness ignores case; the case given is kept.
pub fn check_email(email: &str) -> Result<String, String> {
    let email = email.trim();
    let bad = || Err(format!("{email:?} is not an email address"));
    if email.is_empty() || email.len() > MAX_EMAIL_BYTES {
        return bad();
    }
    let Some((local, domain)) = email.split_once('@') else {
        return bad();
    };
    let valid = !local.is_empty()
        && !domain.contains('@')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..");
    if valid {
        Ok(email.to_owned())
    } else {
        bad()
    }
}

/// How many hashes run at once: the number of CPUs.
pub fn concurrency() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}

fn permits() -> &'static Semaphore {
    static PERMITS: OnceLock<Semaphore> = OnceLock::new();
    PERMITS.get_or_init(|| Semaphore::new(concurrency()))
}

/// Runs `work` on the blocking pool under a hashing permit.
async fn hashing<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let _permit = permits()
        .acquire()
        .await
        .context("the hashing permits are closed")?;
    tokio::task::spawn_blocking(work)
        .await
        .context("password hashing panicked")
}

fn hash_now(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("cannot hash a password: {e}"))?;
    Ok(hash.to_string())
}

/// The PHC string of `password` under a fresh salt.
pub async fn hash(password: String) -> anyhow::Result<String> {
    hashing(move || hash_now(&password)).await?
}

/// A hash of a random password, made once; what an unknown user's sign-in is
/// checked against.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let random = uuid::Uuid::new_v4().to_string();
        // Hashing a fixed-size string cannot fail; should it, the dummy still costs
        // a parse and matches nothing.
        hash_now(&random).unwrap_or_default()
    })
}

/// Makes [`dummy_hash`] now, so the first unknown-user sign-in is not slower than
/// the others.
pub async fn warm_up() -> anyhow::Result<()> {
    hashing(|| {
        dummy_hash();
    })
    .await
}

fn verify_now(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "a stored password hash does not parse");
            false
        }
    }
}

/// Whether `password` matches `phc`; with no hash (an unknown user) it is checked
/// against the dummy hash, which takes as long and never matches.
pub async fn verify(password: String, phc: Option<String>) -> anyhow::Result<bool> {
    hashing(move || match phc {
        Some(phc) => verify_now(&password, &phc),
        None => {
            let _ = verify_now(&password, dummy_hash());
            false
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_need_eight_characters() {
        assert!(check_password("1234567").is_err());
        assert!(check_password("12345678").is_ok());
        // Characters, not bytes: seven two-byte characters are still too few.
        assert!(check_password("ééééééé").is_err());
        assert!(check_password(&"x".repeat(MAX_PASSWORD_BYTES + 1)).is_err());
    }

    #[test]
    fn emails_are_trimmed_and_checked_for_their_shape() {
        assert_eq!(
            check_email("  Ada@Shop.Example ").as_deref(),
            Ok("Ada@Shop.Example")
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@shop.example",
            "ada@shop",
            "ada@@shop.example",
            "a da@shop.example",
            "ada@shop..example",
            "ada@.shop.example",
            "ada@shop.example.",
        ] {
            assert!(check_email(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[tokio::test]
    async fn hashes_are_argon2id_salted_and_verify_only_their_password() {
        let first = hash("correct horse".into()).await.unwrap();
        let second = hash("correct horse".into()).await.unwrap();
        assert!(first.starts_with("$argon2id$v=19$"), "{first}");
        assert_ne!(first, second, "each hash has its own salt");
        assert!(verify("correct horse".into(), Some(first.clone()))
            .await
            .unwrap());
        assert!(!verify("correct horsf".into(), Some(first)).await.unwrap());
        assert!(!verify("anything".into(), None).await.unwrap());
        assert!(!verify("x".into(), Some("not a hash".into())).await.unwrap());
    }
}
