use clap::Parser;

use mkappliance::cmdline::{Cli, Command};

fn main() {
    // Inside the appliance the kernel starts us as /init with PID 1.
    if std::process::id() == 1 {
        mkappliance::appliance::init::run();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build(args) => mkappliance::builder::build(&args).map(|_| ()),
        Command::Inspect(args) => mkappliance::inspect::inspect(&args),
        Command::Compress(args) => mkappliance::publish::compress_cmd(&args),
        Command::Upload(args) => mkappliance::publish::upload_cmd(&args),
        Command::Fetch(cmd) => mkappliance::publish::fetch_cmd(&cmd),
    };
    if let Err(e) = result {
        // One line that reads like a path through the program.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
