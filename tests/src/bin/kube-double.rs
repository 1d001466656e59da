//! `kube-double`: the Kubernetes API server test double (`mesh_tests::kubeapi`) as a
//! standalone process, for demos and manual use. Not a Kubernetes API server.
//!
//! ```sh
//! kube-double --listen 127.0.0.1:0 --kubeconfig /tmp/kd.yaml   # prints the address
//! kubectl --kubeconfig /tmp/kd.yaml get ns
//! curl -X POST 'http://ADDR/_double/fail-next?n=2&code=503'
//! ```

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use mesh_tests::kubeapi::{kubeconfig_yaml, serve, Options, Shared};

const USAGE: &str = "usage: kube-double [--listen ADDR] [--kubeconfig PATH] [--bookmark-interval-ms N] [--history-limit N] [--tokens FILE]

A test double of the Kubernetes API server (plain HTTP, in memory). Prints the address it
listens on; writes a kubeconfig for it with --kubeconfig. Runs until SIGINT/SIGTERM.

  --listen ADDR              default 127.0.0.1:0
  --kubeconfig PATH          write a kubeconfig for this server (removed on exit)
  --bookmark-interval-ms N   BOOKMARK period on watches (default 1000)
  --history-limit N          events kept for watch resumption (default 10000)
  --tokens FILE              tokens TokenReview knows, JSON:
                             {\"<token>\": {\"user\": <UserInfo>, \"audiences\": [\"istio-ca\"]}}

Fault injection and inspection (not counted as API requests):
  POST /_double/drop-watches          break every open watch stream
  POST /_double/compact               forget the event history (older RVs get 410)
  POST /_double/fail-next?n=N&code=C  the next N API requests get HTTP C with a Status
  POST /_double/delay?ms=N            delay every API request
  GET  /_double/stats                 counters (JSON)
  GET  /_double/requests              request log
  GET  /_double/objects/<plural>      current objects of a resource";

struct Args {
    listen: SocketAddr,
    kubeconfig: Option<PathBuf>,
    options: Options,
    tokens: Option<PathBuf>,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args> {
    let mut args = Args {
        listen: "127.0.0.1:0".parse().expect("literal"),
        kubeconfig: None,
        options: Options::default(),
        tokens: None,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => args.listen = value()?.parse().context("--listen")?,
            "--kubeconfig" => args.kubeconfig = Some(value()?.into()),
            "--tokens" => args.tokens = Some(value()?.into()),
            "--bookmark-interval-ms" => {
                args.options.bookmark_interval =
                    Duration::from_millis(value()?.parse().context("--bookmark-interval-ms")?)
            }
            "--history-limit" => {
                args.options.history_limit = value()?.parse().context("--history-limit")?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(args)
}

async fn run(args: Args) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    if let Some(path) = &args.kubeconfig {
        std::fs::write(path, kubeconfig_yaml(&format!("http://{addr}")))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{addr}");
    let shared = Arc::new(Shared::new(args.options, addr));
    if let Some(path) = &args.tokens {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let table: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
        for (token, entry) in table {
            let auds: Vec<&str> = entry["audiences"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shared.set_token(&token, entry["user"].clone(), &auds);
        }
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    serve(listener, shared, async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
    .await;
    if let Some(path) = &args.kubeconfig {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = parse(std::env::args().skip(1)).and_then(|args| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(run(args))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kube-double: {e:#}");
            ExitCode::FAILURE
        }
    }
}
