//! The service's instance name: its consumer's instance id, claimed by one process.
//!
//! A consumer with an instance id (`group.instance.id`) that is killed and started
//! again takes its predecessor's membership over at once, instead of waiting
//! without partitions until the predecessor's session expires (see
//! `saga_core::consumer`). The name must therefore stay the same across restarts of
//! one process (the pod's name: stable in a StatefulSet, and kept across container
//! restarts in a Deployment) and differ between live processes: a second live
//! process with the same name would fence the first off on Apache Kafka, and on
//! tansu 0.6 both would consume the same partitions.
//!
//! # Why two live processes never share a name
//!
//! A process claims its name, per consumer group, with a session-level advisory
//! lock on its service's database ([`INSTANCE_LOCK_CLASS`], key: the hash of group
//! and name), taken on a connection of its own and held as long as the consumer
//! uses the name. A second process finds the lock taken, warns, and consumes
//! without an instance id: an ordinary member, rescued after a restart by the
//! consumer's membership watchdog. A killed process's connection closes with it,
//! and PostgreSQL ends its session and releases the lock at once, so the restarted
//! process claims the name again. If the claim's connection breaks while the
//! process lives (the database restarted), the name is claimed again the next time
//! the consumer starts; the consumer keeps its id meanwhile.

use sqlx::{Connection as _, PgConnection, PgPool};

/// Class of the advisory lock that claims an instance name (the key is the hash of
/// the consumer group and the name); "obci", apart from the relay's classes.
pub const INSTANCE_LOCK_CLASS: i32 = 0x6f62_6369;

/// The longest instance id Apache Kafka accepts.
const MAX_NAME_LEN: usize = 249;

/// Whether `name` can be an instance id: 1 to 249 letters, digits, `.`, `_`, `-`.
pub fn is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The host's name (in Kubernetes, the pod's), when it can be an instance id.
pub fn hostname() -> Option<String> {
    let from_kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let from_env = || std::env::var("HOSTNAME").ok();
    let from_file = || std::fs::read_to_string("/etc/hostname").ok();
    [from_kernel, from_env(), from_file()]
        .into_iter()
        .flatten()
        .map(|name| name.trim().to_owned())
        .find(|name| is_valid(name))
}

/// An instance name of one consumer group, claimed on the service's database.
#[derive(Debug)]
pub struct InstanceClaim {
    group: String,
    name: String,
    /// The session holding the lock, while the claim is held.
    session: Option<PgConnection>,
}

impl InstanceClaim {
    pub fn new(group: impl Into<String>, name: impl Into<String>) -> InstanceClaim {
        InstanceClaim {
            group: group.into(),
            name: name.into(),
            session: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Holds the claim: keeps it while its session answers, or takes it on a new
    /// session of `pool`'s database. Whether it is held; `false` when another
    /// session holds it (a warning says so).
    pub async fn hold(&mut self, pool: &PgPool) -> Result<bool, sqlx::Error> {
        if let Some(session) = &mut self.session {
            if session.ping().await.is_ok() {
                return Ok(true);
            }
            tracing::warn!(
                group = %self.group,
                instance_name = %self.name,
                "the session claiming the instance name broke; claiming it again"
            );
            self.session = None;
        }
        // A connection of its own, out of the pool: the lock lives with its session.
        let mut session = pool.acquire().await?.detach();
        let taken: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2 || '/' || $3))")
                .bind(INSTANCE_LOCK_CLASS)
                .bind(&self.group)
                .bind(&self.name)
                .fetch_one(&mut session)
                .await?;
        if taken {
            tracing::info!(group = %self.group, instance_name = %self.name, "claimed the instance name");
            self.session = Some(session);
        } else {
            tracing::warn!(
                group = %self.group,
                instance_name = %self.name,
                "another process runs with this instance name (INSTANCE_NAME); consuming \
                 without an instance id, so a restart of this process waits for the \
                 membership watchdog instead of taking its place at once"
            );
            let _ = session.close().await;
        }
        Ok(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_instance_ids_or_refused() {
        for good in [
            "order-service-0",
            "order-7d9f8c-x2k4q",
            "host.example.com",
            "a_b",
        ] {
            assert!(is_valid(good), "{good}");
        }
        for bad in ["", "a b", "a/b", "é", &"x".repeat(250)] {
            assert!(!is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_host_has_a_name() {
        // Every machine the tests run on has one (a container's is its id).
        let name = hostname().expect("a hostname");
        assert!(is_valid(&name), "{name}");
    }
}
