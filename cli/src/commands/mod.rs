//! One module per command group. Each takes the connected [`Ctx`] and its own arguments.

pub mod campaign;
pub mod describe;
pub mod fit;
pub mod get;
pub mod join;
pub mod security;
pub mod services;
pub mod store;
pub mod watch;

use clap::ValueEnum;
use flotilla_api::v1::fleet_service_client::FleetServiceClient;
use serde_json::Value;
use tonic::transport::Channel;

/// TLS from `--ca` (and `--cert`/`--key` for an identity); plaintext without `--ca`.
pub fn security(
    ca: Option<&std::path::Path>,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<flotilla_api::grpc::Security, Failure> {
    flotilla_api::grpc::Security::from_files(ca, cert, key).map_err(|e| (e, 2))
}

/// A failure a person can act on, and the exit code.
pub type Failure = (String, u8);

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text tables.
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// What every command gets: the hub it talks to, the output format, and a client.
pub struct Ctx {
    /// The hub's address as given.
    pub hub: String,
    /// Output format.
    pub output: Output,
    /// The fleet API.
    pub client: FleetServiceClient<Channel>,
    /// The connection, for the hub's other APIs (the store's `Kv`).
    pub channel: Channel,
    /// How it was dialled (another replica is dialled the same way).
    pub security: flotilla_api::grpc::Security,
}

impl Ctx {
    /// Connects to `hub` as `security` says.
    pub async fn connect(
        hub: String,
        output: Output,
        security: flotilla_api::grpc::Security,
    ) -> Result<Self, Failure> {
        use flotilla_api::grpc::{Dial, DialError};
        let dial = Dial {
            security: security.clone(),
            ..Dial::plaintext(std::time::Duration::from_secs(3))
        };
        let ch = flotilla_api::grpc::connect(&hub, &dial)
            .await
            .map_err(|e| match e {
                DialError::Address { .. } => (format!("--hub {e}"), 2),
                DialError::Connect { .. } => (
                    format!("{e}; is the hub running? set --hub or FLOTILLA_HUB"),
                    4,
                ),
            })?;
        Ok(Self {
            hub,
            output,
            client: FleetServiceClient::new(ch.clone()),
            channel: ch,
            security,
        })
    }

    /// A hub error a person can act on, and its exit code.
    pub fn explain(&self, s: tonic::Status) -> Failure {
        use tonic::Code;
        let field = s
            .metadata()
            .get("flotilla-field")
            .and_then(|v| v.to_str().ok());
        let msg = match (s.code(), field) {
            (Code::Unavailable, _) => format!(
                "hub {} is unavailable ({}); is it running? set --hub or FLOTILLA_HUB",
                self.hub,
                s.message()
            ),
            (Code::NotFound | Code::Aborted, _) => s.message().to_string(),
            (Code::PermissionDenied | Code::Unauthenticated, _) => {
                format!("the hub refused: {}", s.message())
            }
            // Plaintext h2 meeting a TLS listener fails this way.
            (Code::Internal | Code::Unknown, _)
                if self.security == flotilla_api::grpc::Security::Plaintext =>
            {
                format!(
                    "hub {} did not answer plaintext gRPC ({}); if it serves TLS, give --ca                      (FLOTILLA_CA) and your --cert/--key",
                    self.hub,
                    s.message()
                )
            }
            (Code::InvalidArgument, Some(f)) => {
                let why = s
                    .message()
                    .strip_prefix(&format!("{f}: "))
                    .unwrap_or(s.message());
                format!("invalid {f}: {why}")
            }
            _ => format!("{:?}: {}", s.code(), s.message()),
        };
        let code = match s.code() {
            Code::NotFound => 3,
            Code::InvalidArgument => 2,
            Code::Unavailable | Code::DeadlineExceeded => 4,
            Code::PermissionDenied | Code::Unauthenticated => 5,
            _ => 1,
        };
        (msg, code)
    }

    /// Prints `v` as JSON or YAML, or the text `table_text` builds.
    pub fn print(&self, v: &Value, table_text: impl FnOnce() -> String) {
        match self.output {
            Output::Table => print!("{}", table_text()),
            Output::Json => println!("{}", serde_json::to_string_pretty(v).expect("json")),
            Output::Yaml => print!(
                "{}",
                serde_saphyr::to_string(v).unwrap_or_else(|e| format!("# yaml error: {e}\n"))
            ),
        }
    }
}
