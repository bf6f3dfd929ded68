use clap::Parser;

use mkappliance::cmdline::{Cli, Command};

fn main() {
    // Inside the appliance the kernel starts us as /init (PID 1). Started as `init`
    // elsewhere, run() refuses rather than mounting over the host's /proc.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let as_init = std::path::Path::new(&argv0).file_name() == Some(std::ffi::OsStr::new("init"));
    if as_init || std::process::id() == 1 {
        mkappliance::appliance::init::run();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build(args) => mkappliance::builder::build(&args).map(|_| ()),
        Command::Inspect(args) => mkappliance::inspect::inspect(&args),
    };
    if let Err(e) = result {
        // One line that reads like a path through the program.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
