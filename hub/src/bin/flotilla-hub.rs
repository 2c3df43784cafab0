//! `flotilla-hub`: parses flags and runs the hub library until Ctrl-C or SIGTERM.
//! `flotilla-hub ctl ARGS` is `flotctl ARGS`, bundled so the binary `--dev` just built can be
//! driven at once, as `k3s kubectl` is.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<ExitCode> {
    let mut args = std::env::args_os();
    if std::env::args_os().nth(1).is_some_and(|a| a == "ctl") {
        args.next();
        return Ok(flotctl::app::main_from(
            std::iter::once("flotilla-hub ctl".into()).chain(args.skip(1)),
        ));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())?;
    Ok(ExitCode::SUCCESS)
}

async fn serve() -> anyhow::Result<()> {
    flotilla_hub::logging::init("info,openraft=warn");
    let args = flotilla_hub::Args::parse();
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        signal.cancel();
    });
    flotilla_hub::run(args, shutdown).await
}
