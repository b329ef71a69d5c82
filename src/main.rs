//! The `kesh` command: `kesh server`, the `kes`-style client commands, `kesh migrate`,
//! `kesh hsm probe` and shell completion. Everything lives in [`cli`].

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
