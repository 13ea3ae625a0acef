//! The `auth-service` command line: `serve` (the default), `migrate`, `seed`, as
//! every service has, and the operator's `user add` and `keys rotate`.
//!
//! `user add` is the only way to create an operator: the API registers customers
//! only, so whoever can reach the API cannot make themselves staff.

use service_kit::auth::Role;
use uuid::Uuid;

use crate::{keys, users, Config};

/// The subcommands.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Migrate, create a signing key if there is none, and serve the API until
    /// SIGINT or SIGTERM (the default).
    Serve,
    /// Bring the database to the current schema and exit.
    Migrate,
    /// Migrate, write the demo users (running it again changes nothing) and exit.
    Seed,
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage the signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum UserCommand {
    /// Add a user (operators are made only this way).
    Add {
        #[arg(long, value_name = "EMAIL")]
        email: String,
        /// The password (at least 8 characters); AUTH_USER_PASSWORD keeps it off
        /// the process list.
        #[arg(
            long,
            env = "AUTH_USER_PASSWORD",
            value_name = "PASSWORD",
            hide_env_values = true
        )]
        password: String,
        /// `operator` or `customer`; repeatable.
        #[arg(long = "role", value_name = "ROLE", required = true, value_parser = parse_role)]
        roles: Vec<Role>,
        /// The customer a customer user acts for.
        #[arg(long, value_name = "ID")]
        customer_id: Option<Uuid>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum KeysCommand {
    /// Make a new key the signing key; the old one stays published until every
    /// token it signed has expired.
    Rotate,
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text.trim()).ok_or_else(|| format!("{text:?} is not `customer` or `operator`"))
}

/// Runs `command` (default `serve`) until it is done, or for `serve` until a
/// termination signal.
pub async fn run(command: Option<Command>, config: Config) -> anyhow::Result<()> {
    let command = command.unwrap_or(Command::Serve);
    if command == Command::Serve {
        let running = crate::start(config).await?;
        return running
            .run_until(service_kit::runner::termination_signal())
            .await;
    }
    let pool = service_kit::cli::connect(&config.database_url).await?;
    crate::migrate(&pool).await?;
    match command {
        Command::Serve | Command::Migrate => {
            tracing::info!("the auth database is at the current schema");
            Ok(())
        }
        Command::Seed => crate::seed(&pool).await,
        Command::User(UserCommand::Add {
            email,
            password,
            roles,
            customer_id,
        }) => {
            let user = users::create(
                &pool,
                users::NewUser {
                    email,
                    password,
                    customer_id,
                    roles,
                },
            )
            .await?;
            tracing::info!(user = %user.id, email = user.email, roles = ?user.roles, "user added");
            Ok(())
        }
        Command::Keys(KeysCommand::Rotate) => {
            keys::rotate(&pool, config.token_settings().ttl).await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
        #[command(subcommand)]
        command: Option<Command>,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut all = vec!["auth-service", "--database-url", "postgres://x/y"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)
    }

    #[test]
    fn operators_are_added_with_roles_from_the_command_line() {
        let cli = parse(&[
            "user",
            "add",
            "--email",
            "o@x.example",
            "--password",
            "12345678",
            "--role",
            "operator",
        ])
        .unwrap();
        assert_eq!(
            cli.command,
            Some(Command::User(UserCommand::Add {
                email: "o@x.example".into(),
                password: "12345678".into(),
                roles: vec![Role::Operator],
                customer_id: None,
            }))
        );
        assert!(parse(&[
            "user",
            "add",
            "--email",
            "e",
            "--password",
            "p",
            "--role",
            "root"
        ])
        .is_err());
        assert!(parse(&["user", "add", "--email", "e", "--password", "p"]).is_err());
        assert_eq!(
            parse(&["keys", "rotate"]).unwrap().command,
            Some(Command::Keys(KeysCommand::Rotate))
        );
    }

    #[test]
    fn the_token_options_have_defaults_and_limits() {
        let cli = parse(&[]).unwrap();
        if std::env::var_os("AUTH_TOKEN_TTL_S").is_none() {
            assert_eq!(cli.config.token_ttl_s, 900);
        }
        if std::env::var_os("AUTH_ISSUER").is_none() {
            assert_eq!(cli.config.issuer, "shop-auth");
        }
        assert!(parse(&["--token-ttl-s", "0"]).is_err());
        let debug = format!("{:?}", Config::new("postgres://u:hunter2@h/db"));
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
