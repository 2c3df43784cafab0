//! Security commands: the fleet CA and identities (`ca`, offline, with the CA's key), join
//! tokens (`token`), cluster approval and removal (`cluster`), and the audit log (`audit`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use flotilla_api::pki::{Ca, Usage};
use flotilla_api::v1;
use flotilla_core::security::{Role, SpiffeId};
use serde_json::json;

use super::{Ctx, Failure};

/// `flotctl ca`: made and used offline, where the CA's key is.
#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Make a new fleet CA and an admin identity in DIR (copy `ca.crt` and `ca.key` to every
    /// hub replica's --tls-dir).
    Init {
        /// Where to write `ca.crt`, `ca.key`, `admin.crt`, `admin.key` and `fleet`.
        #[arg(long)]
        dir: PathBuf,
        /// The fleet's name (the hubs' --fleet).
        #[arg(long, default_value = "flotilla")]
        fleet: String,
    },
    /// Issue a person or tool a certificate with a role, signed by the CA in DIR.
    Issue {
        /// The CA's directory (from `ca init`).
        #[arg(long)]
        dir: PathBuf,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Whose it is (shown in the audit log).
        #[arg(long)]
        name: String,
        /// Lifetime (e.g. 720h, 90d).
        #[arg(long, default_value = "90d", value_parser = flotilla_core::duration::parse)]
        ttl: Duration,
        /// Where to write `<name>.crt` and `<name>.key` (default: DIR).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `flotctl token`.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// A new join token (shown once) and the join string an agent starts with.
    Create {
        /// The cluster it admits (a DNS label).
        cluster: String,
        /// Lifetime (e.g. 1h; default the hub's, 24h).
        #[arg(long, value_parser = flotilla_core::duration::parse)]
        ttl: Option<Duration>,
        /// How many joins it admits.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// A join waits for `flotctl cluster approve CLUSTER`.
        #[arg(long)]
        require_approval: bool,
    },
    /// Join tokens: id, cluster, uses left, expiry (never secrets).
    List,
    /// Delete a token: it admits nobody from then on.
    Revoke {
        /// The token's id (`flotctl token list`).
        id: String,
    },
}

/// `flotctl apitoken`: bearer tokens for tools that cannot present a client certificate.
#[derive(Debug, Subcommand)]
pub enum ApiTokenCmd {
    /// A new bearer token (shown once) for a person or tool with a role; sent as
    /// `authorization: Bearer <token>` over TLS.
    Create {
        /// Whose it is (shown in the audit log).
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Lifetime (default 90 days, at most a year).
        #[arg(long, value_parser = flotilla_core::duration::parse)]
        ttl: Option<Duration>,
    },
    /// Bearer tokens: id, name, role, expiry (never secrets).
    List,
    /// Delete a bearer token: it authenticates nobody from then on.
    Revoke {
        /// The token's id (`flotctl apitoken list`).
        id: String,
    },
}

/// Runs `apitoken`.
pub async fn apitoken(ctx: &mut Ctx, what: ApiTokenCmd) -> Result<(), Failure> {
    match what {
        ApiTokenCmd::Create { name, role, ttl } => {
            let t = ctx
                .client
                .create_api_token(v1::CreateApiTokenRequest {
                    name: name.clone(),
                    role: role.clone(),
                    ttl_seconds: ttl.map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32),
                })
                .await
                .map_err(|s| ctx.explain(s))?
                .into_inner();
            let v = json!({"id": t.id, "name": name, "role": role, "token": t.token, "expires_at": crate::rfc3339(t.expires_at_unix_ms)});
            ctx.print(&v, || {
                format!(
                    "bearer token for {role} {name:?} (shown once; expires {}):\n{}\n",
                    crate::rfc3339(t.expires_at_unix_ms),
                    t.token
                )
            });
        }
        ApiTokenCmd::List => {
            let r = ctx
                .client
                .list_api_tokens(v1::ListApiTokensRequest {})
                .await
                .map_err(|s| ctx.explain(s))?
                .into_inner();
            let now = crate::unix_ms_now();
            let v = json!(r.tokens.iter().map(|t| json!({
                "id": t.id, "name": t.name, "role": t.role,
                "expires_at": crate::rfc3339(t.expires_at_unix_ms), "expired": t.expires_at_unix_ms <= now,
                "created_by": t.created_by,
            })).collect::<Vec<_>>());
            ctx.print(&v, || {
                let rows = r
                    .tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.name.clone(),
                            t.role.clone(),
                            if t.expires_at_unix_ms <= now {
                                "expired".into()
                            } else {
                                crate::rfc3339(t.expires_at_unix_ms)
                            },
                            t.created_by.clone(),
                        ]
                    })
                    .collect();
                crate::table(&["ID", "NAME", "ROLE", "EXPIRES", "CREATED BY"], rows)
            });
        }
        ApiTokenCmd::Revoke { id } => {
            ctx.client
                .revoke_api_token(v1::RevokeApiTokenRequest { id: id.clone() })
                .await
                .map_err(|s| ctx.explain(s))?;
            println!("API token {id} revoked");
        }
    }
    Ok(())
}

