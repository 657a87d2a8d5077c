//! `blocksnap`: the control command. Everything is in `blocksnap::cli`.

fn main() -> std::process::ExitCode {
    blocksnap::cli::main()
}
