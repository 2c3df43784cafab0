//! The command line itself: flags, the command groups, and the entry point both binaries
//! call (`flotctl`, and `flotilla-hub ctl`, which the hub's `--dev` points newcomers at).

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands::{self, Ctx, Failure, Output};

/// Flotilla fleet CLI.
#[derive(Debug, Parser)]
#[command(name = "flotctl", version)]
struct Cli {
    /// Hub gRPC address.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_HUB",
        default_value = "127.0.0.1:7400"
    )]
    hub: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// The fleet CA (PEM) the hub's certificate is checked against; turns TLS on.
    #[arg(long, global = true, env = "FLOTILLA_CA")]
    ca: Option<std::path::PathBuf>,
    /// Your client certificate (PEM; from `flotctl ca init` or `ca issue`).
    #[arg(long, global = true, env = "FLOTILLA_CERT")]
    cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long, global = true, env = "FLOTILLA_KEY")]
    key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List things.
    Get {
        #[command(subcommand)]
        what: commands::get::Get,
    },
    /// One cluster in detail: pools, nodes, GPUs, health history.
    Describe {
        #[command(subcommand)]
        what: commands::describe::Describe,
    },
    /// Where can replicas × GPUs run?
    Fit(commands::fit::FitArgs),
    /// The fleet now, then every change as it happens.
    Watch,
    /// Print the agent install manifest for a cluster, with a new join token.
    Join(commands::join::JoinArgs),
    /// The fleet store: snapshots for backup, restore and moving between backends.
    Store {
        #[command(subcommand)]
        what: commands::store::Store,
    },
    /// The addresses a client gets for a service now, in answer order.
    Resolve {
        /// The service, as name.namespace or namespace/name.
        service: String,
        #[command(flatten)]
        from: commands::services::From,
    },
    /// Why a decision came out as it did.
    Explain {
        #[command(subcommand)]
        what: Explain,
    },
    /// Routing policies: per service, or the fleet default.
    Policy {
        #[command(subcommand)]
        what: commands::services::Policy,
    },
    /// Routes for proxies and gateways.
    Routes {
        #[command(subcommand)]
        what: Routes,
    },
    /// Fleet upgrade campaigns: staged blue-green node-pool rollouts.
    Campaign {
        #[command(subcommand)]
        what: commands::campaign::Campaign,
    },
    /// The fleet CA and identities for people and tools (offline, where the CA key is).
    Ca {
        #[command(subcommand)]
        what: commands::security::CaCmd,
    },
    /// Join tokens: create, list, revoke.
    Token {
        #[command(subcommand)]
        what: commands::security::TokenCmd,
    },
    /// Bearer tokens for tools that cannot present a client certificate.
    Apitoken {
        #[command(subcommand)]
        what: commands::security::ApiTokenCmd,
    },
    /// Cluster membership: approve a waiting join, remove a cluster.
    Cluster {
        #[command(subcommand)]
        what: commands::security::ClusterCmd,
    },
    /// The audit log: every change and every refusal.
    Audit(commands::security::AuditArgs),
}

#[derive(Debug, Subcommand)]
enum Explain {
    /// Which clusters answer for a service, and why each other cluster does not.
    Route {
        /// The service, as name.namespace or namespace/name.
        service: String,
        #[command(flatten)]
        from: commands::services::From,
    },
}

#[derive(Debug, Subcommand)]
enum Routes {
    /// Write a service's routes for another router (llm-d's clusters.yaml), once or kept
    /// current.
    Export(commands::services::Export),
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Ca { what } = cli.command {
        return commands::security::ca(what);
    }
    let security = commands::security(cli.ca.as_deref(), cli.cert.as_deref(), cli.key.as_deref())?;
    let mut ctx = Ctx::connect(cli.hub, cli.output, security).await?;
    match cli.command {
        Command::Ca { .. } => unreachable!("handled above"),
        Command::Token { what } => commands::security::token(&mut ctx, what).await,
        Command::Apitoken { what } => commands::security::apitoken(&mut ctx, what).await,
        Command::Cluster { what } => commands::security::cluster(&mut ctx, what).await,
        Command::Audit(a) => commands::security::audit(&mut ctx, a).await,
        Command::Get { what } => commands::get::run(&mut ctx, what).await,
        Command::Describe { what } => commands::describe::run(&mut ctx, what).await,
        Command::Fit(a) => commands::fit::run(&mut ctx, a).await,
        Command::Watch => commands::watch::run(&mut ctx).await,
        Command::Join(a) => commands::join::run(&mut ctx, a).await,
        Command::Store { what } => commands::store::run(&mut ctx, what).await,
        Command::Resolve { service, from } => {
            commands::services::resolve(&mut ctx, &service, &from).await
        }
        Command::Explain {
            what: Explain::Route { service, from },
        } => commands::services::explain(&mut ctx, &service, &from).await,
        Command::Policy { what } => commands::services::policy(&mut ctx, what).await,
        Command::Campaign { what } => commands::campaign::run(&mut ctx, what).await,
        Command::Routes {
            what: Routes::Export(a),
        } => commands::services::export(&mut ctx, a).await,
    }
}

/// Parses `args` (the first is the program name) and runs the command on a runtime of its own.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flotctl: cannot start a runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((msg, code)) => {
            eprintln!("flotctl: {msg}");
            ExitCode::from(code)
        }
    }
}