/// `flotctl cluster`.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Let a cluster whose token asked for approval finish joining.
    Approve {
        /// The cluster.
        name: String,
    },
    /// Revoke a cluster's identity (its stream closes at once) and delete its records.
    Remove {
        /// The cluster.
        name: String,
    },
}

/// `flotctl audit`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Only records this recent (e.g. 1h, 7d).
    #[arg(long, value_parser = flotilla_core::duration::parse)]
    since: Option<Duration>,
    /// Only records whose principal contains this (`cluster/gpu-a`, `admin/`, `anonymous`).
    #[arg(long)]
    who: Option<String>,
    /// At most this many (the newest).
    #[arg(long, default_value_t = 1000)]
    limit: u32,
}

fn io_err(what: &Path) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| (format!("{}: {e}", what.display()), 1)
}

/// Writes `data` to `path`, readable only by its owner when `secret`; never over a file.
fn write_new(path: &Path, data: &str, secret: bool) -> Result<(), Failure> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).map_err(io_err(path))?;
    f.write_all(data.as_bytes()).map_err(io_err(path))
}

fn now() -> i64 {
    crate::unix_ms_now() / 1000
}

/// The CA in `dir` and its fleet.
fn load_ca(dir: &Path) -> Result<(Ca, String), Failure> {
    let read = |n: &str| {
        let p = dir.join(n);
        std::fs::read_to_string(&p).map_err(|e| {
            (
                format!("{}: {e} (made by `flotctl ca init`)", p.display()),
                1,
            )
        })
    };
    let ca = Ca::from_pem(&read("ca.crt")?, &read("ca.key")?).map_err(|e| (e.to_string(), 1))?;
    Ok((ca, read("fleet")?.trim().to_string()))
}

/// Runs `ca` (no hub needed).
pub fn ca(what: CaCmd) -> Result<(), Failure> {
    match what {
        CaCmd::Init { dir, fleet } => {
            if SpiffeId::parse(&SpiffeId::hub(&fleet, "x")).is_err() || fleet.contains('/') {
                return Err((format!("--fleet {fleet:?}: a DNS-style name"), 2));
            }
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            if dir.join("ca.key").exists() {
                return Err((
                    format!(
                        "{}: a CA is already there; not overwriting it",
                        dir.display()
                    ),
                    1,
                ));
            }
            let (ca, pair) = Ca::generate(&fleet, now()).map_err(|e| (e.to_string(), 1))?;
            let admin = ca
                .issue(
                    &SpiffeId::user(&fleet, Role::Admin, "admin"),
                    &Usage::Client,
                    now(),
                    365 * 86400,
                )
                .map_err(|e| (e.to_string(), 1))?;
            write_new(&dir.join("ca.key"), &pair.key_pem, true)?;
            write_new(&dir.join("ca.crt"), &pair.cert_pem, false)?;
            write_new(&dir.join("fleet"), &format!("{fleet}\n"), false)?;
            write_new(&dir.join("admin.key"), &admin.key_pem, true)?;
            write_new(&dir.join("admin.crt"), &admin.cert_pem, false)?;
            let d = dir.display();
            println!(
                "fleet {fleet:?} CA written to {d} (pin sha256:{})",
                ca.pin()
            );
            println!(
                "copy {d}/ca.crt and {d}/ca.key to every hub replica's --tls-dir; keep ca.key secret."
            );
            println!("an admin identity (one year):");
            println!(
                "  export FLOTILLA_CA={d}/ca.crt FLOTILLA_CERT={d}/admin.crt FLOTILLA_KEY={d}/admin.key"
            );
            Ok(())
        }
        CaCmd::Issue {
            dir,
            role,
            name,
            ttl,
            out,
        } => {
            let role = Role::parse(&role).map_err(|e| (format!("--role: {e}"), 2))?;
            flotilla_core::security::check_user_name(&name)
                .map_err(|e| (format!("--name: {e}"), 2))?;
            let (ca, fleet) = load_ca(&dir)?;
            let pair = ca
                .issue(
                    &SpiffeId::user(&fleet, role, &name),
                    &Usage::Client,
                    now(),
                    ttl.as_secs() as i64,
                )
                .map_err(|e| (e.to_string(), 1))?;
            let out = out.unwrap_or(dir);
            write_new(&out.join(format!("{name}.key")), &pair.key_pem, true)?;
            write_new(&out.join(format!("{name}.crt")), &pair.cert_pem, false)?;
            println!(
                "{role} {name:?}: {}/{name}.crt and {name}.key",
                out.display()
            );
            Ok(())
        }
    }
}

