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
        Command::Serve(args) => mkappliance::appliance::serve::run(&args),
        Command::Run(args) => mkappliance::run::run(&args),
        Command::Decrypt(args) => decrypt(&args),
        Command::Compress(args) => mkappliance::publish::compress_cmd(&args),
        Command::Upload(args) => mkappliance::publish::upload_cmd(&args),
        Command::Fetch(cmd) => mkappliance::publish::fetch_cmd(&cmd),
    };
    if let Err(e) = result {
        // One line that reads like a path through the program.
        eprintln!("error: {e:#}");
        let interrupted = e.downcast_ref::<mkappliance::run::Interrupted>().is_some();
        std::process::exit(if interrupted {
            mkappliance::run::INTERRUPTED_EXIT
        } else {
            1
        });
    }
}

/// `mkappliance decrypt FILE`: the plaintext on stdout.
fn decrypt(args: &mkappliance::cmdline::DecryptArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let keys = mkappliance::sops::KeyOptions {
        age_key_file: args.age_key_file.clone(),
    };
    let plain = mkappliance::sops::load(&args.file, &keys)?;
    if !plain.was_encrypted {
        eprintln!(
            "note: {} is not SOPS-encrypted; printing it unchanged",
            args.file.display()
        );
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&plain.bytes)
        .and_then(|()| out.flush())
        .with_context(|| format!("writing the plaintext of {} to stdout", args.file.display()))
}
