//! The `cuttle` binary: everything lives in the library; see `cuttle::cli`.

fn main() -> std::process::ExitCode {
    cuttle::cli::main()
}
