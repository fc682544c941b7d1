//! The `onair` binary: parses the command line and runs the chosen command.
//! All logic lives in the library (`onair::cli`).

fn main() -> std::process::ExitCode {
    onair::cli::main()
}