/// Runs `token`.
pub async fn token(ctx: &mut Ctx, what: TokenCmd) -> Result<(), Failure> {
    match what {
        TokenCmd::Create {
            cluster,
            ttl,
            uses,
            require_approval,
        } => {
            let t = ctx
                .client
                .create_join_token(v1::CreateJoinTokenRequest {
                    cluster: cluster.clone(),
                    ttl_seconds: ttl.map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32),
                    uses,
                    require_approval,
                })
                .await
                .map_err(|s| ctx.explain(s))?
                .into_inner();
            let v = json!({"id": t.id, "cluster": cluster, "join": t.join, "expires_at": crate::rfc3339(t.expires_at_unix_ms)});
            ctx.print(&v, || {
                format!(
                    "join string for {cluster} (shown once; expires {}):\n{}\n",
                    crate::rfc3339(t.expires_at_unix_ms),
                    t.join
                )
            });
            Ok(())
        }
        TokenCmd::List => {
            let r = ctx
                .client
                .list_join_tokens(v1::ListJoinTokensRequest {})
                .await
                .map_err(|s| ctx.explain(s))?
                .into_inner();
            let now = crate::unix_ms_now();
            let v = json!(r.tokens.iter().map(|t| json!({
                "id": t.id, "cluster": t.cluster, "uses_left": t.uses_left, "uses": t.uses,
                "require_approval": t.require_approval, "expires_at": crate::rfc3339(t.expires_at_unix_ms),
                "expired": t.expires_at_unix_ms <= now, "created_by": t.created_by,
            })).collect::<Vec<_>>());
            ctx.print(&v, || {
                let rows = r
                    .tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.cluster.clone(),
                            format!("{}/{}", t.uses_left, t.uses),
                            if t.expires_at_unix_ms <= now {
                                "expired".into()
                            } else {
                                crate::rfc3339(t.expires_at_unix_ms)
                            },
                            if t.require_approval {
                                "yes".into()
                            } else {
                                "no".into()
                            },
                            t.created_by.clone(),
                        ]
                    })
                    .collect();
                crate::table(
                    &[
                        "ID",
                        "CLUSTER",
                        "USES LEFT",
                        "EXPIRES",
                        "APPROVAL",
                        "CREATED BY",
                    ],
                    rows,
                )
            });
            Ok(())
        }
        TokenCmd::Revoke { id } => {
            ctx.client
                .revoke_join_token(v1::RevokeJoinTokenRequest { id: id.clone() })
                .await
                .map_err(|s| ctx.explain(s))?;
            println!("join token {id} revoked");
            Ok(())
        }
    }
}

/// Runs `cluster`.
pub async fn cluster(ctx: &mut Ctx, what: ClusterCmd) -> Result<(), Failure> {
    match what {
        ClusterCmd::Approve { name } => {
            ctx.client
                .approve_cluster(v1::ApproveClusterRequest {
                    cluster: name.clone(),
                })
                .await
                .map_err(|s| ctx.explain(s))?;
            println!("cluster {name} approved: its agent finishes joining on its next attempt");
        }
        ClusterCmd::Remove { name } => {
            let r = ctx
                .client
                .remove_cluster(v1::RemoveClusterRequest {
                    cluster: name.clone(),
                })
                .await
                .map_err(|s| ctx.explain(s))?
                .into_inner();
            println!(
                "cluster {name} removed: its identity is revoked, {} records deleted",
                r.removed
            );
        }
    }
    Ok(())
}

/// Runs `audit`.
pub async fn audit(ctx: &mut Ctx, a: AuditArgs) -> Result<(), Failure> {
    let since = a
        .since
        .map_or(0, |d| crate::unix_ms_now() - d.as_millis() as i64);
    let r = ctx
        .client
        .list_audit(v1::ListAuditRequest {
            since_unix_ms: since,
            who: a.who.unwrap_or_default(),
            limit: a.limit,
        })
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    let v = json!(r.records.iter().map(|x| json!({
        "id": x.id, "at": crate::rfc3339(x.at_unix_ms), "at_unix_ms": x.at_unix_ms,
        "principal": x.principal, "credential": x.credential, "source": x.source,
        "action": x.action, "target": x.target, "decision": x.decision, "reason": x.reason, "code": x.code,
    })).collect::<Vec<_>>());
    ctx.print(&v, || {
        let rows = r
            .records
            .iter()
            .map(|x| {
                vec![
                    crate::rfc3339(x.at_unix_ms),
                    x.principal.clone(),
                    x.action.clone(),
                    x.target.clone(),
                    x.decision.clone(),
                    x.code.clone(),
                    x.reason.clone(),
                ]
            })
            .collect();
        crate::table(
            &[
                "TIME", "WHO", "ACTION", "TARGET", "DECISION", "CODE", "REASON",
            ],
            rows,
        )
    });
    Ok(())
}
