//! The `mesh-agent` binary: parses the command line, sets up logging and hands the command
//! to the library (`lib.rs` says what the agent owns).

use clap::Parser as _;
use mesh_agent::{
    app,
    cli::{self, Cli, Command},
};

// malloc, with a cheap path for tokio's 128-byte-aligned task cells and I/O registrations
// (sys/alloc.rs).
#[global_allocator]
static ALLOCATOR: mesh_agent::Allocator = mesh_agent::Allocator;

fn main() {
    let cli = Cli::parse();
    // Reloadable: the admin endpoint's `/logging` changes the filter of a running agent.
    mesh_agent::admin::logging::init(
        &cli.log,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
    if let Err(e) = dispatch(cli.command) {
        // One line, the whole cause chain, non-zero exit.
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("mesh-agent: error: {}", chain.join(": "));
        std::process::exit(1);
    }
}

fn dispatch(cmd: Command) -> anyhow::Result<()> {
    let print = |(cols, rows): (Vec<&str>, Vec<serde_json::Value>), o| -> anyhow::Result<()> {
        print!("{}", cli::render(&cols, &rows, o));
        Ok(())
    };
    match cmd {
        Command::Run(args) => app::run(args),
        Command::ControlPlane(args) => app::control_plane(args),
        Command::XdsWatch(args) => app::xds_watch(args),
        Command::Maps(i) => print(cli::maps(&i.pin_path)?, i.output),
        Command::Dump { inspect, map } => {
            print(cli::dump(&inspect.pin_path, &map)?, inspect.output)
        }
        Command::Programs(i) => print(cli::programs(&i.pin_path)?, i.output),
        Command::Links(i) => print(cli::links(&i.pin_path)?, i.output),
        Command::Certs(a) => print(cli::certs(a.admin_address)?, a.output),
        Command::Inspect { object } => {
            print!("{}", cli::inspect(&object)?);
            Ok(())
        }
        Command::Top(a) => Ok(mesh_agent::top::run(&a)?),
        Command::LogLevel(a) => {
            print!("{}", cli::log_level(a.admin_address, a.filter.as_deref())?);
            Ok(())
        }
        Command::Debug {
            command: cli::DebugCommand::Profile(a),
        } => {
            let (folded, summary) = cli::debug_profile(&a)?;
            match &a.out {
                Some(path) => std::fs::write(path, folded)?,
                None => print!("{folded}"),
            }
            eprintln!("{summary}");
            Ok(())
        }
        Command::Debug {
            command: cli::DebugCommand::Heap(a),
        } => {
            let h = cli::debug_heap(a.admin_address)?;
            match a.output {
                cli::Output::Json => {
                    println!("{}", serde_json::to_string_pretty(&h).unwrap_or_default())
                }
                cli::Output::Table => {
                    for (k, v) in h.as_object().into_iter().flatten() {
                        println!("{k:<20} {v}");
                    }
                }
            }
            Ok(())
        }
        Command::Ca {
            command: cli::CaCommand::Init { dir, trust_domain },
        } => {
            cli::ca_init(&dir, &trust_domain)?;
            eprintln!(
                "wrote a CA root to {} (use it with --ca-dir)",
                dir.display()
            );
            Ok(())
        }
        Command::Bypass { inspect, state } => {
            let c = cli::bypass(&inspect.pin_path, state == cli::OnOff::On)?;
            eprintln!(
                "bypass {}: new connections {}",
                if c.flags & mesh_common::cfg_flags::BYPASS != 0 {
                    "on"
                } else {
                    "off"
                },
                if c.flags & mesh_common::cfg_flags::BYPASS != 0 {
                    "go direct"
                } else {
                    "are captured again"
                }
            );
            Ok(())
        }
    }
}
