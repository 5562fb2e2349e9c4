//! pbxd: one node of the PBX cluster. Thin: parse arguments, load the config, run.

use std::path::PathBuf;

use anyhow::Context;

// The SIP path allocates many small strings; mimalloc handles that far better than glibc
// malloc across tokio worker threads (measured: see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "pbxd",
    version,
    about = "High-availability PBX node (SIP registrar)"
)]
struct Args {
    /// Node configuration file (TOML).
    #[arg(short, long)]
    config: PathBuf,
    /// Check the configuration, the users file and the dialplan file, then exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = pbx_node::Config::load(&args.config)?;
    if args.check {
        if let Some(users) = &config.cluster.users_file {
            let n = pbx_node::config::load_users(&config.resolve(users))?.len();
            println!("users file: {n} users");
        }
        if let Some(plan) = &config.cluster.dialplan_file {
            pbx_node::config::load_dialplan(&config.resolve(plan))?;
            println!("dialplan file: valid");
        }
        println!("{}: OK", args.config.display());
        return Ok(());
    }
    pbx_node::init_tracing(&config.log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(pbx_node::run(config, shutdown_signal()))?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
