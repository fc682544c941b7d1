//! The `onair` binary: parses the command line and runs the chosen command.
//! All logic lives in the library (`onair::cli`).

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    onair::cli::main()
}
