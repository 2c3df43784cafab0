//! `flotctl`: the Flotilla command line (the commands live in the library, `app.rs` and
//! `commands/`).

fn main() -> std::process::ExitCode {
    flotctl::app::main_from(std::env::args_os())
}
